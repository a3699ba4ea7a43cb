"""Typed params.yaml: one pydantic model per stage section; unknown keys and bad values are errors.

Every stage validates the whole file at start, so a typo anywhere (`prune.raito`) fails fast with
one line naming the key, the value and what is allowed.
"""

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from resnet_slim.errors import UserError
# caps on sizes and counts that would otherwise reach allocations (see limits.py)
from resnet_slim.limits import (MAX_BATCH, MAX_BENCHMARK_RUNS, MAX_BOOTSTRAP_RESAMPLES,
                                 MAX_CALIBRATION_IMAGES, MAX_NPROC, MAX_SEED, MAX_THREADS,
                                 MAX_WIDTH)

PosInt = Field(gt=0)
Fraction = Field(ge=0.0, lt=1.0)
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")  # "" would silently mean the current directory
    return text


NonEmptyStr = Annotated[str, AfterValidator(_not_blank)]


class Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` in YAML are typos or traps (lr: .inf trains to NaN,
    # gate thresholds of .inf would pass anything), never meaningful settings.
    # strict=True: no silent coercion, so `epochs: true` is not 1 and `width: "64"` not 64
    # (ints still pass where a float is expected).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


class Augment(Section):
    # px of zero padding before a random crop back to size
    crop_padding: int = Field(2, ge=0, le=64)
    hflip: bool = False  # random horizontal flip (wrong for digits, right for CIFAR-style photos)


class BaseParams(Section):
    seed: Seed = 0  # splits, weight init and data order
    # torch intra-op threads for training (split among nproc)
    threads: int = Field(2, ge=1, le=MAX_THREADS)
    # train_teacher processes on this machine (torchrun + DistributedDataParallel); 1: one plain
    # process. teacher.batch_size stays the global batch, split evenly over the processes
    nproc: int = Field(1, ge=1, le=MAX_NPROC)
    device: Literal["auto", "cpu", "cuda"] = "cpu"  # train_teacher; auto: CUDA when torch sees one
    sync_bn: bool = False  # DDP: BN statistics over the global batch (SyncBatchNorm; GPU only)
    augment: Augment = Augment()  # training augmentation, shared by every training stage
    # seed repeats: re-train teacher and release candidates once per seed (same data split) and
    # gate on the mean drop across seeds; [] = off (only `seed`)
    seeds: list[Seed] = Field([], max_length=100)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds


class NormalizeStats(Section):
    mean: list[float] = Field(min_length=3, max_length=3)  # per RGB channel, on [0, 1] pixels
    std: list[Annotated[float, Field(gt=0.0)]] = Field(min_length=3, max_length=3)


class PrepareParams(Section):
    source: Literal["digits", "imagefolder", "cifar10"] = "digits"
    root: NonEmptyStr | None = None  # imagefolder / cifar10 directory, relative to the repo root
    image_size: int = Field(16, ge=8, le=512)  # px; every image is resized to a square of this side
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    max_images_per_class: int | None = Field(None, gt=0)  # subsample big datasets for quick runs
    on_bad_image: Literal["skip", "fail"] = "fail"  # unreadable / corrupt image files
    # input statistics written to meta.json and used by every stage, export and the web UI:
    # dataset (the training split's), imagenet (what most imported models were trained with) or
    # {mean: [r, g, b], std: [r, g, b]} on [0, 1] pixels
    normalize: Literal["dataset", "imagenet"] | NormalizeStats = "dataset"

    @field_validator("normalize", mode="wrap")
    @classmethod
    def _one_line_normalize_error(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:  # the union's per-branch errors would be three long lines
            raise ValueError("expected dataset, imagenet or {mean: [r, g, b], std: [r, g, b]} "
                             "(3 numbers each, std > 0)") from None


class ValidateDataParams(Section):
    min_class_share: float = Field(0.02, ge=0.0, le=1.0)  # each class ≥ this share of every split
    max_class_share: float = Field(0.5, ge=0.0, le=1.0)  # and ≤ this share


class TrainParams(Section):
    """Hyper-parameters of one run of the shared training loop."""

    epochs: int = PosInt
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)
    lr: float = Field(0.1, gt=0.0)  # peak learning rate (SGD, nesterov momentum)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)  # linear warm-up, then cosine decay to zero
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


class TeacherParams(TrainParams):
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    # channels of the first stage; 64 is the standard ResNet
    width: int = Field(64, gt=0, le=MAX_WIDTH)
    small_input: bool = True  # 3x3 stride-1 stem and no max-pool, for images of ≤ 64 px
    # bring your own model (resnet_slim/model_import.py): start from this checkpoint instead of
    # random weights; arch/width/small_input are then read from the file, not from these keys
    epochs: int = Field(ge=0)  # 0: use the model from `init` as it is (evaluated, not trained)
    init: NonEmptyStr | None = Field(None, validate_default=True)
    format: Literal["auto", "resnet_slim", "torchvision", "cifar_resnet"] = "auto"
    replace_head: bool = False  # new, untrained classifier for the data's classes (transfer)

    @field_validator("init")
    @classmethod
    def _zero_epochs_needs_init(cls, init, info):
        if info.data.get("epochs") == 0 and init is None:
            raise ValueError("teacher.epochs: Input should be greater than 0 to train from "
                             "scratch; epochs 0 (use a model as is) needs teacher.init")
        return init


class SparsityParams(TrainParams):
    """Network slimming's sparsity training: the shared loop plus L1 on every BN gamma."""

    epochs: int = Field(2, ge=0)  # 0: prune the teacher's gammas as they are
    lr: float = Field(0.02, gt=0.0)
    l1_lambda: float = Field(1e-4, ge=0.0)  # weight of sum|gamma| (Liu et al. 2017 use 1e-4..1e-5)


class PruneParams(Section):
    method: Literal["bn_slimming", "l1_filter", "magnitude"] = "bn_slimming"
    ratio: float = Field(0.3, ge=0.0, lt=1.0)  # fraction of prunable channels removed
    global_pruning: bool = True  # rank channels across layers (true) or within each layer
    # keep channel counts multiples of this (int8 kernels)
    round_to: int | None = Field(16, ge=1, le=256)
    kd_alpha: float = Field(0.0, ge=0.0, le=1.0)  # fine-tune with the teacher as soft target (0: off)
    temperature: float = Field(4.0, gt=0.0)  # KD softmax temperature
    sparsity: SparsityParams = SparsityParams()
    finetune: TrainParams = TrainParams(epochs=4, lr=0.02, warmup_epochs=0.0)


class LowrankParams(Section):
    """SVD low-rank factorization of the teacher, the alternative to channel pruning."""

    # target params / teacher params, or match_pruned: the pruned model's share (like for like)
    params_ratio: Literal["match_pruned"] | float = "match_pruned"
    round_to: int = Field(16, ge=1, le=256)  # ranks are multiples of this (int8 kernels)
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
    # images to initialise observers before training
    calibration_images: int = Field(256, gt=0, le=MAX_CALIBRATION_IMAGES)
    max_top1_diff_pp: float = Field(1.0, ge=0.0)  # ONNX vs PyTorch QAT top-1 on the test split


class StudentArch(Section):
    arch: Literal["resnet18", "resnet34", "resnet50", "mobilenet_v3_small"] = "resnet18"
    # ResNet: 16 = 1/4 of the standard width (~1/16 of the MACs);
    # mobilenet_v3_small: stem channels, 16 = the standard model
    width: int = Field(16, gt=0, le=MAX_WIDTH)
    small_input: bool = True
    # start the student from a trained model (its arch comes from the file, not from the keys
    # above); formats as teacher.format
    init: NonEmptyStr | None = None
    format: Literal["auto", "resnet_slim", "torchvision", "cifar_resnet"] = "auto"
    replace_head: bool = False  # new classifier when the file has another class count


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

    @property
    def stages_in_use(self) -> list[int]:
        """Feature stages the loss uses: none without a feature term (a 3-stage CIFAR ResNet
        teacher then needs no `feature_stages` change, and the cache holds logits only)."""
        return list(self.feature_stages) if self.feature_weight > 0 else []


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
    # training images fed to the calibrator
    calibration_images: int = Field(256, gt=0, le=MAX_CALIBRATION_IMAGES)
    per_channel: bool = True  # per-output-channel weight scales (better accuracy for convs)
    # 7-bit weights: without VNNI, x86 int8 kernels sum u8*s8 pairs in int16, which can saturate
    reduce_range: Literal["auto", True, False] = "auto"  # auto: on when this CPU lacks VNNI


class BenchmarkParams(Section):
    # the ONNX models measured, by name: the file is <models-dir>/<name>.onnx (stages/benchmark.py)
    models: list[str] = []
    # onnxruntime intra-op threads for the latency numbers
    threads: int = Field(1, ge=1, le=MAX_THREADS)
    warmup: int = Field(50, ge=0, le=MAX_BENCHMARK_RUNS)  # untimed batch-1 runs before timing
    runs: int = Field(300, gt=0, le=MAX_BENCHMARK_RUNS)  # timed batch-1 runs
    throughput_batch: int = Field(64, gt=0, le=MAX_BATCH)
    # peer baselines on the teacher: OpenVINO FP32 and OpenVINO + NNCF INT8 (what a user would
    # pick instead of this pipeline), measured by stages/export_targets.py
    peers: bool = True
    all_cores: bool = True  # also p50 with every core (onnxruntime intra-op threads = cores)
    roofline: bool = True  # conv GMAC/s micro-benchmark: how close each model is to this CPU's limit
    # top-1 confidence intervals: percentile bootstrap over test images (gate uses the same)
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap_resamples: int = Field(2000, ge=100, le=MAX_BOOTSTRAP_RESAMPLES)
    bootstrap_seed: Seed = 0

    @field_validator("models")
    @classmethod
    def _model_names(cls, names: list[str]) -> list[str]:
        if not names:
            raise ValueError("list at least one model to benchmark")
        bad = [n for n in names if not n or n.startswith(".") or any(c in n for c in "/\\\0\n")]
        if bad:
            raise ValueError(f"{bad}: a model name is an ONNX file stem (no path, no leading dot)")
        if len(set(names)) != len(names):
            raise ValueError("model names must be distinct")
        return names


class GateParams(Section):
    # a benchmark name (ONNX file stem), or auto: the fastest passing candidate
    release: NonEmptyStr = "auto"
    candidates: list[NonEmptyStr] = []  # models `auto` chooses among
    reference: NonEmptyStr = "teacher"  # the FP32 teacher it is compared with
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
    got = repr(error.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."  # a whole section as input would be a wall
    return f"{key}: {error['msg']} (got {got})"


def parse_params(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise UserError(f"{source}: {problems}") from None


def _check_unique_keys(node: yaml.Node, path: Path, key_path: str = "",
                       seen: set[int] | None = None) -> None:
    """A key written twice in one mapping is an error: PyYAML would keep the last one silently
    (a second `gate:` section appended to params.yaml replaced the first)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node checked already (and no endless recursion)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_unique_keys(item, path, f"{key_path}[{index}]", seen)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden
                continue
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            dotted = f"{key_path}.{name}" if key_path else name
            line = key_node.start_mark.line + 1
            key = (key_node.tag, name)
            if isinstance(key_node, yaml.ScalarNode) and key in first_line:
                raise UserError(f"{path}: duplicate key '{dotted}' at lines {first_line[key]} and "
                                f"{line} (YAML would keep only the last one); remove one")
            first_line[key] = line
            _check_unique_keys(value_node, path, dotted, seen)


def read_yaml(path: Path):
    """A YAML file's content, refusing duplicate keys; any YAMLError propagates."""
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: params file not found")
    try:
        raw = read_yaml(path) or {}
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
