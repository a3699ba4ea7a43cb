"""Benchmark one model file on onnxruntime CPU (or in PyTorch): latency percentiles, throughput,
size, peak memory and accuracy on the test split. The benchmark stage that gathers every model's
row, times them side by side and records the hardware is resnet_slim/measure/bench_stage.py.

Timing wraps only `session.run`, after a warm-up that is discarded (as airbench does).
Peak memory is measured in a fresh child process that only loads the model and runs it, so the
number is what a deployment process would need, not what this benchmarking process holds.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from resnet_slim.compress.export import check_input_size, make_session, run_onnx, torch_logits
from resnet_slim.data.loader import check_finite_images
from resnet_slim.errors import UserError
from resnet_slim.io import sha256_file
from resnet_slim.measure.timing import percentiles_ms, time_ms
from resnet_slim.params import BenchmarkParams
from resnet_slim.stats import accuracy_with_ci, correct_from_counts


@torch.inference_mode()
def torch_latency_ms(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    threads: int = 1,
    warmup: int = 50,
    runs: int = 300,
) -> dict:
    """The same percentiles for `model(image)` in PyTorch, on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.eval()
        times = time_ms(lambda: model(image), warmup=warmup, runs=runs)
    finally:
        torch.set_num_threads(previous)
    return percentiles_ms(times)


def throughput(session: ort.InferenceSession, batch: np.ndarray, *, runs: int = 5) -> float:
    """Images per second at a larger batch (best of `runs`, after one warm-up run)."""
    feed = {session.get_inputs()[0].name: batch}
    best_ms = time_ms(lambda: session.run(None, feed), warmup=1, runs=runs).min()
    return len(batch) / (best_ms / 1000.0)


_RSS_PROBE = """
import json, sys, numpy as np, onnxruntime as ort
def hwm_kb():  # VmHWM: this process's own peak RSS (ru_maxrss would include the parent's, via fork)
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
base = hwm_kb()
o = ort.SessionOptions(); o.intra_op_num_threads = int(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])
x = np.zeros((1, 3, int(sys.argv[3]), int(sys.argv[3])), np.float32)
for _ in range(10):
    s.run(None, {s.get_inputs()[0].name: x})
print(json.dumps([base, hwm_kb()]))
"""


def peak_rss_mb(path: str | Path, *, threads: int, image_size: int) -> dict:
    """Peak resident memory of a fresh process that imports onnxruntime, loads, and runs the model.

    Also reports that process's peak before loading the model (the runtime's own share).
    """
    result = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path), str(threads), str(image_size)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise UserError(f"{path}: the memory probe process failed: {result.stderr.strip()[-300:]}")
    base_kb, peak_kb = json.loads(result.stdout.strip().splitlines()[-1])
    return {"peak_rss_mb": peak_kb / 1024.0, "runtime_rss_mb": base_kb / 1024.0}


def onnx_stats(path: str | Path) -> dict:
    """File size, parameter count, default-domain opset and the op types in the file (before
    ORT's optimisation)."""
    model = onnx.load(str(path))
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    ops = sorted({node.op_type for node in model.graph.node})
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "size_mb": Path(path).stat().st_size / 1e6,
        "params": n_params,
        "opset": opset,
        "onnx_ops": ops,
    }


def top1(session: ort.InferenceSession, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = run_onnx(session, images)
    return float(100.0 * (logits.argmax(1) == labels.numpy()).mean())


def torch_top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 % of a PyTorch model (engine.evaluate's float32 mean, so the numbers match it)."""
    logits = torch.from_numpy(torch_logits(model, images))
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def state_dict_mb(model: torch.nn.Module) -> float:
    """Size of the model's state_dict as torch.save writes it (packed int8 weights included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue()) / 1e6


def process_peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM); None where there is no /proc."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    line = next(row for row in status.read_text().splitlines() if row.startswith("VmHWM"))
    return int(line.split()[1]) / 1024.0


def accuracy_ci_from_counts(top1_pct, n_test, p: BenchmarkParams) -> dict:
    """The same CI for a model known only by (top-1 %, n): one model's bootstrap needs no more."""
    if (
        isinstance(top1_pct, bool)
        or not isinstance(top1_pct, (int, float))
        or not isinstance(n_test, int)
        or n_test <= 0
    ):
        return {}
    n_correct = round(top1_pct * n_test / 100.0)
    return accuracy_with_ci(correct_from_counts(n_correct, n_test), np.ones(n_test, bool), p)


def check_class_scores(logits: np.ndarray, *, n_images: int, num_classes: int | None, path) -> None:
    """One row of class scores per test image, one score per class of the dataset (when known)."""
    if (
        logits.ndim != 2
        or len(logits) != n_images
        or (num_classes is not None and logits.shape[1] != num_classes)
    ):
        wanted = (
            f"({n_images}, {num_classes})" if num_classes is not None else f"({n_images}, classes)"
        )
        raise UserError(
            f"{path}: outputs {tuple(logits.shape)} for {n_images} test images, not "
            f"{wanted} class scores; is it a classifier for this dataset?"
        )


def check_finite_scores(logits: np.ndarray, *, path) -> None:
    """Every test image gets finite class scores: a NaN row's argmax is class 0, so a broken
    model would otherwise be scored (at the share of class-0 images) without a word."""
    bad = int((~np.isfinite(logits).all(axis=tuple(range(1, logits.ndim)))).sum())
    if bad:
        raise UserError(
            f"{path}: the model outputs non-finite (NaN/inf) logits for {bad} of "
            f"{len(logits)} test images, so it cannot be scored; its weights are broken "
            f"(diverged training or a corrupt file)"
        )


def benchmark_model(
    path: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: BenchmarkParams,
    *,
    num_classes: int | None = None,
) -> dict:
    """Every number for one ONNX file but its latency, which `time_rows` measures side by side
    with the other models. `images` are the normalised test split.

    "predictions" (the class per test image) is for the paired statistics, not for benchmark.json.
    "sha256" names the bytes measured: the gate refuses the numbers once the file differs.
    """
    check_finite_images(images, what="normalised test images")
    image_size = images.shape[-1]
    digest = sha256_file(path) if Path(path).is_file() else None  # else make_session says why
    session = make_session(path, threads=p.threads)
    check_input_size(session, image_size, path)
    batch = images[: p.throughput_batch].numpy()
    logits = run_onnx(session, images)
    check_class_scores(logits, n_images=len(labels), num_classes=num_classes, path=path)
    check_finite_scores(logits, path=path)
    predictions = logits.argmax(1)
    result = {
        **accuracy_with_ci(predictions, labels.numpy(), p),
        "n_test": int(len(labels)),
        **onnx_stats(path),
        "predictions": predictions,
        "throughput_ips": throughput(session, batch),
        "throughput_batch": int(len(batch)),
        **peak_rss_mb(path, threads=p.threads, image_size=image_size),
        "threads": p.threads,
        "sha256": digest,
    }
    return result
