"""Deployment targets beyond onnxruntime: OpenVINO (FP32 IR, and INT8 via NNCF), LiteRT INT8
(.tflite), MindSpore Lite and TensorRT FP16: how each is exported, and a session to run it.
resnet_slim/measure/target_bench.py checks each against its reference on the test split and
benchmarks it with resnet_slim.measure.timing's own timing code.

A target whose toolchain cannot run here becomes a row {"status": "unavailable", "reason": ...}
naming the package, version constraint or hardware it lacks: never silently dropped.

Every runtime is wrapped in a small class with the two methods of onnxruntime.InferenceSession
that resnet_slim.measure.bench and resnet_slim.compress.export use (`get_inputs`, `run`), so top-1,
latency percentiles and input checks are measured by exactly the code that measures the ONNX files.
"""

import importlib
import os
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import NoReturn

import numpy as np
import torch

from resnet_slim.compress.export import make_session
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path
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
    """The row of a target that cannot be built or run here: kept, with its reason."""
    return {**extra, "status": "unavailable", "reason": reason}


def import_or_unavailable(module: str, install_hint: str):
    """`module`, or Unavailable naming it and how to install it (a missing toolchain is a row)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise Unavailable(
            f"python package {module!r} cannot be imported ({err}); {install_hint}"
        ) from None


def import_openvino():
    """The openvino module, or Unavailable."""
    return import_or_unavailable(
        "openvino", "install the pinned openvino from requirements.txt (make install)"
    )


def require_file(path: str | Path, what: str) -> Path:
    """`path` as a Path, or a UserError saying the `what` is missing (before a runtime's own
    less readable error)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    return path


# ---- OpenVINO ---------------------------------------------------------------------------------


def _save_openvino(model, out_dir: str | Path) -> Path:
    ov = import_openvino()
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
    ov = import_openvino()
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
    ov = import_openvino()
    nncf = import_or_unavailable(
        "nncf", "install the pinned nncf from requirements.txt (make install)"
    )
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
        ov = import_openvino()
        core = ov.Core()
        model = core.read_model(str(require_file(xml_path, "OpenVINO IR")))
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
        litert = import_or_unavailable(
            "ai_edge_litert.interpreter",
            "install the pinned ai-edge-litert from requirements.txt (make install)",
        )
        self.interpreter = litert.Interpreter(
            model_path=str(require_file(path, "LiteRT model")), num_threads=threads
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
    import_or_unavailable("mindspore_lite", MINDSPORE_LITE_REASON)
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
    import_or_unavailable("tensorrt", "pip install tensorrt==11.4.0.106 on the CUDA machine")
    raise Unavailable(TENSORRT_FP16_REASON)
