"""The benchmark stage: every model's row, measured on one test split and timed side by side.

Rows come from this stage's own ONNX files (resnet_slim.measure.bench), torch_ptq's PyTorch eager
INT8 reports and export_targets' other runtimes. Every row this stage can open is timed here in
shuffled rounds; benchmark.json, written last, records the sha256 of the other outputs and of
every model file, and the hardware the numbers came from.
"""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from resnet_slim.compress.export import make_session
from resnet_slim.compress.quant import resolve_reduce_range
from resnet_slim.data.loader import load_meta, normalized_split
from resnet_slim.errors import UserError
from resnet_slim.hardware import hardware_fingerprint
from resnet_slim.io import read_json, sha256_file, write_together
from resnet_slim.limits import usable_cores
from resnet_slim.measure.bench import accuracy_ci_from_counts, benchmark_model
from resnet_slim.measure.evidence import test_ids, test_split_record
from resnet_slim.measure.latency_check import check_predictions
from resnet_slim.measure.roofline import add_efficiency
from resnet_slim.measure.timing import rounds_summary, time_in_rounds
from resnet_slim.params import BenchmarkParams, PtqParams


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
    rows, predictions = onnx_rows(
        models_dir, images, labels, p, image_ids=image_ids, num_classes=num_classes
    )
    rows.update(torch_rows(torch_results, p))
    unavailable = {}
    if targets:
        unavailable = add_target_rows(rows, predictions, targets, targets_predictions, labels)
    record_file_hashes(rows)
    timing = time_rows(rows, images[:1].numpy(), p, open_other=open_other)
    report_onnx_rows(rows, p.models)
    return rows, predictions, unavailable, timing


def onnx_rows(
    models_dir: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    p: BenchmarkParams,
    *,
    image_ids: list[str],
    num_classes: int,
) -> tuple[dict[str, dict], pd.DataFrame]:
    """(a row per benchmark.models name, measured from <models_dir>/<name>.onnx on onnxruntime,
    the per-image predictions table with their columns): the rows this stage measures itself."""
    rows = {}
    predictions = pd.DataFrame({"image": image_ids, "label": labels.numpy()})
    for name in p.models:
        path = (Path(models_dir) / f"{name}.onnx").as_posix()
        rows[name] = {
            "file": path,
            "runtime": "onnxruntime",
            **benchmark_model(path, images, labels, p, num_classes=num_classes),
        }
        predictions[name] = rows[name].pop("predictions")
    return rows, predictions


def add_target_rows(
    rows: dict[str, dict],
    predictions: pd.DataFrame,
    targets: str | Path,
    targets_predictions: str | Path | None,
    labels: torch.Tensor,
) -> dict[str, dict]:
    """Add export_targets' rows to `rows` and their per-image classes to `predictions`, so they
    are timed and compared beside this stage's own; returns the targets it could not build."""
    target, unavailable = target_rows(targets)
    rows.update(target)
    if targets_predictions:
        for name, column in target_predictions(targets_predictions, labels.numpy()).items():
            predictions[name] = column
    return unavailable


def record_file_hashes(rows: dict[str, dict]) -> None:
    """Record the sha256 of what each row was measured from (the ONNX rows have it already), so
    the gate refuses the numbers once a file differs."""
    for r in rows.values():
        if "sha256" not in r and isinstance(r.get("file"), str) and Path(r["file"]).is_file():
            r["sha256"] = sha256_file(r["file"])


def report_onnx_rows(rows: dict[str, dict], names: list[str]) -> None:
    """Check each ONNX file is still the one measured (timing took a while), and print its row."""
    for name in names:
        r = rows[name]
        if sha256_file(r["file"]) != r["sha256"]:
            raise UserError(f"{r['file']}: the file changed while it was being benchmarked; re-run")
        print(
            f"benchmark: {name:24s} top-1 {r['top1']:6.2f}% [{r['top1_ci_low']:.1f}, "
            f"{r['top1_ci_high']:.1f}]  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
            f"{r['size_mb']:7.2f} MB  peak RSS {r['peak_rss_mb']:.0f} MB  "
            f"round CV {r['round_cv']:.1%}"
        )


def results_table(rows: dict[str, dict]) -> pd.DataFrame:
    """benchmark.csv: one row per model, numbers to 4 decimals, no op lists, parity records or
    per-round times (benchmark.json has those)."""
    table = pd.DataFrame.from_dict(rows, orient="index")
    lists = ["onnx_ops", "parity", "round_p50_ms", "round_p50_ms_all_cores"]
    return table.drop(columns=lists, errors="ignore").round(4)


def run_benchmark(
    models_dir,
    data_dir,
    p: BenchmarkParams,
    ptq: PtqParams,
    *,
    targets=None,
    targets_predictions=None,
    torch_results=(),
    open_other=None,
    latency_table: dict | None = None,
) -> tuple[list, dict | None]:
    """The benchmark stage's work: measure every model of benchmark.models on the test split
    (and, given the latency table, check its prediction for every model it describes).

    Returns (the benchmark.json content, the per-image predictions, the roofline's conv peak or
    None); the stage writes them with `write_benchmark`."""
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
    peak = add_roofline(summary, p, ptq) if p.roofline else None
    if latency_table is not None:
        summary["latency_model"] = check_predictions(
            rows, models_dir, latency_table, image_size=load_meta(data_dir)["image_size"]
        )
    if test_split_record(data_dir) != split:
        raise UserError(
            f"{data_dir}: the test split changed while it was being benchmarked; re-run"
        )
    return summary, per_image, peak


def add_roofline(summary: dict, p: BenchmarkParams, ptq: PtqParams) -> dict:
    """Add how far each model is from this CPU's conv throughput (to its row) and the measured
    conv peak (to `summary`, as "roofline"); returns the peak."""
    peak = summary["roofline"] = add_efficiency(
        summary["models"], threads=p.threads, reduce_range=resolve_reduce_range(ptq.reduce_range)
    )
    return peak


def write_benchmark(
    summary: dict, per_image: pd.DataFrame, *, out, table, predictions
) -> list[Path]:
    """Write the predictions, the table and (last, recording the others' sha256) benchmark.json
    together; returns the files written."""
    rows = summary["models"]
    # interrupted part-way, the InterruptedWrite says what was replaced (run_stage prints it)
    return write_together(
        {
            "predictions": (predictions, lambda tmp: per_image.to_csv(tmp, index=False)),
            "table": (table, lambda tmp: results_table(rows).to_csv(tmp, index_label="model")),
        },
        record=out,
        content=summary,
    )
