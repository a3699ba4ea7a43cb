"""Each deployment target of resnet_slim.measure.targets, built, benchmarked and checked
against its reference on the test split: the export_targets stage's rows.

A target is measured by the code that measures the ONNX files (`check_input_size`, `run_onnx`,
resnet_slim.measure.timing's `latency_ms`), through its session-like wrapper. A target whose
toolchain cannot run here is a row with the reason (targets.Unavailable), never dropped.
"""

import shutil
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from resnet_slim.compress.export import (
    check_input_size,
    check_parity,
    make_session,
    run_onnx,
    torch_logits,
)
from resnet_slim.limits import usable_cores
from resnet_slim.measure.targets import (
    LiteRtSession,
    OpenVinoSession,
    Unavailable,
    export_mindspore,
    export_openvino,
    export_tensorrt,
    export_tflite,
    import_openvino,
    import_or_unavailable,
    quantize_openvino_nncf,
    require_file,
    unavailable_row,
)
from resnet_slim.measure.timing import latency_ms
from resnet_slim.params import BenchmarkParams, ExportParams
from resnet_slim.stats import accuracy_with_ci
from resnet_slim.train.models import load_model


def benchmark_session(
    open_session: Callable[[int], object],
    files: list[Path],
    images: torch.Tensor,
    labels: torch.Tensor,
    p: BenchmarkParams,
    *,
    runtime: str,
) -> tuple[dict, np.ndarray]:
    """(benchmark row in benchmark.json's per-model keys, test-split logits) for one runtime.

    `open_session(threads)` returns a session-like object; latency is batch 1 at p.threads and
    again with every usable core (p50_ms_all_cores). "predictions" is for paired statistics.
    """
    session = open_session(p.threads)
    check_input_size(session, images.shape[-1], files[0])
    logits = run_onnx(session, images)
    predictions = logits.argmax(1)
    one = images[:1].numpy()
    row = {
        "file": str(files[0]),
        "runtime": runtime,
        **accuracy_with_ci(predictions, labels.numpy(), p),
        "n_test": int(len(labels)),
        "size_mb": sum(Path(f).stat().st_size for f in files) / 1e6,
        **latency_ms(session, one, warmup=p.warmup, runs=p.timed_runs),
        "threads": p.threads,
    }
    all_cores = usable_cores()
    row["p50_ms_all_cores"] = latency_ms(
        open_session(all_cores), one, warmup=p.warmup, runs=p.timed_runs
    )["p50_ms"]
    row["threads_all_cores"] = all_cores
    row["predictions"] = predictions
    return row, logits


def benchmark_openvino(
    xml_path: str | Path, images: torch.Tensor, labels: torch.Tensor, p: BenchmarkParams
) -> tuple[dict, np.ndarray]:
    xml_path = require_file(xml_path, "OpenVINO IR")
    return benchmark_session(
        lambda threads: OpenVinoSession(xml_path, threads=threads),
        [xml_path, xml_path.with_suffix(".bin")],
        images,
        labels,
        p,
        runtime=f"openvino {import_openvino().__version__.split('-')[0]}",
    )


def benchmark_tflite(
    path: str | Path, images: torch.Tensor, labels: torch.Tensor, p: BenchmarkParams
) -> tuple[dict, np.ndarray]:
    path = require_file(path, "LiteRT model")
    litert = import_or_unavailable(
        "ai_edge_litert", "install the pinned ai-edge-litert (make install)"
    )
    return benchmark_session(
        lambda threads: LiteRtSession(path, threads=threads),
        [path],
        images,
        labels,
        p,
        runtime=f"litert {litert.__version__}",
    )


def onnx_logits(onnx_path: str | Path, images: torch.Tensor) -> np.ndarray:
    return run_onnx(make_session(onnx_path), images)


def check_target_parity(
    logits: np.ndarray,
    reference_logits: np.ndarray,
    labels: torch.Tensor,
    p: ExportParams,
    *,
    int8: bool,
    reference: str,
) -> dict:
    """Target vs reference on the test split. FP32 targets: argmax agreement and max |logit diff|
    (export's thresholds); INT8 targets: |top-1 difference| <= export.max_top1_diff_pp."""
    labels = labels.numpy()
    top1 = 100.0 * float((logits.argmax(1) == labels).mean())
    reference_top1 = 100.0 * float((reference_logits.argmax(1) == labels).mean())
    result = {
        "reference": reference,
        "int8": int8,
        "top1_agreement": float((logits.argmax(1) == reference_logits.argmax(1)).mean()),
        "max_abs_diff": float(np.abs(logits - reference_logits).max()),
        "reference_top1": reference_top1,
        "top1_diff_pp": top1 - reference_top1,
    }
    if int8:
        problems = (
            []
            if abs(result["top1_diff_pp"]) <= p.max_top1_diff_pp
            else [
                f"top-1 differs from the reference by {result['top1_diff_pp']:+.2f} pp "
                f"(allowed ±{p.max_top1_diff_pp})"
            ]
        )
    else:
        problems = check_parity(
            result, min_top1_agreement=p.min_top1_agreement, max_abs_diff=p.max_abs_diff
        )
    return {**result, "passed": not problems, "problems": problems}


def measure_target(
    build: Callable[[], Path],
    measure: Callable[[Path], tuple[dict, np.ndarray]],
    reference_logits: Callable[[], np.ndarray],
    *,
    reference: str,
    labels: torch.Tensor,
    p: ExportParams,
    int8: bool,
    **describe,
) -> dict:
    """Build one target, benchmark it and check it against its reference: one row.

    `describe` (target, role, source, ...) leads the row. An Unavailable target is a row with the
    reason; status is "ok" or "parity_failed" otherwise.
    """
    try:
        row, logits = measure(build())
    except Unavailable as err:
        return unavailable_row(str(err), **describe)
    parity = check_target_parity(
        logits, reference_logits(), labels, p, int8=int8, reference=reference
    )
    return {
        **describe,
        "status": "ok" if parity["passed"] else "parity_failed",
        **row,
        "parity": parity,
    }


# ---- the export_targets stage -----------------------------------------------------------------


def measure_targets(
    requested: list[str],
    *,
    peers: bool,
    teacher_onnx: str,
    student: str,
    student_onnx: str,
    student_int8_onnx: str,
    out_dir: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    calibration: np.ndarray,
    num_classes: int,
    bench: BenchmarkParams,
    check: ExportParams,
) -> tuple[dict[str, dict], dict[str, Path]]:
    """(a row per target, where each built file is): the release candidate on each requested
    runtime (export.targets), and with `peers` the teacher's OpenVINO FP32 and NNCF INT8 IRs."""
    out = Path(out_dir)
    artifacts = target_artifacts(out)
    split = dict(images=images, labels=labels, bench=bench, check=check)
    rows = {}
    if "openvino" in requested:
        rows["student_qat_int8_openvino"] = release_on_openvino(
            student_int8_onnx, artifacts["student_qat_int8_openvino"], **split
        )
    if "tflite" in requested:
        rows["student_tflite_int8"] = release_on_litert(
            student, calibration, artifacts["student_tflite_int8"], num_classes, **split
        )
    rows.update(unbuildable_rows(requested, student_onnx, out))
    if peers:  # what a user would pick instead of this pipeline
        rows.update(openvino_peers(teacher_onnx, calibration, artifacts, **split))
    out.mkdir(parents=True, exist_ok=True)  # a DVC output even when no target was requested
    return rows, artifacts


def target_artifacts(out: Path) -> dict[str, Path]:
    """Where each buildable target's file (or IR folder) goes under `out`."""
    artifacts = {
        name: out / name
        for name in (
            "student_qat_int8_openvino",
            "teacher_openvino_fp32",
            "teacher_openvino_nncf_int8",
        )
    }
    artifacts["student_tflite_int8"] = out / "student_tflite_int8.tflite"
    return artifacts


def release_on_openvino(
    int8_onnx: str,
    out_dir: Path,
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    bench: BenchmarkParams,
    check: ExportParams,
) -> dict:
    """The INT8 release file itself on OpenVINO (which runs its QDQ pairs as int8 ops), checked
    against the same file on onnxruntime."""
    return measure_target(
        lambda: export_openvino(int8_onnx, out_dir),
        partial(benchmark_openvino, images=images, labels=labels, p=bench),
        lambda: onnx_logits(int8_onnx, images),
        int8=True,
        reference=f"{int8_onnx} on onnxruntime",
        target="openvino",
        role="release target",
        source=int8_onnx,
        labels=labels,
        p=check,
    )


def release_on_litert(
    student: str,
    calibration: np.ndarray,
    out_path: Path,
    num_classes: int,
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    bench: BenchmarkParams,
    check: ExportParams,
) -> dict:
    """LiteRT's own INT8 route (PT2E static) from the FP32 student checkpoint, checked against
    that checkpoint in PyTorch."""
    return measure_target(
        lambda: export_tflite(student, calibration, out_path),
        partial(benchmark_tflite, images=images, labels=labels, p=bench),
        lambda: torch_logits(load_model(student, num_classes=num_classes)[0], images),
        int8=True,
        reference=f"{student} in PyTorch (FP32)",
        target="tflite",
        role="release target",
        source=student,
        labels=labels,
        p=check,
    )


def unbuildable_rows(requested: list[str], student_onnx: str, out: Path) -> dict[str, dict]:
    """MindSpore Lite and TensorRT FP16, where requested: rows with the reason each cannot be
    built here (the export always raises Unavailable: no wheel / no GPU; README, "Deployment
    targets")."""
    rows = {}
    for target, name, export in (
        ("mindspore", "student_mindspore_lite", export_mindspore),
        ("tensorrt", "student_tensorrt_fp16", export_tensorrt),
    ):
        if target in requested:
            try:
                export(student_onnx, out / name)
            except Unavailable as err:
                rows[name] = unavailable_row(
                    str(err), target=target, role="release target", source=student_onnx
                )
    return rows


def openvino_peers(
    teacher_onnx: str,
    calibration: np.ndarray,
    artifacts: dict[str, Path],
    *,
    images: torch.Tensor,
    labels: torch.Tensor,
    bench: BenchmarkParams,
    check: ExportParams,
) -> dict[str, dict]:
    """The peer baselines: the teacher as an OpenVINO FP32 IR and as NNCF's INT8 IR, each checked
    against the teacher's ONNX file on onnxruntime."""
    teacher_logits = cache(partial(onnx_logits, teacher_onnx, images))  # used twice
    on_openvino = partial(benchmark_openvino, images=images, labels=labels, p=bench)
    peer = dict(
        reference=f"{teacher_onnx} on onnxruntime",
        target="openvino",
        role="peer",
        source=teacher_onnx,
        labels=labels,
        p=check,
    )
    return {
        "teacher_openvino_fp32": measure_target(
            lambda: export_openvino(teacher_onnx, artifacts["teacher_openvino_fp32"]),
            on_openvino,
            teacher_logits,
            int8=False,
            **peer,
        ),
        "teacher_openvino_nncf_int8": measure_target(
            lambda: quantize_openvino_nncf(
                teacher_onnx, calibration, artifacts["teacher_openvino_nncf_int8"]
            ),
            on_openvino,
            teacher_logits,
            int8=True,
            **peer,
        ),
    }


def target_predictions_table(rows: dict[str, dict], labels: torch.Tensor) -> pd.DataFrame:
    """The class each measured target predicted per test image (moved out of its row), and one
    progress line per row on stdout."""
    predictions = pd.DataFrame({"image": range(len(labels)), "label": labels.numpy()})
    for name, row in rows.items():
        if row["status"] == "unavailable":
            print(f"export_targets: {name:28s} unavailable: {row['reason']}")
            continue
        predictions[name] = row.pop("predictions")
        print(
            f"export_targets: {name:28s} {row['status']:13s} top-1 {row['top1']:6.2f}%  "
            f"p50 {row['p50_ms']:7.3f} ms ({row['p50_ms_all_cores']:.3f} ms on "
            f"{row['threads_all_cores']} cores)  {row['size_mb']:7.2f} MB"
        )
    return predictions


def remove_failed_release_files(rows: dict[str, dict], artifacts: dict[str, Path]) -> list[str]:
    """A release file that disagrees with its reference is not kept: delete it. Returns one
    problem per deleted file (empty: every release target passed or was unavailable)."""
    problems = []
    for name, row in rows.items():
        if row["status"] == "parity_failed" and row["role"] == "release target":
            path = artifacts[name]
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            problems.append(f"{name}: {row['parity']['problems'][0]}")
    return problems
