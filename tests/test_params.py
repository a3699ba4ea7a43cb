"""params.yaml validation, all of it: every bad value or bad file is one clear error naming the
key and the value; the file is read strictly (duplicate keys, booleans for numbers, seeds numpy
cannot take, sizes that would exhaust memory, empty paths) and within bounds (alias bombs, deep
nesting, huge integers and files are refused before they cost time or memory).

A stage stopping on such a params file, with one `error:` line, is in tests/test_stages.py."""

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from resnet_slim import params as params_module
from resnet_slim.errors import UserError
from resnet_slim.limits import MAX_YAML_BYTES, MAX_YAML_DEPTH
from resnet_slim.params import MAX_SEED, load_params
from tests.conftest import (
    REPO,
    assert_not_written,
    assert_one_line_error,
    peak_rss_kb,
    run_prepare_stage,
    tiny_params,
    write_params,
)


def test_repo_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.teacher.arch == "resnet18" and params.teacher.width == 64
    assert params.gate.max_acc_drop_pp == 1.0 and params.gate.enforce
    assert params.prepare.split == "auto"


@pytest.mark.parametrize(
    "section, values, message",
    [
        # the other cases this test had are in BAD_VALUES and BAD below, checked as strictly or
        # more strictly (the whole message), each once
        ("prune", {"raito": 0.3}, "prune.raito: unknown key")
    ],
)
def test_bad_params_name_the_key_and_value(tmp_path, section, values, message):
    path = write_params(tmp_path / "params.yaml", **{section: values})
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_params(path)


# ---------------------------------------------------------------- the closed name lists


def test_params_choices_come_from_the_registry():
    """One list per kind of name (resnet_slim/registry.py, torch-free): params.yaml's choices and
    the modules acting on them cannot drift apart."""
    from typing import get_args

    from resnet_slim import registry
    from resnet_slim.compress.channel_removal import CHANNEL_METHODS
    from resnet_slim.params import ExportParams, PruneParams, StudentArch, TeacherParams
    from resnet_slim.report.sections import base_model
    from resnet_slim.train.architectures import ARCHS, STUDENT_ONLY

    def choices(model, field):
        annotation = model.model_fields[field].annotation
        return get_args(get_args(annotation)[0]) if field == "targets" else get_args(annotation)

    assert choices(TeacherParams, "arch") == registry.RESNET_ARCHS == tuple(ARCHS)
    assert choices(StudentArch, "arch") == registry.STUDENT_ARCHS
    assert STUDENT_ONLY == registry.STUDENT_ONLY_ARCHS
    assert choices(StudentArch, "format") == choices(TeacherParams, "format")
    assert choices(PruneParams, "method") == registry.PRUNE_METHODS
    assert CHANNEL_METHODS == registry.CHANNEL_PRUNE_METHODS
    assert choices(ExportParams, "targets") == registry.EXPORT_TARGETS
    assert [base_model(f"student_{s}") for s in registry.INT8_SUFFIXES] == ["student"] * 4


def test_a_student_that_cannot_be_quantized_is_refused_when_params_load(tmp_path):
    from tests.conftest import assert_one_line_error

    params = write_params(
        tmp_path / "params.yaml", distill={"student": {"arch": "mobilenet_v3_small"}}
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.distill_student",
            "--params",
            str(params),
            "--teacher",
            "t",
            "--cache",
            "c",
            "--data",
            "d",
            "--out",
            "o",
            "--reports",
            "r",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert_one_line_error(result, 2, "distill.student", "mobilenet_v3_small cannot be QAT-trained")


def test_an_imported_student_that_cannot_be_quantized_is_refused_before_training():
    from resnet_slim.compress.student import check_student
    from resnet_slim.errors import UserError
    from resnet_slim.train.models import build_model, make_arch

    arch = make_arch(name="mobilenet_v3_small", num_classes=10, width=16)
    with pytest.raises(UserError, match="mobilenet_v3_small, which cannot be QAT-trained"):
        check_student(build_model(arch), arch, source="m.pt")
    with pytest.raises(UserError, match="lacks forward_features"):
        check_student(torch.nn.Linear(2, 2), {"name": "resnet18"}, source="m.pt")
    resnet = make_arch(name="resnet18", num_classes=10, width=8)
    check_student(build_model(resnet), resnet, source="r.pt")  # a ResNet passes


# --------------------------------------------------------------------------------------------
# bad values and bad files


BAD_VALUES = [
    ("teacher", {"lr": "fast"}, "teacher.lr: Input should be a valid number"),
    (
        "base",
        {"augment": {"hflip": "maybe"}},
        "base.augment.hflip: Input should be a valid boolean",
    ),
    ("teacher", {"epochs": 2.5}, "teacher.epochs: Input should be a valid integer"),
    ("prune", {"ratio": 1.0}, "prune.ratio: Input should be less than 1"),
    ("teacher", {"epochs": 0}, "teacher.epochs: Input should be greater than 0"),
    ("qat", {"epochs": -1}, "qat.epochs: Input should be greater than 0"),
    ("base", {"threads": 0}, "base.threads: Input should be greater than or equal to 1"),
    ("benchmark", {"threads": 0}, "benchmark.threads: Input should be greater than or equal to 1"),
    ("prune", {"temperature": 0}, "prune.temperature: Input should be greater than 0"),
    ("distill", {"temperature": -1.0}, "distill.temperature: Input should be greater than 0"),
    ("distill", {"alpha": 1.5}, "distill.alpha: Input should be less than or equal to 1"),
    ("prune", {"kd_alpha": -0.1}, "prune.kd_alpha: Input should be greater than or equal to 0"),
    ("gate", {"min_speedup": -1}, "gate.min_speedup: Input should be greater than or equal to 0"),
    ("gate", {"max_size_ratio": 0}, "gate.max_size_ratio: Input should be greater than 0"),
    ("gate", {"max_size_mb": -5}, "gate.max_size_mb: Input should be greater than 0"),
    ("teacher", {"arch": "vgg16"}, "teacher.arch: Input should be 'resnet18'"),
    ("distill", {"student": {"arch": "vit"}}, "distill.student.arch: Input should be 'resnet18'"),
    ("prepare", {"source": "mnist"}, "prepare.source: Input should be 'digits'"),
    (
        "prepare",
        {"image_size": 4},
        "prepare.image_size: Input should be greater than or equal to 8",
    ),
    ("teacher", {"lr": math.inf}, "teacher.lr: Input should be a finite number"),
    (
        "gate",
        {"max_acc_drop_pp": math.nan},
        "gate.max_acc_drop_pp: Input should be a finite number",
    ),
    ("export", {"opset": 99}, "export.opset: Value error, this torch exports ONNX opsets up to"),
    (
        "distill",
        {"student": {"fit_after_epochs": 2}},
        "distill.student.fit_after_epochs distils before the fit to the budget: it needs "
        "distill.student.fit_to_budget: true",
    ),
    (
        "distill",
        {"student": {"fit_after_epochs": 2, "fit_to_budget": True}, "train_baseline": True},
        "distill.train_baseline cannot measure what KD adds when distill.student.fit_after_epochs",
    ),
]


@pytest.mark.parametrize(
    "section, values, message",
    BAD_VALUES,
    ids=[f"{s}.{next(iter(v))}={next(iter(v.values()))}" for s, v, _ in BAD_VALUES],
)
def test_bad_param_values_name_key_and_value(tmp_path, section, values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_params(write_params(tmp_path / "params.yaml", **{section: values}))


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "params file not found"),
        ("- teacher\n- prune\n", "expected a mapping of sections at the top level"),
        ("", "teacher: Field required"),
        ("teacher: {epochs: 1}\nprune: null\n", "prune: Input should be a valid dictionary"),
        ("teacher: {epochs: 1\n", "not valid YAML (ParserError at line 2"),
    ],
    ids=["missing", "a-list", "empty", "null-section", "malformed"],
)
def test_bad_params_files(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_params(path)


@pytest.mark.parametrize(
    "models, message",
    [
        ([], "benchmark.models: Value error, list at least one model to benchmark"),
        (["../teacher"], "a model name is an ONNX file stem"),
        (["teacher", "teacher"], "benchmark.models: Value error, model names must be distinct"),
        ("teacher", "benchmark.models: Input should be a valid list"),
    ],
    ids=["empty", "a-path", "repeated", "not-a-list"],
)
def test_benchmark_models_in_params(tmp_path, models, message):
    with pytest.raises(UserError, match=message):
        load_params(tiny_params(tmp_path / "params.yaml", benchmark={"models": models}))


# --------------------------------------------------------------------------------------------
# strict reading: duplicate keys, booleans for numbers, seeds, sizes, empty paths


MINIMAL = "teacher:\n  epochs: 1\n"


def load_text(tmp_path: Path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return load_params(path)


@pytest.mark.parametrize(
    "text, message",
    [
        (
            MINIMAL + "gate:\n  min_speedup: 2\ngate:\n  min_speedup: 0\n",
            "duplicate key 'gate' at lines 3 and 5",
        ),
        (
            "teacher:\n  epochs: 1\n  lr: 0.1\n  epochs: 3\n",
            "duplicate key 'teacher.epochs' at lines 2 and 4",
        ),
        (
            MINIMAL + "distill:\n  student:\n    width: 8\n    width: 16\n",
            "duplicate key 'distill.student.width' at lines 5 and 6",
        ),
        (
            MINIMAL + "gate: {enforce: true, enforce: false}\n",
            "duplicate key 'gate.enforce' at lines 3 and 3",
        ),
    ],
    ids=["section", "key", "nested", "flow"],
)
def test_duplicate_keys_name_the_key_and_both_lines(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as caught:
        load_text(tmp_path, text)
    assert "\n" not in str(caught.value)


def test_merge_keys_may_be_overridden_and_sections_may_share_key_names(tmp_path):
    params = load_text(
        tmp_path, "teacher: &t\n  epochs: 1\n  lr: 0.05\nqat:\n  <<: *t\n  lr: 0.2\n"
    )
    assert params.teacher.lr == 0.05 and params.qat.lr == 0.2 and params.qat.epochs == 1


def test_repo_params_and_every_preset_pass_the_strict_checks():
    from resnet_slim.presets import available_presets, preset_overrides

    load_params(REPO / "params.yaml")
    names = available_presets()
    assert names
    for name in names:  # each preset merged over params.yaml goes through parse_params
        assert preset_overrides([name], params_path=REPO / "params.yaml")


BAD = [
    ("teacher", {"epochs": True}, "teacher.epochs: Input should be a valid integer (got True)"),
    ("teacher", {"width": False}, "teacher.width: Input should be a valid integer (got False)"),
    ("base", {"seeds": [0, True]}, "base.seeds.1: Input should be a valid integer (got True)"),
    ("teacher", {"batch_size": "64"}, "teacher.batch_size: Input should be a valid integer"),
    ("teacher", {"width": "1e6"}, "teacher.width: Input should be a valid integer (got '1e6')"),
    ("teacher", {"lr": True}, "teacher.lr: Input should be a valid number"),
    ("base", {"seed": -1}, "base.seed: Input should be greater than or equal to 0 (got -1)"),
    ("base", {"seed": 2**32}, f"base.seed: Input should be less than or equal to {MAX_SEED}"),
    (
        "base",
        {"seeds": [1, 2**40]},
        f"base.seeds.1: Input should be less than or equal to {MAX_SEED}",
    ),
    ("benchmark", {"bootstrap_seed": -5}, "benchmark.bootstrap_seed: Input should be greater than"),
    ("teacher", {"width": 1_000_000}, "teacher.width: Input should be less than or equal to 256"),
    (
        "distill",
        {"student": {"width": 200_000}},
        "distill.student.width: Input should be less than or equal to 256",
    ),
    ("base", {"threads": 1_000_000}, "base.threads: Input should be less than or equal to 1024"),
    ("base", {"nproc": 10_000}, "base.nproc: Input should be less than or equal to 64"),
    (
        "teacher",
        {"batch_size": 1_000_000},
        "teacher.batch_size: Input should be less than or equal to 4096",
    ),
    (
        "prune",
        {"finetune": {"epochs": 1, "batch_size": 10**9}},
        "prune.finetune.batch_size: Input should be less",
    ),
    (
        "prepare",
        {"image_size": 100_000},
        "prepare.image_size: Input should be less than or equal to 512",
    ),
    (
        "qat",
        {"calibration_images": 10**9},
        "qat.calibration_images: Input should be less than or equal to 65536",
    ),
    (
        "ptq",
        {"calibration_images": 10**9},
        "ptq.calibration_images: Input should be less than or equal to 65536",
    ),
    (
        "benchmark",
        {"rounds": 10**9},
        "benchmark.rounds: Input should be less than or equal to 100000",
    ),
    ("benchmark", {"rounds": 2}, "benchmark.rounds: Input should be greater than or equal to 5"),
    ("benchmark", {"runs_per_round": 0}, "benchmark.runs_per_round: Input should be greater"),
    (
        "benchmark",
        {"rounds": 1000, "runs_per_round": 1000, "round_warmup": 0},
        "is 1,000,000 calls per model, over 100,000",
    ),
    ("gate", {"speedup_statistic": "median"}, "gate.speedup_statistic: Input should be 'point'"),
    (
        "gate",
        {"max_acc_drop_pp": 1e308},
        "gate.max_acc_drop_pp: Input should be less than or equal",
    ),
    ("gate", {"min_speedup": 1e9}, "gate.min_speedup: Input should be less than or equal to"),
    ("gate", {"max_size_ratio": 1e9}, "gate.max_size_ratio: Input should be less than or equal"),
    (
        "benchmark",
        {"warmup": 10**9},
        "benchmark.warmup: Input should be less than or equal to 100000",
    ),
    ("benchmark", {"throughput_batch": 10**6}, "benchmark.throughput_batch: Input should be less"),
    (
        "benchmark",
        {"threads": 10**6},
        "benchmark.threads: Input should be less than or equal to 1024",
    ),
    (
        "benchmark",
        {"bootstrap_resamples": 10**8},
        "benchmark.bootstrap_resamples: Input should be less",
    ),
    (
        "base",
        {"augment": {"crop_padding": 10**6}},
        "base.augment.crop_padding: Input should be less",
    ),
    (
        "prepare",
        {"source": "imagefolder", "root": ""},
        "prepare.root: Value error, must not be empty (got '')",
    ),
    (
        "prepare",
        {"source": "imagefolder", "root": "   "},
        "prepare.root: Value error, must not be empty",
    ),
    ("prepare", {"root": 5}, "prepare.root: Input should be a valid string"),
    (
        "prepare",
        {"split": "official"},
        "prepare.split: Input should be 'auto', 'given' or 'random' (got 'official')",
    ),
    (
        "prepare",
        {"split": None},
        "prepare.split: Input should be 'auto', 'given' or 'random' (got None)",
    ),
    ("gate", {"release": ""}, "gate.release: Value error, must not be empty"),
    ("gate", {"candidates": ["a", " "]}, "gate.candidates.1: Value error, must not be empty"),
]


@pytest.mark.parametrize(
    "section, values, message",
    BAD,
    ids=[f"{s}.{next(iter(v))}={str(next(iter(v.values())))[:12]}" for s, v, _ in BAD],
)
def test_strict_values_name_key_and_value(tmp_path, section, values, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_params(write_params(tmp_path / "params.yaml", **{section: values}))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "section, values",
    [
        ("base", {"seed": MAX_SEED}),
        ("base", {"seeds": [0, MAX_SEED]}),
        ("teacher", {"width": 256}),
        ("teacher", {"lr": 1}),  # an int where a float is meant is still fine
        ("prepare", {"source": "imagefolder", "root": "data/raw"}),
        ("prepare", {"root": None}),
        ("prepare", {"split": "given"}),
        ("prepare", {"split": "random"}),
        ("prepare", {"split": "auto"}),
    ],
)
def test_values_at_the_limits_are_accepted(tmp_path, section, values):
    params = load_params(write_params(tmp_path / "params.yaml", **{section: values}))
    key, value = next(iter(values.items()))
    assert getattr(getattr(params, section), key) == value


def test_a_huge_value_echoed_in_the_error_is_cut_short(tmp_path):
    with pytest.raises(UserError) as caught:
        load_params(write_params(tmp_path / "params.yaml", base={"seeds": "x" * 5000}))
    assert len(str(caught.value)) < 400


def test_presets_and_seed_repeats_refuse_duplicate_keys_too(tmp_path):
    from resnet_slim.gate.seeds import read_stages
    from resnet_slim.presets import load_preset

    (tmp_path / "p.yaml").write_text("prune:\n  ratio: 0.2\nprune:\n  ratio: 0.6\n")
    with pytest.raises(UserError, match="duplicate key 'prune' at lines 1 and 3"):
        load_preset("p", tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages:\n  a:\n    cmd: x\n  a:\n    cmd: y\n")
    with pytest.raises(UserError, match="duplicate key 'stages.a'"):
        read_stages(tmp_path / "dvc.yaml")


# --------------------------------------------------------------------------------------------
# bounds: alias bombs, deep nesting, huge integers, huge files, prepare.max_file_mb


def refused_quickly(path: Path, *words: str) -> str:
    """load_params(path) raises a one-line UserError holding `words`, within seconds and without
    growing this process's peak memory by more than 100 MB."""
    before, start = peak_rss_kb(), time.monotonic()
    with pytest.raises(UserError) as caught:
        load_params(path)
    elapsed, grown_mb = time.monotonic() - start, (peak_rss_kb() - before) / 1024
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, (word, message)
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert grown_mb < 100, f"peak memory grew {grown_mb:.0f} MB"
    return message


def alias_bomb(levels: int = 9, fan_out: int = 9) -> str:
    """`levels` anchors, each a list of `fan_out` aliases of the one before: fan_out**levels
    values once expanded (9, 9: 387 million) from about 1 KB of text."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * fan_out)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * fan_out)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", ["base: {seeds: *l8}", "benchmark: {models: *l8}"])
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, where):
    path = tmp_path / "params.yaml"
    path.write_text(alias_bomb() + "teacher: {epochs: 1}\n" + where + "\n")
    refused_quickly(path, "aliases (*name) would expand it to more than 100,000 values")


def test_aliases_of_a_long_string_are_capped_by_characters(tmp_path):
    path = tmp_path / "params.yaml"
    text = "s: &s '" + "x" * 200_000 + "'\nbenchmark: {models: [" + ", ".join(["*s"] * 80) + "]}\n"
    path.write_text(text)
    refused_quickly(path, "more than 10,000,000 characters")


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base: {seeds: &s [1, *s]}\n")
    refused_quickly(path, "recursive structure")


def test_merge_keys_and_ordinary_aliases_still_work(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        "teacher: &t {epochs: 1, lr: 0.05}\nqat:\n  <<: *t\n  lr: 0.2\nbase: {seeds: [3, 4]}\n"
    )
    params = load_params(path)
    assert params.qat.epochs == 1 and params.qat.lr == 0.2 and params.base.seeds == [3, 4]


@pytest.mark.parametrize(
    "layout", ["flow-lists", "flow-mappings", "block-lists", "block-mappings", "via-aliases"]
)
def test_deep_nesting_is_refused_without_a_recursion_error(tmp_path, layout):
    n = 50_000
    if layout == "flow-lists":
        text = "base: {seeds: " + "[" * n + "]" * n + "}\n"
    elif layout == "flow-mappings":
        text = "base: " + "{a: " * n + "1" + "}" * n + "\n"
    elif layout == "block-lists":  # "- - - 1": each dash a list inside the one before
        text = "base:\n  seeds:\n  " + "- " * 5_000 + "1\n"
    elif layout == "block-mappings":
        text = "base:\n" + "".join(" " * (i + 1) + f"k{i}:\n" for i in range(199))
        text += " " * 200 + "k199: 1\n"
    else:  # each anchor 40 deep, each alias inside 40 more: deep only once expanded
        text = "a0: &a0 " + "[" * 40 + "]" * 40 + "\n"
        for i in range(1, 5):
            text += f"a{i}: &a{i} " + "[" * 40 + f"*a{i - 1}" + "]" * 40 + "\n"
        text += "base: {seeds: *a4}\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    refused_quickly(path, f"more than {MAX_YAML_DEPTH} deep")


def test_a_5000_digit_integer_is_one_line_naming_the_file(tmp_path):
    path = write_params(tmp_path / "params.yaml", base={"seed": int("1" * 4000)})
    path.write_text(path.read_text().replace("1" * 4000, "1" * 5000))
    refused_quickly(path, "an integer of 5,000 characters at line")
    path.write_text("base: {seed: !!int 'twelve'}\n")  # an explicit tag int() cannot read
    refused_quickly(path, "a value cannot be read (invalid literal for int()")


def test_an_oversize_params_file_is_refused_before_it_is_parsed(tmp_path):
    path = write_params(tmp_path / "params.yaml")
    with path.open("a") as file:
        file.write("# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    refused_quickly(path, f"over the {MAX_YAML_BYTES:,}-byte limit")


def test_many_values_without_aliases_are_capped_while_composing(tmp_path, monkeypatch):
    monkeypatch.setattr(params_module, "MAX_YAML_NODES", 1_000)  # the real cap takes seconds
    path = tmp_path / "params.yaml"
    path.write_text("base: {seeds: [" + "0, " * 100_000 + "0]}\n")
    refused_quickly(path, "more than 1,000 values (by line 1)")


@pytest.mark.parametrize("value", [0, -1, 1e9, "50"])
def test_max_file_mb_must_be_a_positive_bounded_number(tmp_path, value):
    with pytest.raises(UserError, match="prepare.max_file_mb"):
        load_params(write_params(tmp_path / "params.yaml", prepare={"max_file_mb": value}))


def test_the_repository_params_set_a_file_cap():
    assert 0 < load_params(Path(__file__).resolve().parents[1] / "params.yaml").prepare.max_file_mb


def test_the_prepare_stage_refuses_an_alias_bomb_in_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(alias_bomb() + "teacher: {epochs: 1}\nbase: {seeds: *l8}\n")
    assert_one_line_error(run_prepare_stage(tmp_path, path), 2, "params.yaml", "aliases")
    assert_not_written(tmp_path / "prepared")
