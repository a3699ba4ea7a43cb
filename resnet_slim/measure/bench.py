"""Benchmark ONNX files on onnxruntime CPU: latency percentiles, throughput, size, peak memory,
accuracy on the test split, and a fingerprint of the hardware the numbers came from.

Timing wraps only `session.run`, after a warm-up that is discarded (as airbench does).
Peak memory is measured in a fresh child process that only loads the model and runs it, so the
number is what a deployment process would need, not what this benchmarking process holds.
"""

import io
import json
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch

from resnet_slim.compress.export import check_input_size, make_session, run_onnx, torch_logits
from resnet_slim.data.loader import check_finite_images
from resnet_slim.errors import UserError
from resnet_slim.hardware import hardware_fingerprint
from resnet_slim.io import read_json, sha256_file
from resnet_slim.limits import usable_cores
from resnet_slim.measure.timing import percentiles_ms, rounds_summary, time_in_rounds, time_ms
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


def open_timed_session(row: dict, *, threads: int, open_other: Callable | None = None):
    """A session on `threads` threads for a benchmark row, in the row's own runtime: onnxruntime
    here, another runtime through `open_other(runtime, file, threads=)` (the stage passes
    targets.open_target_session). None for a row that cannot be re-opened (PyTorch eager INT8:
    torch_ptq timed it alone), which keeps the latency it came with."""
    runtime = str(row.get("runtime", ""))
    if runtime == "onnxruntime":
        return make_session(row["file"], threads=threads)
    if open_other is not None and runtime != "pytorch":
        return open_other(runtime, row["file"], threads=threads)
    return None


def time_rows(
    rows: dict[str, dict], image: np.ndarray, p: BenchmarkParams, *, open_other=None
) -> dict:
    """Time every row this stage can open side by side, in shuffled rounds (timing.time_in_rounds):
    batch 1 at benchmark.threads, then (all_cores) again with every usable core. Adds each row's
    percentiles, per-round medians and noise; returns the record of how they were timed."""
    sessions = {
        n: open_timed_session(r, threads=p.threads, open_other=open_other) for n, r in rows.items()
    }
    sessions = {n: s for n, s in sessions.items() if s is not None}
    times, orders = _time_sessions(sessions, image, p, runs_per_round=p.runs_per_round)
    timed, sessions = list(sessions), None  # closed before the every-core sessions open (memory)
    for name, t in times.items():
        rows[name].update(rounds_summary(t), threads=p.threads, timed="interleaved rounds")
    record = {
        "models": timed,
        "rounds": p.rounds,
        "runs_per_round": p.runs_per_round,
        "warmup": p.warmup,
        "round_warmup": p.round_warmup,
        "order_seed": p.order_seed,
        "orders": orders,
    }
    cores = usable_cores()
    if p.all_cores and cores != p.threads:  # the server setting: fewer runs, the same rounds
        runs = max(1, p.runs_per_round // 3)
        every_core = {
            n: open_timed_session(rows[n], threads=cores, open_other=open_other) for n in timed
        }
        times, _ = _time_sessions(every_core, image, p, runs_per_round=runs)
        for name, t in times.items():
            summary = rounds_summary(t)
            rows[name].update(
                p50_ms_all_cores=summary["p50_ms"],
                round_p50_ms_all_cores=summary["round_p50_ms"],
                all_cores=cores,
            )
        record.update(all_cores=cores, all_cores_runs_per_round=runs)
    return record


def _time_sessions(sessions: dict, image: np.ndarray, p: BenchmarkParams, *, runs_per_round: int):
    calls = {
        name: partial(session.run, None, {session.get_inputs()[0].name: image})
        for name, session in sessions.items()
    }
    return time_in_rounds(
        calls,
        rounds=p.rounds,
        runs_per_round=runs_per_round,
        warmup=p.warmup,
        round_warmup=p.round_warmup,
        seed=p.order_seed,
    )


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
    open_other: Callable | None = None,
) -> tuple[dict[str, dict], pd.DataFrame, dict[str, dict], dict]:
    """(benchmark.json's rows, the class each row predicted per test image, the targets that
    export_targets could not build, how the rows were timed).

    Rows: each benchmark.models name measured here (<models_dir>/<name>.onnx on onnxruntime),
    then those other stages measured on the same split and settings: torch_ptq's PyTorch eager
    INT8 reports, export_targets' runtimes and peers. Each row records its file's sha256. Every
    row whose runtime this stage can open (onnxruntime, OpenVINO, LiteRT) is then timed here, side
    by side with the others (`time_rows`): export_targets' own timings are replaced, so each ratio
    compares models timed in the same rounds.
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
    timing = time_rows(rows, images[:1].numpy(), p, open_other=open_other)
    for name in p.models:
        r = rows[name]
        if sha256_file(r["file"]) != r["sha256"]:
            raise UserError(f"{r['file']}: the file changed while it was being benchmarked; re-run")
        print(
            f"benchmark: {name:24s} top-1 {r['top1']:6.2f}% [{r['top1_ci_low']:.1f}, "
            f"{r['top1_ci_high']:.1f}]  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
            f"{r['size_mb']:7.2f} MB  peak RSS {r['peak_rss_mb']:.0f} MB  "
            f"round CV {r['round_cv']:.1%}"
        )
    return rows, predictions, unavailable, timing


def results_table(rows: dict[str, dict]) -> pd.DataFrame:
    """benchmark.csv: one row per model, numbers to 4 decimals, no op lists, parity records or
    per-round times (benchmark.json has those)."""
    table = pd.DataFrame.from_dict(rows, orient="index")
    lists = ["onnx_ops", "parity", "round_p50_ms", "round_p50_ms_all_cores"]
    return table.drop(columns=lists, errors="ignore").round(4)


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
    open_other=None,
) -> tuple[list, dict | None]:
    """The benchmark stage: measure every model of benchmark.models on the test split, then write
    the predictions, the table and (last, recording the others' sha256) benchmark.json together.

    Returns (files written, the roofline's conv peak or None)."""
    from resnet_slim.compress.quant import resolve_reduce_range
    from resnet_slim.data.loader import load_meta, normalized_split
    from resnet_slim.io import write_together
    from resnet_slim.measure.evidence import test_ids, test_split_record
    from resnet_slim.measure.roofline import add_efficiency

    p = params.benchmark
    images, labels = normalized_split(data_dir, "test")
    split = test_split_record(data_dir)  # before measuring: a split changed meanwhile is refused
    rows, per_image, unavailable, timing = benchmark_rows(
        models_dir,
        images,
        labels,
        p,
        image_ids=test_ids(data_dir, labels.numpy()),
        num_classes=len(load_meta(data_dir)["class_names"]),
        torch_results=torch_results,
        targets=targets,
        targets_predictions=targets_predictions,
        open_other=open_other,
    )
    summary = {
        "models": rows,
        "unavailable_targets": unavailable,
        "timing": timing,
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
