"""params.yaml is read strictly: duplicate keys, booleans for numbers, out-of-range seeds, sizes
that would reach allocation, and empty paths are each one clear error naming the key."""

from pathlib import Path

import pytest

from resnet_slim.errors import UserError
from resnet_slim.params import MAX_SEED, load_params
from tests.conftest import REPO, write_params

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
