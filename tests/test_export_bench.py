import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import TensorProto, helper

from resnet_slim.compress import export
from resnet_slim.compress.export import (
    check_input_size,
    check_parity,
    export_onnx,
    make_session,
    parity,
)
from resnet_slim.compress.quant import calibration_images, quantize_static_int8
from resnet_slim.data import loader as data
from resnet_slim.data.loader import normalized_split
from resnet_slim.errors import UserError
from resnet_slim.hardware import hardware_fingerprint
from resnet_slim.io import write_json
from resnet_slim.measure.bench import benchmark_model
from resnet_slim.measure.bench_stage import time_rows
from resnet_slim.measure.timing import latency_ms
from resnet_slim.params import BenchmarkParams
from resnet_slim.train.models import build_model
from tests.conftest import REPO, assert_not_written, stage_main, tiny_arch, tiny_params


@pytest.fixture
def tiny_onnx(tmp_path, tiny_model):
    path = tmp_path / "tiny.onnx"
    export_onnx(tiny_model, path, image_size=8, opset=17)
    return path


def test_export_has_named_io_and_dynamic_batch(tiny_onnx, tiny_model):
    graph = onnx.load(str(tiny_onnx)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == [
        "logits"
    ]
    session = make_session(tiny_onnx)
    out = session.run(None, {"input": np.zeros((5, 3, 8, 8), np.float32)})[0]
    assert out.shape == (5, 10)


def test_parity_agrees_for_a_faithful_export_and_catches_a_wrong_one(
    tiny_onnx, tiny_model, tiny_prepared
):
    images, _ = normalized_split(tiny_prepared, "test")
    result = parity(tiny_model, make_session(tiny_onnx), images)
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-4
    assert check_parity(result, min_top1_agreement=0.99, max_abs_diff=1e-3) == []
    torch.manual_seed(1)
    with torch.no_grad():  # the file no longer matches the model: what a broken export looks like
        for p in tiny_model.parameters():
            p.add_(torch.randn_like(p))
    bad = parity(tiny_model, make_session(tiny_onnx), images)
    problems = check_parity(bad, min_top1_agreement=0.99, max_abs_diff=1e-3)
    assert problems and "max |logit diff|" in " ".join(problems)


def test_broken_or_wrong_shape_onnx_is_a_clear_error(tmp_path, tiny_onnx):
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(UserError, match="onnxruntime cannot load"):
        make_session(tmp_path / "junk.onnx")
    with pytest.raises(UserError, match="not found"):
        make_session(tmp_path / "missing.onnx")
    fixed = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    torch.onnx.export(fixed, (torch.zeros(1, 3, 8, 8),), str(tmp_path / "fixed.onnx"), dynamo=False)
    with pytest.raises(UserError, match="expects 8x8 images but the dataset is 16x16"):
        check_input_size(make_session(tmp_path / "fixed.onnx"), 16, tmp_path / "fixed.onnx")


def test_benchmark_reports_every_number(tiny_onnx, tiny_prepared):
    images, labels = normalized_split(tiny_prepared, "test")
    p = BenchmarkParams(warmup=2, rounds=5, runs_per_round=4, throughput_batch=8)
    result = benchmark_model(tiny_onnx, images, labels, p)
    rows = {"a": {"file": str(tiny_onnx), "runtime": "onnxruntime", **result}}
    timing = time_rows(rows, images[:1].numpy(), p)
    assert timing["models"] == ["a"] and len(timing["orders"]) == 5
    result = rows["a"]
    assert len(result["round_p50_ms"]) == 5 and result["timed"] == "interleaved rounds"
    for key in (
        "top1",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "size_mb",
        "params",
        "throughput_ips",
        "peak_rss_mb",
        "runtime_rss_mb",
    ):
        assert np.isfinite(result[key]) and result[key] > 0, key
    assert result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"]
    assert result["peak_rss_mb"] > result["runtime_rss_mb"]
    assert result["peak_rss_mb"] < 2000  # the probe's own peak, not the test process's
    assert "Conv" in result["onnx_ops"]
    # the CI brackets the point top-1, and the per-image predictions reproduce it
    assert result["top1_ci_low"] <= result["top1"] <= result["top1_ci_high"]
    assert len(result["predictions"]) == len(labels) == result["n_test"]
    assert 100 * (result["predictions"] == labels.numpy()).mean() == pytest.approx(result["top1"])


def test_latency_percentiles_are_ordered(tiny_onnx):
    stats = latency_ms(
        make_session(tiny_onnx), np.zeros((1, 3, 8, 8), np.float32), warmup=1, runs=30
    )
    assert 0 < stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"]


def test_static_ptq_quantizes_convs_and_shrinks_the_file(tmp_path, tiny_onnx, tiny_prepared):
    images, labels = normalized_split(tiny_prepared, "train")
    out = tmp_path / "int8.onnx"
    quantize_static_int8(tiny_onnx, out, calibration_images(images, 64, seed=0))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with pytest.raises(UserError, match="empty"):
        calibration_images(images[:0], 64, seed=0)


def test_hardware_fingerprint_names_cpu_and_int8_flags():
    hw = hardware_fingerprint()
    assert hw["logical_cores"] >= 1 and "avx512_vnni" in hw and hw["onnxruntime"]


HELP_PROBE = """
import runpy, sys
sys.argv = ["stage", "--help"]
try:
    runpy.run_module(sys.argv_stage, run_name="__main__")
except SystemExit:
    pass
print("heavy:", sorted(m for m in ("torch", "onnxruntime", "pandas", "numpy") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "stage", ["benchmark", "export", "export_targets", "ptq", "qat", "torch_ptq"]
)
def test_stage_help_imports_no_heavy_library(stage):
    """Stages import torch / onnxruntime after parsing their arguments: `--help` stays instant."""
    probe = HELP_PROBE.replace("sys.argv_stage", repr(f"stages.{stage}"))
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "heavy: []"


# --------------------------------------------------------------------------------------------
# export: checkpoints, ONNX files and opsets it cannot use


def test_export_stage_refuses_pickled_checkpoint_and_writes_nothing(
    tmp_path, tiny_model, tiny_prepared
):
    torch.save(tiny_model, tmp_path / "model.pt")
    with pytest.raises(UserError, match="weights_only"):
        stage_main("export")(
            [
                str(tmp_path / "model.pt"),
                str(tmp_path / "m.onnx"),
                "--params",
                str(tiny_params(tmp_path / "params.yaml")),
                "--data",
                str(tiny_prepared),
                "--report",
                str(tmp_path / "parity.json"),
            ]
        )
    assert_not_written(tmp_path / "m.onnx", tmp_path / "parity.json")


def _custom_op_onnx(path: Path, *, domain: str = "com.example", ir_version: int = 8) -> Path:
    node = helper.make_node("FancyOp", ["input"], ["logits"], domain=domain)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(
        graph,
        ir_version=ir_version,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
    )
    onnx.save(model, str(path))
    return path


def test_onnx_files_onnxruntime_cannot_load(tmp_path):
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(
        UserError, match="garbage.onnx: onnxruntime cannot load this model: .*Protobuf"
    ):
        export.make_session(tmp_path / "garbage.onnx")
    with pytest.raises(
        UserError, match="onnxruntime cannot load this model: .*com.example:FancyOp"
    ):
        export.make_session(_custom_op_onnx(tmp_path / "custom.onnx"))
    newer = _custom_op_onnx(tmp_path / "newer.onnx", ir_version=onnx.IR_VERSION + 5)
    with pytest.raises(
        UserError, match="cannot load this model: .*Unsupported model IR version"
    ) as err:
        export.make_session(newer)
    assert "onnxruntime_src" not in str(err.value)  # the C++ source location is noise for a user


def test_onnx_with_the_wrong_input_size(tmp_path, tiny_model):
    export.export_onnx(tiny_model, tmp_path / "m16.onnx", image_size=16, opset=17)
    session = export.make_session(tmp_path / "m16.onnx")
    with pytest.raises(UserError, match="model expects 16x16 images but the dataset is 8x8"):
        export.check_input_size(session, 8, tmp_path / "m16.onnx")


def test_export_with_an_opset_torch_cannot_write(tmp_path, tiny_model):
    with pytest.raises(UserError, match="export.opset 99 is newer than this torch can export"):
        export.export_onnx(tiny_model, tmp_path / "m.onnx", image_size=8, opset=99)
    assert_not_written(tmp_path / "m.onnx")


# --------------------------------------------------------------------------------------------
# the benchmark stage: missing or wrong models and reports write nothing


def test_benchmark_of_a_missing_model_writes_nothing(tmp_path, tiny_prepared):
    params = tiny_params(
        tmp_path / "params.yaml",
        benchmark={"models": ["teacher"], "rounds": 5, "runs_per_round": 1},
    )
    out = tmp_path / "reports"
    with pytest.raises(UserError, match="models/teacher.onnx.*not found"):
        stage_main("benchmark")(
            [
                "--params",
                str(params),
                "--models-dir",
                str(tmp_path / "models"),
                "--data",
                str(tiny_prepared),
                "--out",
                str(out / "b.json"),
                "--table",
                str(out / "b.csv"),
                "--predictions",
                str(out / "p.csv"),
            ]
        )
    assert_not_written(out / "b.json", out / "b.csv", out / "p.csv")


def _identity_onnx(path: Path) -> Path:
    """A valid ONNX file that is not a classifier: its output is its input image."""
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 8, 8])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])], "id", [image], [out]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _benchmark(tmp_path: Path, prepared: Path, *extra: str) -> list[str]:
    out = tmp_path / "reports"
    return [
        "--params",
        str(tmp_path / "params.yaml"),
        "--models-dir",
        str(tmp_path / "models"),
        "--data",
        str(prepared),
        "--out",
        str(out / "b.json"),
        "--table",
        str(out / "b.csv"),
        "--predictions",
        str(out / "p.csv"),
        *extra,
    ]


@pytest.mark.parametrize(
    "setup, message",
    [
        ("identity", "outputs (80, 3, 8, 8) for 80 test images, not (80, 10) class scores"),
        ("five-classes", "outputs (80, 5) for 80 test images, not (80, 10) class scores"),
        ("torch-results-list", "torch.json: torch_ptq report is a JSON list, not an object"),
        ("targets-list", "targets.json: deployment targets is a JSON list, not an object"),
        (
            "empty-target-predictions",
            "target predictions are missing or not a readable CSV (EmptyDataError)",
        ),
        ("target-predictions-not-classes", "columns ['openvino'] are not whole class numbers"),
    ],
)
def test_benchmark_bad_models_and_reports_write_nothing(tmp_path, tiny_prepared, setup, message):
    (tmp_path / "models").mkdir()
    model = "teacher"
    if setup == "identity":
        _identity_onnx(tmp_path / "models" / "identity.onnx")
        model = "identity"
    else:
        torch.manual_seed(0)
        classes = 5 if setup == "five-classes" else 10
        export.export_onnx(
            build_model(tiny_arch(classes)).eval(),
            tmp_path / "models" / "teacher.onnx",
            image_size=8,
            opset=17,
        )
    tiny_params(
        tmp_path / "params.yaml",
        benchmark={
            "models": [model],
            "warmup": 1,
            "rounds": 5,
            "runs_per_round": 1,
            "all_cores": False,
            "roofline": False,
        },
    )
    extra = []
    if setup == "torch-results-list":
        (tmp_path / "torch.json").write_text("[1, 2]")
        extra = ["--torch-results", str(tmp_path / "torch.json")]
    elif setup == "targets-list":
        (tmp_path / "targets.json").write_text("[]")
        extra = ["--targets", str(tmp_path / "targets.json")]
    elif setup in ("empty-target-predictions", "target-predictions-not-classes"):
        write_json(tmp_path / "targets.json", {"models": {}})
        labels = data.load_split(tiny_prepared, "test").labels.numpy()
        text = (
            ""
            if setup == "empty-target-predictions"
            else pd.DataFrame(
                {"image": range(len(labels)), "label": labels, "openvino": ["x"] * len(labels)}
            ).to_csv(index=False)
        )
        (tmp_path / "tp.csv").write_text(text)
        extra = [
            "--targets",
            str(tmp_path / "targets.json"),
            "--targets-predictions",
            str(tmp_path / "tp.csv"),
        ]
    with pytest.raises(UserError) as raised:
        stage_main("benchmark")(_benchmark(tmp_path, tiny_prepared, *extra))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    out = tmp_path / "reports"
    assert_not_written(out / "b.json", out / "b.csv", out / "p.csv")
