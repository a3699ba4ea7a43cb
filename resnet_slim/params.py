"""Typed params.yaml: one pydantic model per stage section; unknown keys and bad values are errors.

The repository's params.yaml is the one place every key's default and its explanation live: the
models here hold only types and the checks on them. A key that a params file (or a section built
in code) leaves out takes params.yaml's value at the same place, so a partial file means "the
repository's run, but ...". Every stage validates the whole file at start, so a typo anywhere
(`prune.raito`) fails fast with one line naming the key, the value and what is allowed.
"""

import functools
import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from resnet_slim import registry
from resnet_slim.errors import UserError

# caps on sizes and counts that would otherwise reach allocations (see limits.py)
from resnet_slim.limits import (
    MAX_BATCH,
    MAX_BENCHMARK_RUNS,
    MAX_BOOTSTRAP_RESAMPLES,
    MAX_CALIBRATION_IMAGES,
    MAX_IMAGE_FILE_MB,
    MAX_NPROC,
    MAX_SEED,
    MAX_THREADS,
    MAX_WIDTH,
    MAX_YAML_BYTES,
    MAX_YAML_CHARS,
    MAX_YAML_DEPTH,
    MAX_YAML_INT_CHARS,
    MAX_YAML_NODES,
)

DEFAULTS_FILE = Path(__file__).resolve().parent.parent / "params.yaml"


# --------------------------------------------------------------------------------------------
# reading YAML strictly


def _check_unique_keys(
    node: yaml.Node, path: Path, key_path: str = "", seen: set[int] | None = None
) -> None:
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
                raise UserError(
                    f"{path}: duplicate key '{dotted}' at lines {first_line[key]} and "
                    f"{line} (YAML would keep only the last one); remove one"
                )
            first_line[key] = line
            _check_unique_keys(value_node, path, dotted, seen)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a document of more than MAX_YAML_NODES nodes or nested
    deeper than MAX_YAML_DEPTH as soon as the composer gets there. Its composer recurses once per
    level (50,000 nested brackets were a RecursionError) and builds every node it reads."""

    def __init__(self, text: str, path: Path):
        super().__init__(text)
        self.path, self.depth, self.nodes = path, 0, 0

    def compose_node(self, parent, index):
        line = self.peek_event().start_mark.line + 1
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise UserError(
                f"{self.path}: more than {MAX_YAML_NODES:,} values (by line {line}); refusing "
                f"to read a YAML file this large"
            )
        if self.depth >= MAX_YAML_DEPTH:
            raise UserError(
                f"{self.path}: lists / mappings nested more than {MAX_YAML_DEPTH} deep (at line "
                f"{line}); refusing to read it"
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_INT_TAG = "tag:yaml.org,2002:int"


def _where(node: yaml.Node) -> str:
    return f"line {node.start_mark.line + 1}"


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    return [child for pair in node.value for child in pair]  # a mapping's keys and values


def _too_deep(path: Path, node: yaml.Node) -> UserError:
    return UserError(
        f"{path}: aliases nest lists / mappings more than {MAX_YAML_DEPTH} deep "
        f"(at {_where(node)}); refusing to read it"
    )


def _check_totals(path: Path, nodes: int, chars: int, node: yaml.Node) -> None:
    if nodes > MAX_YAML_NODES or chars > MAX_YAML_CHARS:
        what = (
            f"{MAX_YAML_NODES:,} values"
            if nodes > MAX_YAML_NODES
            else f"{MAX_YAML_CHARS:,} characters"
        )
        raise UserError(
            f"{path}: aliases (*name) would expand it to more than {what} (by "
            f"{_where(node)}); refusing to read it"
        )


def _check_scalar(path: Path, node: yaml.ScalarNode) -> None:
    if node.tag == _INT_TAG and len(node.value) > MAX_YAML_INT_CHARS:
        raise UserError(
            f"{path}: an integer of {len(node.value):,} characters at {_where(node)}; "
            f"no setting takes one longer than {MAX_YAML_INT_CHARS}"
        )


def _check_expanded_size(root: yaml.Node, path: Path) -> None:
    """Refuse a document that aliases (`*name`) would make too large, too deep or endless.

    An alias is a reference to one composed node, but building the document and everything
    after it (validation, error messages, merge keys) treats each as a copy: 11 KB of nested
    aliases expand to gigabytes. So count what the expanded document would hold, each node's
    subtree once (memoised), stopping at the first cap passed; also refuse integers with more
    digits than any setting has (Python would raise a ValueError converting them).
    """
    sizes: dict[int, tuple[int, int, int]] = {}  # id(node) -> (nodes, characters, height)
    active: set[int] = set()  # the nodes on the current path: one met again is a cycle

    def visit(node: yaml.Node, depth: int) -> tuple[int, int, int]:
        # `depth`: how deep `node` sits in the expanded document (the root: 1)
        if id(node) in active:
            raise UserError(
                f"{path}: an alias at or below {_where(node)} refers to a node that contains "
                f"it (a recursive structure); write the values out instead"
            )
        known = sizes.get(id(node))
        if known is None:
            if depth > MAX_YAML_DEPTH:
                raise _too_deep(path, node)
            if isinstance(node, yaml.ScalarNode):
                _check_scalar(path, node)
                known = (1, len(node.value), 1)
            else:
                nodes, chars, height = 1, 0, 1
                active.add(id(node))
                for child in _children(node):
                    child_nodes, child_chars, child_height = visit(child, depth + 1)
                    nodes, chars = nodes + child_nodes, chars + child_chars
                    height = max(height, child_height + 1)
                    _check_totals(path, nodes, chars, child)
                active.discard(id(node))
                known = (nodes, chars, height)
            sizes[id(node)] = known
        if depth - 1 + known[2] > MAX_YAML_DEPTH:  # a node reached again deeper down, by alias
            raise _too_deep(path, node)
        return known

    visit(root, 1)


def read_yaml(path: Path):
    """A YAML file's content, refusing duplicate keys; any YAMLError propagates.

    Bounded before anything is built (caps in limits.py): a file over MAX_YAML_BYTES, one whose
    aliases would expand past MAX_YAML_NODES values, one nested past MAX_YAML_DEPTH and an
    overlong integer are each a one-line UserError naming the file.
    """
    with open(path, "rb") as file:  # at most one byte past the cap, whatever the file is
        data = file.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        size = max(len(data), os.stat(path).st_size)
        raise UserError(
            f"{path}: {size:,} bytes, over the {MAX_YAML_BYTES:,}-byte limit for a YAML "
            f"settings file; refusing to read it"
        )
    loader = _BoundedLoader(data.decode("utf-8"), path)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, path)
        _check_unique_keys(node, path)
        try:
            return loader.construct_document(node)
        except ValueError as err:  # int("1" * 5000) past the caps' checks (e.g. `!!int` tags)
            detail = str(err).splitlines()[0] if str(err) else err.__class__.__name__
            raise UserError(f"{path}: a value cannot be read ({detail})") from None
    except RecursionError:  # the caps above should prevent it; never a traceback anyway
        raise UserError(f"{path}: nested too deeply to read; refusing it") from None
    finally:
        loader.dispose()


def read_params_file(path: Path) -> dict:
    """A params file's sections, unvalidated; every problem reading it is a one-line UserError."""
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
    return raw


# --------------------------------------------------------------------------------------------
# defaults: the repository's params.yaml


@functools.cache
def repo_defaults() -> dict:
    """The repository's params.yaml, read once per process."""
    return read_params_file(DEFAULTS_FILE)


def defaults_at(where: str) -> dict:
    """The mapping at dotted `where` ("prune.finetune"; "": the whole file) in params.yaml."""
    node = repo_defaults()
    for key in filter(None, where.split(".")):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def merged(base: dict, overlay: dict) -> dict:
    """A new dict: `overlay`'s leaves over `base` (nested mappings merged, anything else
    replaced)."""
    out = dict(base)
    for key, value in overlay.items():
        both_dicts = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both_dicts else value
    return out


# --------------------------------------------------------------------------------------------
# the sections

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

    at: ClassVar[str | None] = None  # where the section's defaults sit in params.yaml; None: none
    required: ClassVar[tuple[str, ...]] = ()  # keys never taken from params.yaml

    @model_validator(mode="before")
    @classmethod
    def _defaults_from_params_yaml(cls, values):
        if cls.at is None or not isinstance(values, dict):
            return values  # not a mapping: the field's own error says what is wrong
        # only this class's fields: a TrainParams built in code takes the teacher's training keys
        defaults = {
            key: value
            for key, value in defaults_at(cls.at).items()
            if key in cls.model_fields and key not in cls.required
        }
        return merged(defaults, values)  # the user's values are checked whole, never filtered


class Augment(Section):
    at = "base.augment"
    crop_padding: int = Field(ge=0, le=64)
    hflip: bool


class BaseParams(Section):
    at = "base"
    seed: Seed
    threads: int = Field(ge=1, le=MAX_THREADS)
    nproc: int = Field(ge=1, le=MAX_NPROC)
    device: Literal["auto", "cpu", "cuda"]
    sync_bn: bool
    augment: Augment
    seeds: list[Seed] = Field(max_length=100)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct")
        return seeds


class NormalizeStats(Section):  # written out whole by the user: no defaults
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[Annotated[float, Field(gt=0.0)]] = Field(min_length=3, max_length=3)


class PrepareParams(Section):
    at = "prepare"
    source: Literal["digits", "imagefolder", "cifar10"]
    root: NonEmptyStr | None
    split: Literal["auto", "given", "random"]
    image_size: int = Field(ge=8, le=512)
    val_fraction: float = Field(gt=0.0, lt=0.5)
    test_fraction: float = Field(gt=0.0, lt=0.5)
    max_images_per_class: int | None = Field(gt=0)
    on_bad_image: Literal["skip", "fail"]
    max_file_mb: float = Field(gt=0.0, le=MAX_IMAGE_FILE_MB)  # bytes / 1e6, checked before reading
    normalize: Literal["dataset", "imagenet"] | NormalizeStats

    @field_validator("normalize", mode="wrap")
    @classmethod
    def _one_line_normalize_error(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:  # the union's per-branch errors would be three long lines
            raise ValueError(
                "expected dataset, imagenet or {mean: [r, g, b], std: [r, g, b]} "
                "(3 numbers each, std > 0)"
            ) from None


class ValidateDataParams(Section):
    at = "validate_data"
    min_class_share: float = Field(ge=0.0, le=1.0)
    max_class_share: float = Field(ge=0.0, le=1.0)


class TrainParams(Section):
    """Hyper-parameters of one run of the shared training loop."""

    at = "teacher"  # built on its own; as prune.finetune / lowrank.finetune the parent fills it
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0, le=MAX_BATCH)
    lr: float = Field(gt=0.0)
    momentum: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    warmup_epochs: float = Field(ge=0.0)
    label_smoothing: float = Field(ge=0.0, lt=1.0)


class TeacherParams(TrainParams):
    at = "teacher"
    arch: Literal[registry.RESNET_ARCHS]
    width: int = Field(gt=0, le=MAX_WIDTH)
    small_input: bool
    epochs: int = Field(ge=0)  # 0 is allowed here, with `init` (checked below)
    init: NonEmptyStr | None
    format: Literal[registry.IMPORT_FORMATS]
    replace_head: bool

    @field_validator("init")
    @classmethod
    def _zero_epochs_needs_init(cls, init, info):
        if info.data.get("epochs") == 0 and init is None:
            raise ValueError(
                "teacher.epochs: Input should be greater than 0 to train from "
                "scratch; epochs 0 (use a model as is) needs teacher.init"
            )
        return init


class SparsityParams(TrainParams):
    at = "prune.sparsity"
    epochs: int = Field(ge=0)
    l1_lambda: float = Field(ge=0.0)


class LatencyPruneParams(Section):
    at = "prune.latency"
    structure: Literal[registry.LATENCY_STRUCTURES]
    speedup: float = Field(gt=1.0, le=1000.0)
    width_steps: int = Field(ge=1, le=64)
    cost_images: int = Field(gt=0, le=100_000)
    rounds: int = Field(ge=1, le=20)
    max_params_ratio: float | None = Field(gt=0.0, le=1.0)


class PruneParams(Section):
    at = "prune"
    method: Literal[registry.PRUNE_METHODS]
    latency: LatencyPruneParams
    ratio: float = Field(ge=0.0, lt=1.0)
    global_pruning: bool
    keep_residual_streams: bool
    round_to: int | None = Field(ge=1, le=256)
    kd_alpha: float = Field(ge=0.0, le=1.0)
    temperature: float = Field(gt=0.0)
    sparsity: SparsityParams
    finetune: TrainParams


class LowrankParams(Section):
    at = "lowrank"
    params_ratio: Literal["match_pruned"] | float
    round_to: int = Field(ge=1, le=256)
    finetune: TrainParams

    @field_validator("params_ratio")
    @classmethod
    def _ratio_in_range(cls, value):
        if value != "match_pruned" and not 0.0 < value < 1.0:
            raise ValueError("must be in (0, 1) or match_pruned")
        return value


class QatParams(TrainParams):
    at = "qat"
    backend: Literal["x86", "fbgemm", "qnnpack"]
    freeze_observer_epoch: int = Field(ge=0)
    freeze_bn_epoch: int = Field(ge=0)
    calibration_images: int = Field(gt=0, le=MAX_CALIBRATION_IMAGES)
    min_agreement: float = Field(ge=0.0, le=1.0)


class StudentArch(Section):
    at = "distill.student"
    arch: Literal[registry.STUDENT_ARCHS]
    width: int = Field(gt=0, le=MAX_WIDTH)
    small_input: bool
    init: NonEmptyStr | None
    format: Literal[registry.IMPORT_FORMATS]
    replace_head: bool
    fit_to_budget: bool
    # the student's own budget / size target (null: prune.latency's speedup / max_params_ratio)
    fit_speedup: float | None = Field(gt=1.0, le=1000.0)
    fit_max_params_ratio: float | None = Field(gt=0.0, le=1.0)
    # distil this many epochs before the fit, so blocks are priced on a student adapted to the data
    fit_after_epochs: int = Field(ge=0)

    def fit_params(self, latency: LatencyPruneParams) -> LatencyPruneParams:
        """prune.latency with the student's own speedup / max_params_ratio where it sets them."""
        overrides = {"speedup": self.fit_speedup, "max_params_ratio": self.fit_max_params_ratio}
        chosen = {key: value for key, value in overrides.items() if value is not None}
        return LatencyPruneParams(**{**latency.model_dump(), **chosen})

    @model_validator(mode="after")
    def _quantizable(self):
        # every run trains the student with QAT (qat@student): refuse now, not after distillation
        if self.init is None and self.arch not in registry.QAT_ARCHS:
            raise ValueError(
                f"arch {self.arch} cannot be QAT-trained, and every run quantizes the student "
                f"(qat@student): use one of {', '.join(registry.RESNET_ARCHS)}"
            )
        return self


class DistillParams(TrainParams):
    at = "distill"
    student: StudentArch
    alpha: float = Field(ge=0.0, le=1.0)
    temperature: float = Field(gt=0.0)
    feature_weight: float = Field(ge=0.0)
    feature_stages: list[Literal[1, 2, 3, 4]]
    cache_teacher: bool
    train_baseline: bool

    @property
    def stages_in_use(self) -> list[int]:
        """Feature stages the loss uses: none without a feature term (a 3-stage CIFAR ResNet
        teacher then needs no `feature_stages` change, and the cache holds logits only)."""
        return list(self.feature_stages) if self.feature_weight > 0 else []

    @model_validator(mode="after")
    def _fit_after_epochs_needs_a_fit(self):
        if self.student.fit_after_epochs and not self.student.fit_to_budget:
            raise ValueError(
                "distill.student.fit_after_epochs distils before the fit to the budget: "
                "it needs distill.student.fit_to_budget: true (or set it to 0)"
            )
        if self.student.fit_after_epochs and self.train_baseline:
            # the no-teacher baseline would start from a student the teacher already trained
            raise ValueError(
                "distill.train_baseline cannot measure what KD adds when "
                "distill.student.fit_after_epochs distils before the fit: set one of them off"
            )
        return self


def max_export_opset() -> int | None:
    """The newest ONNX opset torch's TorchScript exporter writes (None: unknown, let torch
    decide), read from torch's source without importing torch: every stage validates params at
    start, and importing torch there would cost `prepare` ~0.5 GB of RSS and seconds."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    constants = Path(spec.submodule_search_locations[0]) / "onnx" / "_constants.py"
    try:
        tree = ast.parse(constants.read_text())
    except (OSError, SyntaxError):
        return None
    for node in tree.body:  # `ONNX_MAX_OPSET = 23`
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == "ONNX_MAX_OPSET" for t in node.targets
        ):
            value = node.value.value if isinstance(node.value, ast.Constant) else None
            return int(value) if isinstance(value, int) else None
    return None


class ExportParams(Section):
    at = "export"
    opset: int = Field(ge=13)
    min_top1_agreement: float = Field(ge=0.0, le=1.0)
    max_abs_diff: float = Field(gt=0.0)
    targets: list[Literal[registry.EXPORT_TARGETS]]
    max_top1_diff_pp: float = Field(ge=0.0)

    @field_validator("opset")
    @classmethod
    def _exportable(cls, opset: int) -> int:
        # checked here so a stage fails at start, not after training (export.py checks again)
        max_opset = max_export_opset()
        if max_opset is not None and opset > max_opset:
            raise ValueError(f"this torch exports ONNX opsets up to {max_opset}")
        return opset


class PtqParams(Section):
    at = "ptq"
    calibration_images: int = Field(gt=0, le=MAX_CALIBRATION_IMAGES)
    per_channel: bool
    reduce_range: Literal["auto", True, False]


class BenchmarkParams(Section):
    at = "benchmark"
    models: list[str]
    threads: int = Field(ge=1, le=MAX_THREADS)
    warmup: int = Field(ge=0, le=MAX_BENCHMARK_RUNS)
    rounds: int = Field(ge=5, le=MAX_BENCHMARK_RUNS)  # a bootstrap over fewer rounds says little
    runs_per_round: int = Field(gt=0, le=MAX_BENCHMARK_RUNS)
    round_warmup: int = Field(ge=0, le=MAX_BENCHMARK_RUNS)
    order_seed: Seed
    throughput_batch: int = Field(gt=0, le=MAX_BATCH)
    peers: bool
    all_cores: bool
    roofline: bool
    ci_level: float = Field(gt=0.5, lt=1.0)
    bootstrap_resamples: int = Field(ge=100, le=MAX_BOOTSTRAP_RESAMPLES)
    bootstrap_seed: Seed

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

    @model_validator(mode="after")
    def _bounded_timing(self):
        if self.rounds * (self.runs_per_round + self.round_warmup) > MAX_BENCHMARK_RUNS:
            raise ValueError(
                f"rounds x (runs_per_round + round_warmup) is "
                f"{self.rounds * (self.runs_per_round + self.round_warmup):,} calls per model, "
                f"over {MAX_BENCHMARK_RUNS:,}"
            )
        return self

    @property
    def timed_runs(self) -> int:
        """Timed calls per model (a model timed alone uses as many as one in the rounds)."""
        return self.rounds * self.runs_per_round


class GateParams(Section):
    at = "gate"
    release: NonEmptyStr
    candidates: list[NonEmptyStr]
    reference: NonEmptyStr
    # bounded: a threshold no measurement can reach (1e308 pp) would pass any model silently
    max_acc_drop_pp: float = Field(ge=-100.0, le=100.0)
    acc_drop_statistic: Literal["point", "upper_ci"]
    min_speedup: float = Field(ge=0.0, le=1e6)
    speedup_statistic: Literal["point", "lower_ci"]
    max_size_ratio: float = Field(gt=0.0, le=1e6)
    max_size_mb: float | None = Field(gt=0.0, le=1e6)
    enforce: bool


class Params(Section):
    at = ""
    # an empty or teacher-less file is a mistake, not a request for the repository's whole run
    required = ("teacher",)
    base: BaseParams
    prepare: PrepareParams
    validate_data: ValidateDataParams
    teacher: TeacherParams
    prune: PruneParams
    lowrank: LowrankParams
    qat: QatParams
    distill: DistillParams
    export: ExportParams
    ptq: PtqParams
    benchmark: BenchmarkParams
    gate: GateParams


# --------------------------------------------------------------------------------------------
# loading


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


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    return parse_params(read_params_file(path), source=str(path))
