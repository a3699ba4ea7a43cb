"""Benchmark ONNX files on onnxruntime CPU: latency percentiles, throughput, size, peak memory,
accuracy on the test split, and a fingerprint of the hardware the numbers came from.

Timing wraps only `session.run`, after a warm-up that is discarded (as airbench does).
Peak memory is measured in a fresh child process that only loads the model and runs it, so the
number is what a deployment process would need, not what this benchmarking process holds.
"""

import io
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch

from resnet_slim.errors import UserError
from resnet_slim.export import check_input_size, make_session, run_onnx, torch_logits
from resnet_slim.io import read_json, sha256_file
from resnet_slim.limits import usable_cores
from resnet_slim.params import BenchmarkParams
from resnet_slim.stats import bootstrap_accuracy_ci, correct_from_counts


def time_ms(call: Callable[[], object], *, warmup: int, runs: int) -> np.ndarray:
    """Milliseconds of each of `runs` calls, after `warmup` calls that are discarded: every
    latency here (onnxruntime, PyTorch, the roofline's conv chains) is timed by this loop."""
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        call()
        times[i] = time.perf_counter() - start
    return times * 1000.0


def percentiles_ms(times: np.ndarray) -> dict:
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p90_ms": float(np.percentile(times, 90)),
        "p99_ms": float(np.percentile(times, 99)),
        "mean_ms": float(times.mean()),
    }


def latency_ms(session: ort.InferenceSession, image: np.ndarray, *, warmup: int, runs: int) -> dict:
    """Batch-1 latency percentiles of an onnxruntime (or session-like) model."""
    feed = {session.get_inputs()[0].name: image}
    return percentiles_ms(time_ms(lambda: session.run(None, feed), warmup=warmup, runs=runs))


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


def accuracy_with_ci(predictions: np.ndarray, labels, p: BenchmarkParams) -> dict:
    """top1 plus its bootstrap CI over test images (the seed is fixed, so reruns agree)."""
    ci = bootstrap_accuracy_ci(
        np.asarray(predictions) == np.asarray(labels),
        level=p.ci_level,
        resamples=p.bootstrap_resamples,
        seed=p.bootstrap_seed,
    )
    return {
        "top1": ci["top1"],
        "top1_ci_low": ci["ci_low"],
        "top1_ci_high": ci["ci_high"],
        "ci_level": p.ci_level,
    }


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


def benchmark_model(
    path: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: BenchmarkParams,
    *,
    num_classes: int | None = None,
) -> dict:
    """Every number for one ONNX file. `images` are the normalised test split.

    "predictions" (the class per test image) is for the paired statistics, not for benchmark.json.
    "sha256" names the bytes measured: the gate refuses the numbers once the file differs.
    """
    image_size = images.shape[-1]
    digest = sha256_file(path) if Path(path).is_file() else None  # else make_session says why
    session = make_session(path, threads=p.threads)
    check_input_size(session, image_size, path)
    one = images[:1].numpy()
    batch = images[: p.throughput_batch].numpy()
    logits = run_onnx(session, images)
    check_class_scores(logits, n_images=len(labels), num_classes=num_classes, path=path)
    predictions = logits.argmax(1)
    result = {
        **accuracy_with_ci(predictions, labels.numpy(), p),
        "n_test": int(len(labels)),
        **onnx_stats(path),
        "predictions": predictions,
    }
    result.update(latency_ms(session, one, warmup=p.warmup, runs=p.runs))
    cores = usable_cores()
    if p.all_cores and cores != p.threads:
        every_core = make_session(path, threads=cores)
        result["p50_ms_all_cores"] = latency_ms(
            every_core, one, warmup=p.warmup, runs=max(1, p.runs // 3)
        )["p50_ms"]
        result["all_cores"] = cores
    result["throughput_ips"] = throughput(session, batch)
    result["throughput_batch"] = int(len(batch))
    result.update(peak_rss_mb(path, threads=p.threads, image_size=image_size))
    result["threads"] = p.threads
    if sha256_file(path) != digest:
        raise UserError(f"{path}: the file changed while it was being benchmarked; re-run")
    result["sha256"] = digest
    return result


def read_object(path: str | Path, what: str) -> dict:
    """A JSON file that must hold an object (a row, a report), else a UserError naming it."""
    obj = read_json(path, what=what)
    if not isinstance(obj, dict):
        raise UserError(
            f"{path}: {what} is a JSON {type(obj).__name__}, not an object; re-run the "
            f"stage that writes it"
        )
    return obj


def torch_rows(paths: list[str], p: BenchmarkParams) -> dict[str, dict]:
    """torch_ptq reports (PyTorch eager INT8, the in-framework baseline) as benchmark rows."""
    rows = {}
    for path in paths:
        report = read_object(path, "torch_ptq report")
        rows[f"{Path(path).stem}_torch_eager_int8"] = {
            "file": path,
            "runtime": "pytorch",
            "top1": report.get("top1"),
            **accuracy_ci_from_counts(report.get("top1"), report.get("n_test"), p),
            "n_test": report.get("n_test"),
            "size_mb": report.get("size_mb"),
            **{k: report.get(k) for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "threads")},
            "peak_rss_mb": report.get("process_peak_rss_mb"),
        }
    return rows


def target_rows(path: str | Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(rows measured by export_targets in their own runtimes, the targets it could not build)."""
    models = read_object(path, "deployment targets").get("models") or {}
    if not isinstance(models, dict):
        raise UserError(f"{path}: 'models' is not an object; re-run export_targets")
    rows = {
        n: r for n, r in models.items() if isinstance(r, dict) and r.get("status") != "unavailable"
    }
    unavailable = {
        n: {k: r.get(k) for k in ("target", "role", "source", "reason")}
        for n, r in models.items()
        if isinstance(r, dict) and r.get("status") == "unavailable"
    }
    return rows, unavailable


def target_predictions(path: str | Path, labels: np.ndarray) -> pd.DataFrame:
    """export_targets' per-image classes, one column per target, checked to be this test split's."""
    try:
        extra = pd.read_csv(path)
    except (
        FileNotFoundError,
        pd.errors.ParserError,
        pd.errors.EmptyDataError,
        UnicodeDecodeError,
        OSError,
    ) as err:
        raise UserError(
            f"{path}: target predictions are missing or not a readable CSV "
            f"({err.__class__.__name__}); re-run export_targets"
        ) from None
    if (
        "label" not in extra.columns
        or len(extra) != len(labels)
        or (extra["label"].to_numpy() != labels).any()
    ):
        raise UserError(f"{path}: predictions are for another test split; re-run export_targets")
    columns = extra.drop(columns=["image", "label"], errors="ignore")
    bad = [c for c in columns if not pd.api.types.is_integer_dtype(columns[c])]
    if bad:
        raise UserError(f"{path}: columns {bad} are not whole class numbers; re-run export_targets")
    return columns


def benchmark_rows(
    models_dir: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: BenchmarkParams,
    *,
    image_ids: list[str],
    num_classes: int,
    torch_results: list[str],
    targets: str | None,
    targets_predictions: str | None,
) -> tuple[dict[str, dict], pd.DataFrame, dict[str, dict]]:
    """(benchmark.json's rows, the class each row predicted per test image, the targets that
    export_targets could not build).

    Rows: each benchmark.models name measured here (<models_dir>/<name>.onnx on onnxruntime),
    then those other stages measured on the same split and settings: torch_ptq's PyTorch eager
    INT8 reports, export_targets' runtimes and peers. Each row records its file's sha256.
    """
    rows, unavailable = {}, {}
    predictions = pd.DataFrame({"image": image_ids, "label": labels.numpy()})
    for name in p.models:
        path = (Path(models_dir) / f"{name}.onnx").as_posix()
        rows[name] = {
            "file": path,
            "runtime": "onnxruntime",
            **benchmark_model(path, images, labels, p, num_classes=num_classes),
        }
        predictions[name] = rows[name].pop("predictions")
        r = rows[name]
        print(
            f"benchmark: {name:24s} top-1 {r['top1']:6.2f}% [{r['top1_ci_low']:.1f}, "
            f"{r['top1_ci_high']:.1f}]  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
            f"{r['size_mb']:7.2f} MB  peak RSS {r['peak_rss_mb']:.0f} MB"
        )
    rows.update(torch_rows(torch_results, p))
    if targets:
        target, unavailable = target_rows(targets)
        rows.update(target)
        if targets_predictions:
            for name, column in target_predictions(targets_predictions, labels.numpy()).items():
                predictions[name] = column
    for r in rows.values():  # what each row was measured from (the ONNX rows have it already)
        if "sha256" not in r and isinstance(r.get("file"), str) and Path(r["file"]).is_file():
            r["sha256"] = sha256_file(r["file"])
    return rows, predictions, unavailable


def results_table(rows: dict[str, dict]) -> pd.DataFrame:
    """benchmark.csv: one row per model, numbers to 4 decimals, no op lists or parity records."""
    table = pd.DataFrame.from_dict(rows, orient="index")
    return table.drop(columns=["onnx_ops", "parity"], errors="ignore").round(4)


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, its feature flags) from /proc/cpuinfo; empty flags elsewhere."""
    cpu_model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", "", "x86_64"):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    return cpu_model, flags


def has_int8_dot_product() -> bool:
    """VNNI (AVX-512 or AVX) accumulates u8*s8 products in int32; without it x86 uses int16
    pairs."""
    _, flags = cpu_info()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def hardware_fingerprint() -> dict:
    """Where the numbers were measured: CPU model, cores, the SIMD flags INT8 speed depends on."""
    cpu_model, flags = cpu_info()
    return {
        "cpu": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx_vnni": "avx_vnni" in flags,
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def run_benchmark(
    models_dir,
    data_dir,
    params,
    *,
    out,
    table,
    predictions,
    targets=None,
    targets_predictions=None,
    torch_results=(),
) -> tuple[list, dict | None]:
    """The benchmark stage: measure every model of benchmark.models on the test split, then write
    the predictions, the table and (last, recording the others' sha256) benchmark.json together.

    Returns (files written, the roofline's conv peak or None)."""
    from resnet_slim.data import load_meta, normalized_split
    from resnet_slim.evidence import test_ids, test_split_record
    from resnet_slim.io import write_together
    from resnet_slim.quant import resolve_reduce_range
    from resnet_slim.roofline import add_efficiency

    p = params.benchmark
    images, labels = normalized_split(data_dir, "test")
    split = test_split_record(data_dir)  # before measuring: a split changed meanwhile is refused
    rows, per_image, unavailable = benchmark_rows(
        models_dir,
        images,
        labels,
        p,
        image_ids=test_ids(data_dir, labels.numpy()),
        num_classes=len(load_meta(data_dir)["class_names"]),
        torch_results=torch_results,
        targets=targets,
        targets_predictions=targets_predictions,
    )
    summary = {
        "models": rows,
        "unavailable_targets": unavailable,
        "test_split": split,
        "hardware": hardware_fingerprint(),
    }
    peak = None
    if p.roofline:  # how far each model is from this CPU's conv throughput
        peak = summary["roofline"] = add_efficiency(
            rows, threads=p.threads, reduce_range=resolve_reduce_range(params.ptq.reduce_range)
        )
    if test_split_record(data_dir) != split:
        raise UserError(
            f"{data_dir}: the test split changed while it was being benchmarked; re-run"
        )
    # interrupted part-way, the InterruptedWrite says what was replaced (run_stage prints it)
    written = write_together(
        {
            "predictions": (predictions, lambda tmp: per_image.to_csv(tmp, index=False)),
            "table": (table, lambda tmp: results_table(rows).to_csv(tmp, index_label="model")),
        },
        record=out,
        content=summary,
    )
    return written, peak
