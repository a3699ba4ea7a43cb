"""Typed params.yaml: one pydantic model per stage section; unknown keys and bad values are errors.

Every stage validates the whole file at start, so a typo anywhere (`prune.raito`) fails fast with
one line naming the key, the value and what is allowed.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from resnet_slim.errors import UserError

PosInt = Field(gt=0)
Fraction = Field(ge=0.0, lt=1.0)


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in YAML are typos or traps (lr: .inf trains to NaN,
    # gate thresholds of .inf would pass anything), never meaningful settings.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Augment(Section):
    crop_padding: int = Field(2, ge=0)  # px of zero padding before a random crop back to size
    hflip: bool = False  # random horizontal flip (wrong for digits, right for CIFAR-style photos)


class BaseParams(Section):
    seed: int = 0  # splits, weight init and data order
    threads: int = Field(2, ge=1)  # torch intra-op threads for training (split among nproc)
    # train_teacher processes on this machine (torchrun + DistributedDataParallel); 1: one plain
    # process. teacher.batch_size stays the global batch, split evenly over the processes
    nproc: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # train_teacher; auto: CUDA when torch sees one
    sync_bn: bool = False  # DDP: BN statistics over the global batch (SyncBatchNorm; GPU only)
    augment: Augment = Augment()  # training augmentation, shared by every training stage
    # seed repeats: re-train teacher and release candidates once per seed (same data split) and
    # gate on the mean drop across seeds; [] = off (only `seed`)
    seeds: list[int] = []

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds


class PrepareParams(Section):
    source: Literal["digits", "imagefolder", "cifar10"] = "digits"
    root: str | None = None  # imagefolder / cifar10 directory, relative to the repo root
    image_size: int = Field(16, ge=8, le=512)  # px; every image is resized to a square of this side
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    max_images_per_class: int | None = Field(None, gt=0)  # subsample big datasets for quick runs
    on_bad_image: Literal["skip", "fail"] = "fail"  # unreadable / corrupt image files


class ValidateDataParams(Section):
    min_class_share: float = Field(0.02, ge=0.0, le=1.0)  # each class ≥ this share of every split
    max_class_share: float = Field(0.5, ge=0.0, le=1.0)  # and ≤ this share


class TrainParams(Section):
    """Hyper-parameters of one run of the shared training loop."""

    epochs: int = PosInt
    batch_size: int = Field(64, gt=0)
    lr: float = Field(0.1, gt=0.0)  # peak learning rate (SGD, nesterov momentum)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)  # linear warm-up, then cosine decay to zero
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class TeacherParams(TrainParams):
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    width: int = Field(64, gt=0)  # channels of the first stage; 64 is the standard ResNet
    small_input: bool = True  # 3x3 stride-1 stem and no max-pool, for images of ≤ 64 px


class SparsityParams(TrainParams):
    """Network slimming's sparsity training: the shared loop plus L1 on every BN gamma."""

    epochs: int = Field(2, ge=0)  # 0: prune the teacher's gammas as they are
    lr: float = Field(0.02, gt=0.0)
    l1_lambda: float = Field(1e-4, ge=0.0)  # weight of sum|gamma| (Liu et al. 2017 use 1e-4..1e-5)


class PruneParams(Section):
    method: Literal["bn_slimming", "l1_filter", "magnitude"] = "bn_slimming"
    ratio: float = Field(0.3, ge=0.0, lt=1.0)  # fraction of prunable channels removed
    global_pruning: bool = True  # rank channels across layers (true) or within each layer
    round_to: int | None = Field(16, ge=1)  # keep channel counts multiples of this (int8 kernels)
    kd_alpha: float = Field(0.0, ge=0.0, le=1.0)  # fine-tune with the teacher as soft target (0: off)
    temperature: float = Field(4.0, gt=0.0)  # KD softmax temperature
    sparsity: SparsityParams = SparsityParams()
    finetune: TrainParams = TrainParams(epochs=4, lr=0.02, warmup_epochs=0.0)


class LowrankParams(Section):
    """SVD low-rank factorization of the teacher, the alternative to channel pruning."""

    # target params / teacher params, or match_pruned: the pruned model's share (like for like)
    params_ratio: Literal["match_pruned"] | float = "match_pruned"
    round_to: int = Field(16, ge=1)  # ranks are multiples of this (int8 kernels)
    finetune: TrainParams = TrainParams(epochs=2, lr=0.02, warmup_epochs=0.0)

    @field_validator("params_ratio")
    @classmethod
    def _ratio_in_range(cls, value):
        if value != "match_pruned" and not 0.0 < value < 1.0:
            raise ValueError("must be in (0, 1) or match_pruned")
        return value


class QatParams(TrainParams):
    """Quantization-aware training (fake-quant INT8) starting from the pruned FP32 model."""

    epochs: int = Field(3, gt=0)
    lr: float = Field(0.005, gt=0.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    backend: Literal["x86", "fbgemm", "qnnpack"] = "x86"
    freeze_observer_epoch: int = Field(2, ge=0)  # stop updating activation ranges from this epoch
    freeze_bn_epoch: int = Field(1, ge=0)  # use running BN statistics from this epoch on
    calibration_images: int = Field(256, gt=0)  # images to initialise observers before training
    max_top1_diff_pp: float = Field(1.0, ge=0.0)  # ONNX vs PyTorch QAT top-1 on the test split


class StudentArch(Section):
    arch: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_small"] = "resnet18"
    width: int = Field(16, gt=0)  # ResNet: 16 = 1/4 of the standard width (~1/16 of the MACs);
    # mobilenet_v3_small: stem channels, 16 = the standard model
    small_input: bool = True


class DistillParams(TrainParams):
    """Teacher -> student distillation with the shared loop (Hinton et al. 2015 + FitNets)."""

    student: StudentArch = StudentArch()
    epochs: int = Field(15, gt=0)
    lr: float = Field(0.05, gt=0.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0)  # weight of the soft (KL) term
    temperature: float = Field(4.0, gt=0.0)
    feature_weight: float = Field(0.0, ge=0.0)  # β of the feature MSE term (0: logits only)
    feature_stages: list[Literal[1, 2, 3, 4]] = [4]  # teacher stages matched by feature KD
    cache_teacher: bool = True  # reuse cached teacher outputs (see resnet_slim/distill.py)
    train_baseline: bool = True  # also train the same student without the teacher, for the report


def max_export_opset() -> int | None:
    """The newest ONNX opset torch's TorchScript exporter writes (None: unknown, let torch decide)."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET  # private, cheap once torch is loaded
    except ImportError:
        return None
    return int(ONNX_MAX_OPSET)


class ExportParams(Section):
    opset: int = Field(17, ge=13)
    min_top1_agreement: float = Field(0.99, ge=0.0, le=1.0)  # ONNX vs PyTorch argmax agreement
    max_abs_diff: float = Field(1e-3, gt=0.0)  # largest |logit difference| allowed (FP32 models)
    # runtimes the release candidate is exported to and benchmarked on (stages/export_targets.py);
    # onnx (onnxruntime) is always built, the others are checked against their reference there
    targets: list[Literal["onnx", "openvino", "tflite", "mindspore", "tensorrt"]] = ["onnx"]
    max_top1_diff_pp: float = Field(1.0, ge=0.0)  # INT8 targets: |top-1 - reference top-1|, pp

    @field_validator("opset")
    @classmethod
    def _exportable(cls, opset: int) -> int:
        # checked here so a stage fails at start, not after training (export.py checks again)
        max_opset = max_export_opset()
        if max_opset is not None and opset > max_opset:
            raise ValueError(f"this torch exports ONNX opsets up to {max_opset}")
        return opset


class PtqParams(Section):
    calibration_images: int = Field(256, gt=0)  # training images fed to the calibrator
    per_channel: bool = True  # per-output-channel weight scales (better accuracy for convs)
    # 7-bit weights: without VNNI, x86 int8 kernels sum u8*s8 pairs in int16, which can saturate
    reduce_range: Literal["auto", True, False] = "auto"  # auto: on when this CPU lacks VNNI


class BenchmarkParams(Section):
    threads: int = Field(1, ge=1)  # onnxruntime intra-op threads for the latency numbers
    warmup: int = Field(50, ge=0)  # untimed batch-1 runs before timing
    runs: int = Field(300, gt=0)  # timed batch-1 runs
    throughput_batch: int = Field(64, gt=0)
    # peer baselines on the teacher: OpenVINO FP32 and OpenVINO + NNCF INT8 (what a user would
    # pick instead of this pipeline), measured by stages/export_targets.py
    peers: bool = True
    all_cores: bool = True  # also p50 with every core (onnxruntime intra-op threads = cores)
    roofline: bool = True  # conv GMAC/s micro-benchmark: how close each model is to this CPU's limit
    # top-1 confidence intervals: percentile bootstrap over test images (gate uses the same)
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap_resamples: int = Field(2000, ge=100)
    bootstrap_seed: int = 0


class GateParams(Section):
    release: str = "auto"  # a benchmark name (ONNX file stem), or auto: the fastest passing candidate
    candidates: list[str] = []  # models `auto` chooses among
    reference: str = "teacher"  # the FP32 teacher it is compared with
    max_acc_drop_pp: float = 1.0  # top-1 may drop at most this many percentage points
    # point: the measured drop; upper_ci: the upper end of its paired-bootstrap CI (or, with seed
    # repeats, of the t-interval of the mean drop across seeds) must be <= max_acc_drop_pp
    acc_drop_statistic: Literal["point", "upper_ci"] = "upper_ci"
    min_speedup: float = Field(2.0, ge=0.0)  # reference p50 / release p50, batch 1
    max_size_ratio: float = Field(0.3, gt=0.0)  # release file size / reference file size
    max_size_mb: float | None = Field(None, gt=0.0)  # optional absolute cap
    enforce: bool = True  # false: record failures in gate.json but exit 0 (for sweeps)


class Params(Section):
    base: BaseParams = BaseParams()
    prepare: PrepareParams = PrepareParams()
    validate_data: ValidateDataParams = ValidateDataParams()
    teacher: TeacherParams
    prune: PruneParams = PruneParams()
    lowrank: LowrankParams = LowrankParams()
    qat: QatParams = QatParams()
    distill: DistillParams = DistillParams()
    export: ExportParams = ExportParams()
    ptq: PtqParams = PtqParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    gate: GateParams = GateParams()


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (typo?)"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise UserError(f"{source}: {problems}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML ({err.__class__.__name__}{where})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not valid UTF-8); expected YAML") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read params file ({err.strerror or err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return parse_params(raw, source=str(path))
