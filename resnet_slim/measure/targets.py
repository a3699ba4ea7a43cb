"""Deployment targets beyond onnxruntime: OpenVINO (FP32 IR, and INT8 via NNCF), LiteRT INT8
(.tflite), MindSpore Lite and TensorRT FP16. Each target is exported, checked against its
reference on the test split, and benchmarked with resnet_slim.measure.bench's own timing code.

A target whose toolchain cannot run here becomes a row {"status": "unavailable", "reason": ...}
naming the package, version constraint or hardware it lacks: never silently dropped.

Every runtime is wrapped in a small class with the two methods of onnxruntime.InferenceSession
that resnet_slim.measure.bench and resnet_slim.compress.export use (`get_inputs`, `run`), so top-1,
latency percentiles and input checks are measured by exactly the code that measures the ONNX files.
"""

import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

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
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
from resnet_slim.limits import usable_cores
from resnet_slim.measure.timing import latency_ms
from resnet_slim.params import BenchmarkParams, ExportParams
from resnet_slim.stats import accuracy_with_ci
from resnet_slim.train.models import load_model

REPO = Path(__file__).resolve().parents[2]
# litert-torch cannot be installed into .venv (see LITERT_CONFLICT): `make install-litert` builds
# this separate environment, and only the conversion runs there (the LiteRT runtime is in .venv).
LITERT_VENV = REPO / ".venv-litert"
LITERT_CONFLICT = (
    "litert-torch 0.10.0 cannot share .venv with the pinned requirements: it needs "
    "litert-converter 0.5.0, which pins xdsl==0.28.0, which requires "
    "typing-extensions<4.13, while pydantic 2.14.3 requires typing-extensions>=4.16.0"
)
MINDSPORE_LITE_REASON = (
    "no MindSpore Lite converter installs on CPython 3.11 / linux x86_64 from PyPI: "
    "mindspore-lite's only PyPI release (2.0.0) has wheels for CPython 3.7 only, newer ones are "
    "published only on mindspore.cn, and the mindspore 2.10.0 wheel (cp311) has no mindspore_lite "
    "module and no ONNX importer"
)
TENSORRT_FP16_REASON = (
    "the TensorRT FP16 build is not implemented: TensorRT 11 removed BuilderFlag.FP16, so an FP16 "
    "engine needs nvidia-modelopt AutoCast plus a strongly typed build, which cannot be tested "
    "without an NVIDIA GPU"
)


class Unavailable(Exception):
    """A target whose converter or runtime cannot run here; the message is the exact reason."""


def unavailable_row(reason: str, **extra) -> dict:
    return {**extra, "status": "unavailable", "reason": reason}


def _import(module: str, install_hint: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise Unavailable(
            f"python package {module!r} cannot be imported ({err}); {install_hint}"
        ) from None


def _openvino():
    return _import("openvino", "install the pinned openvino from requirements.txt (make install)")


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    return path


# ---- OpenVINO ---------------------------------------------------------------------------------


def _save_openvino(model, out_dir: str | Path) -> Path:
    ov = _openvino()
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        # compress_to_fp16=False: the IR keeps the source's FP32 (or INT8) weights, so the FP32
        # peer is really FP32 and the file size is what is deployed
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
    return Path(out_dir) / "model.xml"


def export_openvino(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """ONNX -> OpenVINO IR (out_dir/model.xml + model.bin) with openvino.convert_model.

    A QDQ (INT8) ONNX file stays INT8: OpenVINO runs its Quantize/Dequantize pairs as int8 ops.
    """
    ov = _openvino()
    make_session(onnx_path)  # missing / unloadable file: the same one-line error as elsewhere
    return _save_openvino(ov.convert_model(str(onnx_path)), out_dir)


def quantize_openvino_nncf(
    onnx_path: str | Path, calibration: np.ndarray, out_dir: str | Path
) -> Path:
    """FP32 ONNX -> OpenVINO INT8 IR with nncf.quantize: the post-training route
    OpenVINO users take.

    Calibrated on the same training images as onnxruntime's static PTQ (resnet_slim.compress.quant),
    with NNCF's CPU defaults for CNNs: PERFORMANCE preset (symmetric int8 activations and weights).
    """
    ov = _openvino()
    nncf = _import("nncf", "install the pinned nncf from requirements.txt (make install)")
    if len(calibration) == 0:
        raise UserError("calibration set is empty")
    make_session(onnx_path)
    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    quantized = nncf.quantize(
        ov.convert_model(str(onnx_path)),
        dataset,
        preset=nncf.QuantizationPreset.PERFORMANCE,
        target_device=nncf.TargetDevice.CPU,
        subset_size=len(calibration),
    )
    return _save_openvino(quantized, out_dir)


class OpenVinoSession:
    """An OpenVINO CPU model compiled for batch 1 and `threads` threads, one image per request."""

    def __init__(self, xml_path: str | Path, *, threads: int):
        ov = _openvino()
        core = ov.Core()
        model = core.read_model(str(_require_file(xml_path, "OpenVINO IR")))
        dims = model.input(0).get_partial_shape()
        if dims.rank.get_length() != 4 or not all(d.is_static for d in list(dims)[1:]):
            raise UserError(f"{xml_path}: expected one NCHW input of fixed size, got {dims}")
        self.shape = [1] + [d.get_length() for d in list(dims)[1:]]
        model.reshape(self.shape)  # batch 1, as deployed on an edge device
        # f32 precision hint: otherwise OpenVINO may run FP32 layers in bf16 on CPUs that have it
        self.request = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",
            },
        ).create_infer_request()

    def get_inputs(self):
        return [SimpleNamespace(name="input", shape=self.shape)]

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        (images,) = feed.values()
        return [
            np.concatenate([np.array(self.request.infer({0: image[None]})[0]) for image in images])
        ]


# ---- LiteRT (TFLite) --------------------------------------------------------------------------

# Run by .venv-litert's python. It imports only torch, litert-torch and resnet_slim.train.models:
# the rest of resnet_slim needs pydantic, which cannot import beside that environment's older
# typing-extensions (LITERT_CONFLICT).
_LITERT_CONVERTER = """
import sys
import litert_torch, numpy as np, torch
from litert_torch.quantize import pt2e_quantizer
from litert_torch.quantize.quant_config import QuantConfig
from torchao.quantization.pt2e import quantize_pt2e
from resnet_slim.train.models import load_model

checkpoint, calibration_file, out_path = sys.argv[1:4]
model = load_model(checkpoint)[0].eval()
calibration = torch.from_numpy(np.load(calibration_file))
example = (calibration[:1],)
quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
    pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
prepared = quantize_pt2e.prepare_pt2e(torch.export.export(model, example).module(), quantizer)
with torch.no_grad():
    for image in calibration:  # the exported graph is specialised to batch 1
        prepared(image[None])
quantized = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
litert_torch.convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)
                     ).export(out_path)
"""


def export_tflite(checkpoint: str | Path, calibration: np.ndarray, out_path: str | Path) -> Path:
    """PyTorch checkpoint -> full-integer INT8 .tflite with litert-torch (PT2E static quantization,
    per-channel symmetric weights, calibrated on `calibration`).

    Runs in the separate environment .venv-litert (`make install-litert`); see LITERT_CONFLICT.
    """
    load_model(checkpoint)  # missing / unsafe / mismatched checkpoint: its one-line error, here
    python = LITERT_VENV / "bin" / "python"
    if not python.is_file():
        raise Unavailable(
            f"the LiteRT converter environment {python} does not exist: run "
            f"`make install-litert` ({LITERT_CONFLICT})"
        )
    if len(calibration) == 0:
        raise UserError("calibration set is empty")
    with tempfile.TemporaryDirectory() as tmp_dir, atomic_path(out_path) as tmp:
        calibration_file = Path(tmp_dir) / "calibration.npy"
        np.save(calibration_file, calibration.astype(np.float32))
        # PYTHONPATH: the converter imports this checkout's resnet_slim.train.models; it runs in
        # tmp_dir, so relative paths (as dvc.yaml passes them) must be made absolute first
        result = subprocess.run(
            [
                str(python),
                "-c",
                _LITERT_CONVERTER,
                str(Path(checkpoint).resolve()),
                str(calibration_file),
                str(Path(tmp).resolve()),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            cwd=tmp_dir,
        )
        if result.returncode != 0 or not tmp.is_file():
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            raise UserError(
                f"{checkpoint}: LiteRT conversion failed: "
                f"{lines[-1] if lines else f'exit code {result.returncode}'}"
            )
    return Path(out_path)


class LiteRtSession:
    """A LiteRT interpreter with `threads` threads; int8 model inputs/outputs are (de)quantized
    with the scale and zero point stored in the file, as a deployed app does."""

    def __init__(self, path: str | Path, *, threads: int):
        litert = _import(
            "ai_edge_litert.interpreter",
            "install the pinned ai-edge-litert from requirements.txt (make install)",
        )
        self.interpreter = litert.Interpreter(
            model_path=str(_require_file(path, "LiteRT model")), num_threads=threads
        )
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def get_inputs(self):
        return [SimpleNamespace(name="input", shape=[int(d) for d in self.input["shape"]])]

    def _run_one(self, image: np.ndarray) -> np.ndarray:
        x = image[None]
        if self.input["dtype"] != np.float32:
            scale, zero_point = self.input["quantization"]
            info = np.iinfo(self.input["dtype"])
            x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
        self.interpreter.set_tensor(self.input["index"], x.astype(self.input["dtype"]))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"]).astype(np.float32)
        if self.output["dtype"] != np.float32:
            scale, zero_point = self.output["quantization"]
            y = (y - zero_point) * scale
        return y

    def run(self, output_names, feed: dict) -> list[np.ndarray]:
        (images,) = feed.values()
        return [np.concatenate([self._run_one(image) for image in images])]


def open_target_session(runtime: str, path: str | Path, *, threads: int):
    """A session-like model for a benchmark row measured in another runtime (its `runtime` record,
    e.g. "openvino 2025.4.0"), so the benchmark can time it beside the onnxruntime models."""
    if runtime.startswith("openvino"):
        return OpenVinoSession(path, threads=threads)
    if runtime.startswith("litert"):
        return LiteRtSession(path, threads=threads)
    raise UserError(f"{path}: no session for runtime {runtime!r}")


# ---- MindSpore Lite, TensorRT -----------------------------------------------------------------


def export_mindspore(onnx_path: str | Path, out_path: str | Path) -> NoReturn:
    """ONNX -> MindSpore Lite .ms: always raises Unavailable here (MINDSPORE_LITE_REASON)."""
    make_session(onnx_path)
    _import("mindspore_lite", MINDSPORE_LITE_REASON)
    raise Unavailable(
        "mindspore_lite imports, but converting with it is not implemented: no "
        "environment this project supports can install it to test the path"
    )


def export_tensorrt(onnx_path: str | Path, out_path: str | Path) -> NoReturn:
    """ONNX -> TensorRT FP16 engine: always raises Unavailable (no GPU here; the FP16 build is not
    implemented, TENSORRT_FP16_REASON)."""
    make_session(onnx_path)
    if not torch.cuda.is_available():
        raise Unavailable(
            "TensorRT needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is "
            "False on this machine)"
        )
    _import("tensorrt", "pip install tensorrt==11.4.0.106 on the CUDA machine")
    raise Unavailable(TENSORRT_FP16_REASON)


# ---- measuring --------------------------------------------------------------------------------


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
    xml_path = _require_file(xml_path, "OpenVINO IR")
    return benchmark_session(
        lambda threads: OpenVinoSession(xml_path, threads=threads),
        [xml_path, xml_path.with_suffix(".bin")],
        images,
        labels,
        p,
        runtime=f"openvino {_openvino().__version__.split('-')[0]}",
    )


def benchmark_tflite(
    path: str | Path, images: torch.Tensor, labels: torch.Tensor, p: BenchmarkParams
) -> tuple[dict, np.ndarray]:
    path = _require_file(path, "LiteRT model")
    litert = _import("ai_edge_litert", "install the pinned ai-edge-litert (make install)")
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
    on_openvino = partial(benchmark_openvino, images=images, labels=labels, p=bench)
    on_litert = partial(benchmark_tflite, images=images, labels=labels, p=bench)
    parity = dict(labels=labels, p=check)
    artifacts = {
        name: out / name
        for name in (
            "student_qat_int8_openvino",
            "teacher_openvino_fp32",
            "teacher_openvino_nncf_int8",
        )
    }
    artifacts["student_tflite_int8"] = out / "student_tflite_int8.tflite"
    rows = {}
    if "openvino" in requested:  # the INT8 release file itself; OpenVINO runs its QDQ pairs as int8
        rows["student_qat_int8_openvino"] = measure_target(
            lambda: export_openvino(student_int8_onnx, artifacts["student_qat_int8_openvino"]),
            on_openvino,
            lambda: onnx_logits(student_int8_onnx, images),
            int8=True,
            reference=f"{student_int8_onnx} on onnxruntime",
            target="openvino",
            role="release target",
            source=student_int8_onnx,
            **parity,
        )
    if "tflite" in requested:  # LiteRT's own INT8 route (PT2E static) from the FP32 student
        rows["student_tflite_int8"] = measure_target(
            lambda: export_tflite(student, calibration, artifacts["student_tflite_int8"]),
            on_litert,
            lambda: torch_logits(load_model(student, num_classes=num_classes)[0], images),
            int8=True,
            reference=f"{student} in PyTorch (FP32)",
            target="tflite",
            role="release target",
            source=student,
            **parity,
        )
    for target, name, export in (
        ("mindspore", "student_mindspore_lite", export_mindspore),
        ("tensorrt", "student_tensorrt_fp16", export_tensorrt),
    ):
        if target in requested:
            try:  # always raises here: no wheel / no GPU (README, "Deployment targets")
                export(student_onnx, out / name)
            except Unavailable as err:
                rows[name] = unavailable_row(
                    str(err), target=target, role="release target", source=student_onnx
                )
    if peers:  # what a user would pick instead of this pipeline
        teacher_logits = cache(partial(onnx_logits, teacher_onnx, images))  # used twice
        rows["teacher_openvino_fp32"] = measure_target(
            lambda: export_openvino(teacher_onnx, artifacts["teacher_openvino_fp32"]),
            on_openvino,
            teacher_logits,
            int8=False,
            reference=f"{teacher_onnx} on onnxruntime",
            target="openvino",
            role="peer",
            source=teacher_onnx,
            **parity,
        )
        rows["teacher_openvino_nncf_int8"] = measure_target(
            lambda: quantize_openvino_nncf(
                teacher_onnx, calibration, artifacts["teacher_openvino_nncf_int8"]
            ),
            on_openvino,
            teacher_logits,
            int8=True,
            reference=f"{teacher_onnx} on onnxruntime",
            target="openvino",
            role="peer",
            source=teacher_onnx,
            **parity,
        )
    out.mkdir(parents=True, exist_ok=True)  # a DVC output even when no target was requested
    return rows, artifacts


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
