"""params.yaml is the one place defaults live: the models in resnet_slim/params.py hold no default,
every field is a key of params.yaml at its place (and every key a field), and whatever a params
file or a caller leaves out comes from there."""

import pytest
import yaml
from pydantic import ValidationError

from resnet_slim import params as P
from resnet_slim.errors import UserError
from tests.conftest import REPO


def section_classes(cls=P.Section) -> list[type[P.Section]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *section_classes(sub)]
    return out


def nested_section(field) -> type[P.Section] | None:
    """The Section class a field holds, if it holds one (a union such as normalize is a leaf)."""
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, P.Section) else None


def places(cls=P.Params, path: str = "") -> list[tuple[str, type[P.Section]]]:
    """(dotted path in params.yaml, Section class) for every section, nested ones included."""
    out = [(path, cls)]
    for name, field in cls.model_fields.items():
        if (sub := nested_section(field)) is not None:
            out += places(sub, f"{path}.{name}" if path else name)
    return out


def repo_yaml() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_no_field_has_a_default_in_code():
    with_default = [
        f"{cls.__name__}.{name}"
        for cls in section_classes()
        for name, field in cls.model_fields.items()
        if not field.is_required()
    ]
    assert not with_default, f"defaults belong in params.yaml, not in code: {with_default}"


def test_every_field_is_a_key_of_params_yaml_and_every_key_a_field():
    raw, problems = repo_yaml(), []
    for path, cls in places():
        node = raw
        for key in filter(None, path.split(".")):
            node = node[key]
        fields = set(cls.model_fields)
        problems += [
            f"{path}.{k}".lstrip(".") + ": field missing from params.yaml"
            for k in sorted(fields - set(node))
        ]
        problems += [
            f"{path}.{k}".lstrip(".") + ": in params.yaml but not a field"
            for k in sorted(set(node) - fields)
        ]
    assert not problems, problems


def test_each_section_class_takes_its_defaults_from_its_own_place():
    for path, cls in places():
        if cls is not P.TrainParams:  # shared by prune.finetune and lowrank.finetune
            assert cls.at == path, (cls.__name__, cls.at, path)
    unplaced = [c.__name__ for c in section_classes() if c.at is None]
    assert unplaced == ["NormalizeStats"]  # a union branch the user writes out whole


def test_loading_params_yaml_equals_the_defaults():
    loaded = P.load_params(REPO / "params.yaml")
    assert P.parse_params({"teacher": {}}) == loaded  # everything left out: params.yaml's values
    for path, cls in places():
        if path and cls is not P.TrainParams:  # each section built in code with no arguments
            section = loaded
            for key in path.split("."):
                section = getattr(section, key)
            assert cls() == section, path
    training_keys = set(P.TrainParams.model_fields)
    assert P.TrainParams().model_dump() == loaded.teacher.model_dump(include=training_keys)


def test_repo_defaults_read_the_repository_file_whatever_the_working_directory(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    assert P.DEFAULTS_FILE == REPO / "params.yaml"
    assert P.repo_defaults() == repo_yaml()


@pytest.mark.parametrize(
    "section, values, key, expected",
    [
        (
            "prune",
            {"finetune": {"epochs": 1}},
            "prune.finetune.lr",
            0.02,
        ),  # its own place, not teacher's
        ("prune", {"finetune": {"epochs": 1}}, "prune.finetune.epochs", 1),
        ("lowrank", {"finetune": {"lr": 0.01}}, "lowrank.finetune.epochs", 1),
        ("distill", {"student": {"width": 8}}, "distill.student.arch", "resnet18"),
        (
            "gate",
            {"release": "student"},
            "gate.candidates",
            ["student_qat_int8", "pruned_qat_int8"],
        ),
        ("gate", {"release": "student"}, "gate.acc_drop_statistic", "point"),
        ("prepare", {"source": "imagefolder", "root": "data/raw"}, "prepare.split", "auto"),
    ],
)
def test_a_key_left_out_takes_params_yaml_value_at_the_same_place(section, values, key, expected):
    params = P.parse_params({"teacher": {"epochs": 1}, section: values})
    value = params
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


def test_the_teacher_section_is_still_required():
    with pytest.raises(UserError, match="teacher: Field required"):
        P.parse_params({})


@pytest.fixture
def defaults_file(tmp_path, monkeypatch):
    """The test's own file as the defaults; the repository's params.yaml again afterwards."""
    path = tmp_path / "defaults.yaml"
    monkeypatch.setattr(P, "DEFAULTS_FILE", path)
    P.repo_defaults.cache_clear()
    yield path
    P.repo_defaults.cache_clear()


def test_a_key_missing_from_params_yaml_is_a_one_line_error_not_a_silent_default(defaults_file):
    raw = repo_yaml()
    del raw["gate"]["candidates"]
    defaults_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="gate.candidates: Field required") as caught:
        P.load_params(defaults_file)
    assert "\n" not in str(caught.value)


def test_an_unreadable_defaults_file_is_a_one_line_error(defaults_file):
    defaults_file.write_text("gate: {enforce: true, enforce: false}\n")
    with pytest.raises(UserError, match="duplicate key 'gate.enforce'"):
        P.GateParams()


def test_sections_built_in_code_are_checked_like_a_file():
    with pytest.raises(ValidationError, match="ratio\n  Input should be less than 1"):
        P.PruneParams(ratio=1.5)
    assert P.PruneParams().finetune.lr == 0.02
