"""The latency table's predictions against the benchmark's measurements.

The latency_table stage prices the blocks a model is made of; pruning trusts those prices. Here
every benchmarked ONNX model that comes from a checkpoint the table can describe (FP32 `<name>`,
INT8 `<name>_qat_int8` / `<name>_ptq_int8` of `models/<name>.pt`) gets its predicted latency beside
the measured p50, so a table that no longer tells the truth (another CPU, another onnxruntime, a
kernel the units do not exercise) shows up in benchmark.json and the report.
"""

from pathlib import Path

from resnet_slim.compress.latency_model import model_units, predict_ms
from resnet_slim.errors import UserError
from resnet_slim.hardware import hardware_fingerprint
from resnet_slim.train.models import load_model

INT8_BUILDS = ("_qat_int8", "_ptq_int8")  # QDQ files: what the table's INT8 column times
MAX_ERROR = 0.15  # the prediction is trusted within +-15 % of the measured p50


def predicted_build(name: str, models_dir: str | Path) -> tuple[Path, str] | None:
    """(the checkpoint a benchmarked model was built from, "int8" or "fp32"), or None when the
    table does not describe it (dynamic INT8, other runtimes' rows, no checkpoint)."""
    for suffix in INT8_BUILDS:
        if name.endswith(suffix):
            checkpoint = Path(models_dir) / f"{name.removesuffix(suffix)}.pt"
            return (checkpoint, "int8") if checkpoint.is_file() else None
    checkpoint = Path(models_dir) / f"{name}.pt"
    return (checkpoint, "fp32") if checkpoint.is_file() else None


def same_machine(table: dict) -> bool:
    """Whether the table was measured on this CPU (model, SIMD flags) and onnxruntime."""
    here = hardware_fingerprint()
    recorded = table.get("fingerprint") if isinstance(table.get("fingerprint"), dict) else {}
    return bool(recorded) and all(here.get(key) == value for key, value in recorded.items())


def host_drift(rows: dict[str, dict], table: dict, reference: str = "teacher") -> dict:
    """How much slower (+) or faster (-) the benchmark measured the teacher than the latency_table
    stage did ({"fp32": ..., "int8": ...}, INT8 from its static / QAT QDQ build), and whether
    both are within MAX_ERROR. The CPU fingerprint cannot tell two hosts of one CPU model apart
    (nor a host loaded by a neighbour): a resumed run on another machine keeps the old table,
    whose prices then mislead the pruner and the check above alike."""
    measured = table.get("teacher_measured_ms")
    if not isinstance(measured, dict):
        return {"host_drift": None, "host_drift_within": None}
    now = {"fp32": (rows.get(reference) or {}).get("p50_ms")}
    for suffix in ("_ptq_int8", "_qat_int8"):
        if now.get("int8") is None:
            now["int8"] = (rows.get(reference + suffix) or {}).get("p50_ms")
    drift = {
        runtime: now[runtime] / measured[runtime] - 1.0
        for runtime in ("fp32", "int8")
        if isinstance(now.get(runtime), (int, float)) and measured.get(runtime)
    }
    within = all(abs(d) <= MAX_ERROR for d in drift.values()) if drift else None
    return {"host_drift": drift or None, "host_drift_within": within}


def check_predictions(
    rows: dict[str, dict], models_dir: str | Path, table: dict, *, image_size: int
) -> dict:
    """Add `predicted_ms` and `prediction_error` (predicted / measured - 1) to every row the table
    describes; returns the summary for benchmark.json ("latency_model")."""
    checked, skipped = {}, {}
    for name, row in rows.items():
        build = predicted_build(name, models_dir)
        if build is None or not isinstance(row.get("p50_ms"), (int, float)):
            continue
        model, _ = load_model(build[0])
        try:
            predicted = predict_ms(model_units(model, image_size), table, build[1])
        except UserError as err:  # e.g. a low-rank model: its factorized convs are no unit
            skipped[name] = str(err)
            continue
        row["predicted_ms"] = predicted
        row["prediction_error"] = predicted / row["p50_ms"] - 1.0
        checked[name] = row["prediction_error"]
    worst = max((abs(e) for e in checked.values()), default=None)
    return {
        "same_machine": same_machine(table),
        **host_drift(rows, table),
        "errors": checked,
        "not_predicted": skipped,
        "max_abs_error": worst,
        "max_error_allowed": MAX_ERROR,
        "all_within": worst is not None and worst <= MAX_ERROR,
    }
