import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from resnet_slim.compress.export import (
    check_input_size,
    check_parity,
    export_onnx,
    make_session,
    parity,
)
from resnet_slim.compress.quant import calibration_images, quantize_static_int8
from resnet_slim.data.loader import normalized_split
from resnet_slim.errors import UserError
from resnet_slim.hardware import hardware_fingerprint
from resnet_slim.measure.bench import benchmark_model, time_rows
from resnet_slim.measure.timing import latency_ms
from resnet_slim.params import BenchmarkParams
from tests.conftest import REPO


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
