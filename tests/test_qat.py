"""QAT: fake-quant training, the INT8 QDQ export ORT really runs in int8, and the eager PTQ
baseline."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.ao.nn.intrinsic import qat as nniqat
from torch.ao.nn.intrinsic import quantized as nniq

from resnet_slim.checkpoints import load_checkpoint, save_checkpoint
from resnet_slim.compress import onnx_int8, qat, qat_export
from resnet_slim.compress.export import export_onnx, make_session, run_onnx
from resnet_slim.errors import UserError
from resnet_slim.measure.bench import torch_latency_ms
from resnet_slim.train import engine
from resnet_slim.train.models import build_model, channel_record, make_arch
from tests.conftest import REPO, write_params

SIZE, N_CONVS = 16, 20  # ResNet-18: stem + 16 block convs + 3 downsample convs


pytestmark = pytest.mark.usefixtures("one_thread")


def fp32_model(channels=None) -> torch.nn.Module:
    """A tiny ResNet-18 with BN statistics from a few batches (random init has mean 0, var 1)."""
    torch.manual_seed(0)
    arch = make_arch(name="resnet18", num_classes=10, width=8, small_input=True)
    model = build_model({**arch, "channels": channels})
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(32, 3, SIZE, SIZE))
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    q = qat.prepare_qat_model(model, backend="x86")
    qat.calibrate(q, images(128))
    return q


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    q = calibrated(fp32_model())
    path = tmp_path_factory.mktemp("qat") / "qat.onnx"
    qat_export.export_qat_onnx(q, path, image_size=SIZE)
    return q, path


def test_prepare_copies_and_a_few_qat_steps_train():
    fp32 = fp32_model()
    before = {k: v.clone() for k, v in fp32.state_dict().items()}
    q = calibrated(fp32)
    assert all(torch.equal(before[k], v) for k, v in fp32.state_dict().items())  # input untouched
    assert isinstance(q.net.conv1, nniqat.ConvBnReLU2d)
    assert isinstance(q.net.layer2[0].conv2, nniqat.ConvBn2d)
    x, y = images(96, seed=2), torch.randint(0, 10, (96,))
    with torch.no_grad():  # fake quant: the same function as FP32, on an int8 grid
        reference, fake = fp32(x), q.eval()(x)
    assert (
        not torch.equal(reference, fake)
        and (reference.argmax(1) == fake.argmax(1)).float().mean() >= 0.8
    )
    weight = q.net.layer1[0].conv1.weight.detach().clone()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    optimizer = torch.optim.SGD(q.parameters(), lr=0.05)
    stats = engine.train_one_epoch(q, batches, optimizer, engine.cross_entropy(), desc="qat-test")
    assert np.isfinite(stats["loss"]) and not torch.equal(weight, q.net.layer1[0].conv1.weight)


def test_epoch_hook_freezes_bn_then_ranges_and_eval_never_observes():
    q = calibrated(fp32_model())
    hook = qat.qat_epoch_hook(freeze_bn_epoch=1, freeze_observer_epoch=2)
    fq = q.net.layer1[0].conv1.activation_post_process
    hook(q, 0)
    assert not q.net.conv1.freeze_bn and fq.observer_enabled.item() == 1
    q.eval()  # validation must not move the ranges
    scale = fq.scale.clone()
    with torch.no_grad():
        q(images(8) * 50)
    assert torch.equal(fq.scale, scale)
    q.train()
    hook(q, 1)
    assert q.net.conv1.freeze_bn and not q.net.conv1.bn.training
    assert fq.observer_enabled.item() == 1
    hook(q, 2)
    q.train()  # engine.fit calls train() every epoch: the frozen state must survive it
    assert fq.observer_enabled.item() == 0 and not q.net.conv1.bn.training
    with torch.no_grad():
        q(images(8) * 50)
    assert torch.equal(fq.scale, scale)


def test_export_feeds_every_conv_from_dequantize_with_int8_weights(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    producer = {out: n for n in graph.node for out in n.output}
    inits = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == N_CONVS and not any(n.op_type == "BatchNormalization" for n in graph.node)
    for conv in convs:
        x, w, b = (producer[name] for name in conv.input)
        assert x.op_type == w.op_type == b.op_type == "DequantizeLinear", conv.name
        assert inits[w.input[0]].data_type == onnx.TensorProto.INT8
        assert inits[b.input[0]].data_type == onnx.TensorProto.INT32
        weights = numpy_helper.to_array(inits[w.input[0]])
        assert weights.min() >= -64 and weights.max() <= 63  # 7-bit for x86 (no int16 saturation)
    report = onnx_int8.int8_kernel_report(path)
    assert report["all_convs_int8"] and report["float_convs"] == 0
    assert report["int8_convs"] == N_CONVS, report["op_types"]
    # shipped without the module paths as names (~13 % of a small INT8 file)
    assert all(name.startswith("t") and name[1:].isdigit() for name in inits)


def test_onnx_runs_what_pytorch_qat_computes(exported):
    q, path = exported
    x = images(256, seed=3)
    with torch.no_grad():
        torch_logits = q.eval()(x).numpy()
    onnx_logits = run_onnx(make_session(path), x)
    # Same scales and grids on both sides, so differences are rounding ties (float accumulation
    # order, int32 bias) flipping one quantization step now and then: a few output steps at most.
    output_step = q.net.fc.activation_post_process.scale.item()
    assert (torch_logits.argmax(1) == onnx_logits.argmax(1)).mean() >= 0.9
    assert np.abs(torch_logits - onnx_logits).mean() <= 2 * output_step


def test_export_check_records_the_numbers_and_names_a_failed_test(tmp_path, exported):
    q, _ = exported
    x, y = (
        images(64, seed=7),
        torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(7)),
    )
    metrics = qat_export.export_qat_checked(
        q,
        tmp_path / "q.onnx",
        x,
        y,
        opset=17,
        threads=1,
        min_agreement=1.01,
        val_top1=50.0,
        fp32_metrics={"a": 1},
    )
    assert list(metrics) == [
        "torch_top1",
        "onnx_top1",
        "top1_diff_pp",
        "agreement",
        "val_top1",
        "size_mb",
        "kernels",
        "fp32_metrics",
        "passed",
        "problems",
    ]  # metrics.json's order
    assert metrics["kernels"]["all_convs_int8"] and not metrics["passed"]
    assert len(metrics["problems"]) == 1 and "qat.min_agreement=1.01" in metrics["problems"][0]
    assert (tmp_path / "q.onnx").is_file()  # the stage, not the check, deletes a rejected file


def test_float_convs_are_reported(tmp_path):
    """The check can fail: an FP32 export, and a QAT model exported without folding BN (Conv+BN
    stay float; qnnpack's 8-bit weights, as the exporter rejects x86's 7-bit fake quants)."""
    export_onnx(fp32_model(), tmp_path / "fp32.onnx", image_size=SIZE, opset=17)
    q = qat.prepare_qat_model(fp32_model(), backend="qnnpack")
    qat.calibrate(q, images(32))
    export_onnx(q, tmp_path / "unfolded.onnx", image_size=SIZE, opset=17)
    model = onnx.load(str(tmp_path / "unfolded.onnx"))
    onnx_int8.store_int8(model.graph)  # same int8 storage as export_qat_onnx, only BN is not folded
    onnx.save(model, str(tmp_path / "unfolded.onnx"))
    for name in ("fp32", "unfolded"):
        report = onnx_int8.int8_kernel_report(tmp_path / f"{name}.onnx")
        assert not report["all_convs_int8"] and report["float_convs"] == N_CONVS, name


def test_pruned_architecture_quantizes_and_exports(tmp_path):
    channels = channel_record(fp32_model())
    for block, inner in (("layer1.0", 5), ("layer2.1", 11), ("layer3.0", 24), ("layer4.1", 40)):
        channels[f"{block}.conv1"][0] = inner
        channels[f"{block}.bn1"] = [inner]
        channels[f"{block}.conv2"][1] = inner
    fp32 = fp32_model(channels)
    assert fp32.layer3[0].conv1.out_channels == 24
    q = calibrated(fp32)
    qat_export.export_qat_onnx(q, tmp_path / "pruned.onnx", image_size=SIZE)
    report = onnx_int8.int8_kernel_report(tmp_path / "pruned.onnx")
    assert report["all_convs_int8"] and report["int8_convs"] == N_CONVS
    x = images(128, seed=4)
    with torch.no_grad():
        agree = q.eval()(x).argmax(1).numpy() == run_onnx(
            make_session(tmp_path / "pruned.onnx"), x
        ).argmax(1)
    assert agree.mean() >= 0.9


def test_empty_calibration_and_uncalibrated_export_are_user_errors(tmp_path):
    q = qat.prepare_qat_model(fp32_model(), backend="x86")
    with pytest.raises(UserError, match="calibration set is empty"):
        qat.calibrate(q, torch.empty(0, 3, SIZE, SIZE))
    with pytest.raises(UserError, match="calibrate"):
        qat_export.export_qat_onnx(q, tmp_path / "x.onnx", image_size=SIZE)
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(UserError, match="empty"):
        qat.eager_ptq_int8(fp32_model(), torch.empty(0, 3, SIZE, SIZE))
    with pytest.raises(UserError, match="backend"):
        qat.prepare_qat_model(fp32_model(), backend="nope")


def test_qat_checkpoint_reloads_with_weights_only(tmp_path, exported):
    q, _ = exported
    arch = make_arch(name="resnet18", num_classes=10, width=8, small_input=True)
    save_checkpoint(tmp_path / "qat.pt", model=q, arch=arch, params={"backend": "x86"}, metrics={})
    again = qat.load_qat_model(load_checkpoint(tmp_path / "qat.pt"))
    x = images(16, seed=5)
    with torch.no_grad():
        assert torch.equal(q.eval()(x), again.eval()(x))


def test_eager_ptq_baseline_is_int8_and_mostly_agrees_with_fp32():
    fp32 = fp32_model()
    quantized = qat.eager_ptq_int8(fp32, images(128), backend="x86")
    assert isinstance(quantized.net.layer1[0].conv1, nniq.ConvReLU2d)
    x = images(256, seed=6)
    with torch.no_grad():
        agree = (fp32(x).argmax(1) == quantized(x).argmax(1)).float().mean().item()
    assert agree >= 0.8  # random logits are close together; a broken model agrees ~0.1
    timing = torch_latency_ms(quantized, x[:1], threads=1, warmup=2, runs=10)
    assert 0 < timing["p50_ms"] <= timing["p99_ms"]


def run_stage(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_qat_and_torch_ptq_stages_end_to_end(tmp_path, tiny_prepared):
    torch.manual_seed(0)
    arch = make_arch(name="resnet18", num_classes=10, width=8, small_input=True)
    save_checkpoint(tmp_path / "fp32.pt", model=build_model(arch), arch=arch, params={}, metrics={})
    params = write_params(
        tmp_path / "params.yaml",
        base={"threads": 1},
        qat={"epochs": 1, "batch_size": 32, "calibration_images": 32, "min_agreement": 0.9},
        ptq={"calibration_images": 32},
        benchmark={"warmup": 2, "rounds": 5, "runs_per_round": 1},
    )
    common = ["--params", str(params), "--data", str(tiny_prepared)]
    result = run_stage(
        "qat.py",
        "--checkpoint",
        "fp32.pt",
        "--onnx",
        "qat.onnx",
        "--out",
        "qat.pt",
        "--reports",
        "rq",
        *common,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "rq" / "metrics.json").read_text())
    assert metrics["passed"] and metrics["kernels"]["all_convs_int8"] and metrics["size_mb"] > 0
    assert metrics["agreement"] >= 0.9
    assert isinstance(qat.load_qat_model(load_checkpoint(tmp_path / "qat.pt")), qat.QuantReady)
    result = run_stage("torch_ptq.py", "fp32.pt", "--out", "tp.json", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "tp.json").read_text())
    assert 0 <= report["top1"] <= 100 and report["p50_ms"] > 0 and report["size_mb"] > 0


def test_qat_refuses_a_non_resnet_with_a_clear_message():
    from resnet_slim.train.models import build_model, make_arch

    mobilenet = build_model(make_arch(name="mobilenet_v3_small", num_classes=10, width=16))
    with pytest.raises(UserError, match="QAT supports the ResNet family; got MobileNetV3Small"):
        qat.prepare_qat_model(mobilenet, backend="x86")
