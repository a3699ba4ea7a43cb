"""dvc.yaml can be trusted: every stage depends on the code it runs, runs its own workspace's code,
and the pipeline exposes one small metrics file.

Stages are read through DVC itself (foreach groups resolved exactly as `dvc repro` sees them). The
code a stage runs is derived from the source: the `python -m stages.<name>` module, then every
`resnet_slim` / `stages` module it imports, transitively, function-level imports included.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from dvc.dependency.param import ParamsDependency
from dvc.repo import Repo

STAGE_MODULE = re.compile(r"^python -m (stages\.\w+)\b")
OWN_PACKAGES = ("resnet_slim", "stages")


def imported_names(path: Path) -> set[str]:
    """Dotted names of every import statement in a file, wherever it is (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from pkg import mod
    return names


def module_file(root: Path, dotted: str) -> Path | None:
    if dotted.split(".")[0] not in OWN_PACKAGES:
        return None
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def import_closure(root: Path, module: str) -> set[str]:
    """Repo-relative files run by `python -m module`: the module, its packages, their imports."""
    parts = module.split(".")
    todo = [f for i in range(1, len(parts) + 1) if (f := module_file(root, ".".join(parts[:i])))]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            pieces = name.split(".")
            todo += [
                f
                for i in range(1, len(pieces) + 1)
                if (f := module_file(root, ".".join(pieces[:i])))
            ]
    return {p.relative_to(root).as_posix() for p in seen}


def dependency_problems(stages: dict[str, dict], root: Path = REPO) -> list[str]:
    """For {stage: {"cmd", "deps"}}: code a stage runs but does not depend on, or deps it never
    runs."""
    problems = []
    for name, stage in stages.items():
        found = STAGE_MODULE.match(stage["cmd"])
        if not found:
            problems.append(f"{name}: cmd does not start with `python -m stages.<name>`")
            continue
        runs = import_closure(root, found.group(1))
        deps = set(stage["deps"])
        covered = {f for f in runs if f in deps or f.split("/")[0] in deps}  # or the whole package
        problems += [f"{name}: runs {f} but does not depend on it" for f in sorted(runs - covered)]
        own_code = {d for d in deps if d.endswith(".py") and d.split("/")[0] in OWN_PACKAGES}
        problems += [
            f"{name}: depends on {f} but never imports it" for f in sorted(own_code - runs)
        ]
    return problems


@pytest.fixture(scope="module")
def pipeline() -> dict[str, dict]:
    """{stage address: {"cmd", "deps", "outs", "metrics"}} as DVC resolves dvc.yaml."""
    with Repo(str(REPO)) as repo:
        return {
            s.addressing: {
                "cmd": s.cmd,
                "deps": [str(d.def_path) for d in s.deps if not isinstance(d, ParamsDependency)],
                "outs": [str(o.def_path) for o in s.outs if not o.metric],
                "metrics": [str(o.def_path) for o in s.outs if o.metric],
            }
            for s in repo.index.stages
        }


def test_every_stage_depends_on_every_module_it_runs(pipeline):
    assert dependency_problems(pipeline) == []


def test_the_check_fails_when_a_dep_is_deleted_or_stale(pipeline):
    qat = pipeline["qat@student"]
    without_engine = {**qat, "deps": [d for d in qat["deps"] if d != "resnet_slim/train/engine.py"]}
    assert dependency_problems({"qat@student": without_engine}) == [
        "qat@student: runs resnet_slim/train/engine.py but does not depend on it"
    ]
    extra = {**qat, "deps": qat["deps"] + ["resnet_slim/serve.py"]}
    assert dependency_problems({"qat@student": extra}) == [
        "qat@student: depends on resnet_slim/serve.py but never imports it"
    ]
    by_path = {**qat, "cmd": qat["cmd"].replace("python -m stages.qat", "python stages/qat.py")}
    assert dependency_problems({"qat@student": by_path}) == [
        "qat@student: cmd does not start with `python -m stages.<name>`"
    ]


def test_import_closure_follows_lazy_imports(tmp_path):
    (tmp_path / "resnet_slim").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "go.py").write_text("def main():\n    from resnet_slim import a\n")
    (tmp_path / "resnet_slim" / "a.py").write_text("import resnet_slim.b\n")
    (tmp_path / "resnet_slim" / "b.py").write_text("import os\n")
    (tmp_path / "resnet_slim" / "unused.py").write_text("")
    assert import_closure(tmp_path, "stages.go") == {
        "stages/go.py",
        "resnet_slim/a.py",
        "resnet_slim/b.py",
    }


def test_repeated_stages_are_foreach_groups(pipeline):
    groups = {name.split("@")[0] for name in pipeline if "@" in name}
    assert groups == {"export", "ptq", "torch_ptq", "qat"}
    assert {
        "export@teacher",
        "export@pruned",
        "export@lowrank",
        "export@student",
        "qat@pruned",
        "qat@student",
    } <= set(pipeline)


def test_benchmark_measures_the_models_params_name(pipeline):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    names = params["benchmark"]["models"]
    bench = pipeline["benchmark"]
    assert "--models-dir models" in bench["cmd"]
    onnx_deps = [d for d in bench["deps"] if d.endswith(".onnx")]
    assert sorted(onnx_deps) == sorted(f"models/{n}.onnx" for n in names)
    produced = {out for stage in pipeline.values() for out in stage["outs"]}
    assert set(onnx_deps) <= produced, "a benchmarked model that no stage makes"
    gate = params["gate"]
    assert {gate["reference"], *gate["candidates"]} <= set(names)


def test_one_small_metrics_file(pipeline):
    declared = {stage: s["metrics"] for stage, s in pipeline.items() if s["metrics"]}
    assert declared == {"gate": ["reports/metrics.json"]}


def test_seed_repeats_expand_foreach_groups_like_dvc(pipeline):
    from resnet_slim.gate.seeds import read_stages, read_stages_from

    ours = read_stages(REPO / "dvc.yaml")
    assert set(ours) == set(pipeline)
    for name, stage in ours.items():
        assert stage["cmd"] == pipeline[name]["cmd"], name
        assert stage["deps"] == pipeline[name]["deps"], name
    keyed = {"stages": {"s": {"foreach": {"a": {"n": 1}}, "do": {"cmd": "x ${key} ${item.n}"}}}}
    assert read_stages_from(keyed)["s@a"]["cmd"] == "x a 1"
    from resnet_slim.errors import UserError

    with pytest.raises(UserError, match="matrix"):
        read_stages_from({"stages": {"s": {"matrix": {"a": [1]}, "cmd": "x"}}})


def test_readme_shows_the_current_stage_graph():
    import subprocess
    import sys

    dag = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--mermaid"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    readme = (REPO / "README.md").read_text()
    assert f"```mermaid\n{dag}\n```" in readme, "re-paste `dvc dag --mermaid` into README.md"


def test_imported_models_are_tracked_by_content(pipeline):
    from resnet_slim.train.model_import import TRACKED_DIR

    for stage in ("train_teacher", "distill_student"):
        assert TRACKED_DIR.as_posix() in pipeline[stage]["deps"], stage
    assert (REPO / TRACKED_DIR).is_dir()


def test_seed_repeats_find_imported_models_from_their_scratch_workspace(tmp_path):
    from resnet_slim.gate.seeds import _absolute_model_paths

    params = {
        "teacher": {"init": "../shared/models/r56.th", "epochs": 0},
        "distill": {"student": {"init": None, "width": 16}, "epochs": 3},
    }
    fixed = _absolute_model_paths(params, tmp_path / "repo")
    assert fixed["teacher"]["init"] == str((tmp_path / "shared" / "models" / "r56.th").resolve())
    assert fixed["distill"] == params["distill"] and params["teacher"]["init"].startswith("..")


def _dotted(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root / "resnet_slim").with_suffix("").parts)


def library_import_cycles(root: Path = REPO) -> list[list[str]]:
    """Import circles between the library's modules (lazy imports included): each a list of
    modules that import each other, directly or around a loop. dvc.yaml's deps follow imports,
    so a circle makes every stage that runs one of its modules depend on all of them."""
    modules = sorted((root / "resnet_slim").rglob("*.py"))
    graph = {
        path: {
            f
            for name in imported_names(path)
            if (f := module_file(root, name)) and f.name != "__init__.py" and f != path
        }
        for path in modules
        if path.name != "__init__.py"
    }

    def reachable(start: Path) -> set[Path]:
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return seen

    reach = {path: reachable(path) for path in graph}
    cycles = {
        tuple(
            sorted(
                _dotted(root, p)
                for p in graph
                if p == path or (p in reach[path] and path in reach[p])
            )
        )
        for path in graph
        if path in reach[path]
    }
    return [list(c) for c in sorted(cycles)]


def test_the_library_has_no_import_circles(tmp_path):
    assert library_import_cycles() == []
    # the check can fail: a module that imports one importing it back
    package = tmp_path / "resnet_slim"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from resnet_slim.b import x\n")
    (package / "b.py").write_text("def x():\n    from resnet_slim import a\n")
    (package / "c.py").write_text("from resnet_slim import a\n")
    assert library_import_cycles(tmp_path) == [["a", "b"]]


# The library's parts in the order data flows through the pipeline (resnet_slim/__init__.py), and
# the modules at the top that every part uses
ROOMS = ("data", "train", "compress", "measure", "gate", "report")
BASE = ("params", "io", "errors", "limits", "presets", "stats", "hardware")


def upward_imports(root: Path = REPO) -> list[str]:
    """ "module -> import" for each import of a later part of the pipeline from an earlier one,
    and of any part from a base module (lazy imports included)."""
    problems = set()
    for path in sorted((root / "resnet_slim").rglob("*.py")):
        module = _dotted(root, path)
        own = module.split(".")[0]
        for name in imported_names(path):
            parts = name.split(".")
            if parts[0] != "resnet_slim" or len(parts) < 2 or parts[1] not in ROOMS:
                continue
            later = own in ROOMS and ROOMS.index(parts[1]) > ROOMS.index(own)
            if later or own in BASE:
                problems.add(f"{module} -> resnet_slim.{parts[1]}")
    return sorted(problems)


def test_no_part_of_the_library_imports_a_later_part(tmp_path):
    assert upward_imports() == []
    # the check can fail: training reaching into measurement, params into a part
    for room in ("train", "measure"):
        (tmp_path / "resnet_slim" / room).mkdir(parents=True)
    (tmp_path / "resnet_slim" / "train" / "engine.py").write_text(
        "def f():\n    from resnet_slim.measure import bench\n"
    )
    (tmp_path / "resnet_slim" / "measure" / "bench.py").write_text(
        "from resnet_slim.train import x\n"
    )
    (tmp_path / "resnet_slim" / "params.py").write_text("import resnet_slim.train.engine\n")
    assert upward_imports(tmp_path) == [
        "params -> resnet_slim.train",
        "train.engine -> resnet_slim.measure",
    ]


def test_every_module_is_in_the_module_map():
    """resnet_slim/__init__.py names every module in its part (a new module must be placed)."""
    doc = (REPO / "resnet_slim" / "__init__.py").read_text()
    bullets = doc.replace("\n  ", " ").splitlines()  # a bullet's wrapped lines joined
    listed = {
        f"{room}.{name.strip()}"
        for room in ROOMS
        for line in bullets
        if line.startswith(f"- `{room}/`:")
        for name in line.split(":", 1)[1].split(",")
    }
    modules = {
        _dotted(REPO, p) for p in (REPO / "resnet_slim").rglob("*.py") if p.name != "__init__.py"
    }
    rooms = {m for m in modules if "." in m}
    assert rooms == listed
    assert [m for m in sorted(modules - rooms) if f"`{m}`" not in doc] == []
    assert {p.parent.name for p in (REPO / "resnet_slim").glob("*/__init__.py")} == set(ROOMS)
