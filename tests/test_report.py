"""The human report: report.md / self-contained report.html / plots from synthetic pipeline
outputs."""

import base64
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_slim.gate.gate import check_release
from resnet_slim.params import GateParams
from resnet_slim.report import report
from resnet_slim.report.experiments import changed_params, comparison_table, parse_exp_show
from resnet_slim.report.plots import feasible_region, is_feasible
from resnet_slim.report.render import render_markdown
from tests.conftest import REPO, assert_one_line_error

# `dvc exp show --json` captured in a clone of this repo (deps/outs dropped): the workspace, `main`,
# and one experiment stored with `dvc exp save` after editing prune.ratio=0.5, gate.min_speedup=40,
# gate.enforce=false and reports/gate.json by hand (its metrics are not from a real run; the JSON
# shape is DVC 3.67's own).
EXP_SHOW = Path(__file__).parent / "data" / "exp_show.json"


def row(top1, p50, mb, **extra) -> dict:
    return {
        "file": "x.onnx",
        "top1": top1,
        "n_test": 270,
        "size_mb": mb,
        "params": 1000,
        "onnx_ops": ["Conv"],
        "p50_ms": p50,
        "p90_ms": p50 * 1.1,
        "p99_ms": p50 * 1.3,
        "mean_ms": p50,
        "throughput_ips": 1000 / p50,
        "throughput_batch": 64,
        "peak_rss_mb": 60.0,
        "runtime_rss_mb": 44.0,
        "threads": 1,
        **extra,
    }


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def gate_json(passed=True, release="student_qat_int8") -> dict:
    checks = [
        {
            "name": "accuracy_drop_pp",
            "passed": True,
            "measured": 0.4,
            "threshold": 1.0,
            "op": "<=",
            "unit": "pp",
            "reason": None,
        },
        {
            "name": "latency_speedup",
            "passed": passed,
            "measured": 9.0 if passed else 1.5,
            "threshold": 2.0,
            "op": ">=",
            "unit": "x",
            "reason": None if passed else "latency_speedup 1.5 x is not >= 2.0",
        },
        {
            "name": "size_ratio",
            "passed": True,
            "measured": 0.02,
            "threshold": 0.3,
            "op": "<=",
            "unit": "x",
            "reason": None,
        },
    ]
    return {
        "passed": passed,
        "release": release,
        "reference": "teacher",
        "enforce": True,
        "checks": checks,
        "failed": [] if passed else ["latency_speedup 1.5 x is not >= 2.0"],
        "selection": {
            "why": "fastest of 1 candidate(s) passing every check (p50 1 ms)"
            if passed
            else "no candidate passed every check",
            "candidates": [{"model": release, "passed": passed, "p50_ms": 1.0, "failed": []}],
        },
    }


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A repo-like directory with every report the pipeline writes, in the real shapes."""
    r = tmp_path / "reports"
    models = {
        "teacher": row(97.0, 8.0, 44.0),
        "teacher_ptq_int8": row(97.0, 3.0, 11.0),
        "pruned_qat_int8": row(96.5, 1.2, 2.9),
        "student_qat_int8": row(96.6, 0.9, 0.8, file="student_qat_int8.onnx", opset=17),
        "mystery_int8": row(90.0, 0.5, 0.5),
    }  # any name: the list is read, never assumed
    write(
        r / "benchmark.json",
        {
            "models": models,
            "hardware": {
                "cpu": "Test CPU",
                "logical_cores": 2,
                "avx2": True,
                "avx512f": False,
                "avx512_vnni": False,
                "avx_vnni": False,
                "onnxruntime": "1.31.1",
            },
        },
    )
    write(r / "gate.json", gate_json())
    write(
        r / "prune" / "metrics.json",
        {
            "method": "bn_slimming",
            "ratio": 0.3,
            "top1_test": {
                "before": 97.0,
                "after_sparsity": 97.5,
                "after_removal": 10.0,
                "after_finetune": 96.9,
            },
            "macs": {"teacher": 1000, "pruned": 400, "ratio": 0.4},
            "params": {"teacher": 100, "pruned": 30, "ratio": 0.3},
            "nonzero_params": {"teacher": 100, "pruned": 30},
            "channels_kept": 0.55,
        },
    )
    write(
        r / "prune" / "channels.json",
        [
            {"layer": "conv1", "before": 64, "after": 32},
            {"layer": "layer1.0.conv1", "before": 64, "after": 16},
        ],
    )
    write(
        r / "distill" / "metrics.json",
        {
            "student_top1_kd": 96.0,
            "student_top1_no_kd": 95.0,
            "kd_gain_pp": 1.0,
            "alpha": 0.7,
            "temperature": 4.0,
            "feature_weight": 0.0,
            "macs_vs_teacher": 0.06,
            "params_vs_teacher": 0.06,
        },
    )
    write(
        r / "qat_student" / "metrics.json",
        {
            "torch_top1": 96.6,
            "onnx_top1": 96.6,
            "top1_diff_pp": 0.0,
            "passed": True,
            "problems": [],
            "kernels": {
                "op_types": {"com.microsoft:QLinearConv": 20},
                "float_convs": 0,
                "int8_convs": 20,
                "all_convs_int8": True,
            },
        },
    )
    write(
        r / "export" / "student.json",
        {
            "max_abs_diff": 1e-5,
            "top1_agreement": 1.0,
            "n_images": 270,
            "passed": True,
            "problems": [],
        },
    )
    write(
        r / "torch_ptq" / "teacher.json",
        {
            "top1": 97.0,
            "fp32_top1": 97.0,
            "n_test": 270,
            "size_mb": 11.3,
            "p50_ms": 4.4,
            "p99_ms": 7.2,
            "threads": 1,
            "process_peak_rss_mb": 1150.0,
        },
    )
    write(
        r / "teacher" / "summary.json",
        {"val_top1": 98.0, "epochs": 5, "val_top1_curve": [40.0, 90.0, 97.8, 98.0, 98.1]},
    )
    for run, values in (
        ("teacher", [40.0, 90.0, 97.8, 98.0, 98.1]),
        ("distill/kd", [50.0, 95.0]),
        ("qat_student/live", [96.0, 96.5]),
    ):
        write(
            r / run / "plots" / "metrics" / "val_top1.tsv",
            "step\tval_top1\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(values)),
        )
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def report_args(run_dir: Path, params: Path | None = None) -> list[str]:
    """The report stage's arguments as dvc.yaml gives them, for a run directory."""
    r = run_dir / "reports"
    return [
        "--params",
        str(params or run_dir / "params.yaml"),
        "--reports",
        str(r),
        "--md",
        str(r / "report.md"),
        "--html",
        str(r / "report.html"),
        "--plots",
        str(r / "plots"),
    ]


def make(run_dir: Path) -> tuple[str, str]:
    """The report stage as dvc.yaml runs it."""
    from stages.report import main

    assert main(report_args(run_dir)) == 0
    return (run_dir / "reports" / "report.md").read_text(), (
        run_dir / "reports" / "report.html"
    ).read_text()


def test_report_has_every_model_row_every_section_and_plots(run_dir):
    md, page = make(run_dir)
    models = json.loads((run_dir / "reports" / "benchmark.json").read_text())["models"]
    for name in [*models, "teacher_torch_eager_int8"]:
        assert re.search(rf"^\| {name} \|", md, re.M), name
        assert f"<td>{name}</td>" in page, name
    assert "PyTorch eager, measured in PyTorch" in md
    assert "release `student_qat_int8`" in md and "Gate ✓ PASSED" in md
    for heading in (
        "Every model",
        "Deployment checklist",
        "Pruning",
        "Distillation",
        "Quantization-aware training",
        "Training curves",
        "Hardware",
        "Parameters (params.yaml)",
    ):
        assert re.search(rf"^## {re.escape(heading)}", md, re.M), heading
    assert "| ✗ |" not in md  # every checklist line passes on these inputs
    assert "opset 17" in md and "20 int8 / 0 float convs" in md
    assert "KD helped: +1.00 pp" in md and "It plateaued" in md
    assert "This CPU has no VNNI" in md
    assert "max_acc_drop_pp: 1.0" in md  # params.yaml is shown as YAML
    plots = run_dir / "reports" / "plots"
    assert {p.name for p in plots.iterdir()} == {
        "pareto.png",
        "pareto.csv",
        "size.png",
        "training_curves.png",
        "channels.png",
    }
    for png in plots.glob("*.png"):
        assert png.read_bytes().startswith(b"\x89PNG")
        assert f"](plots/{png.name})" in md
    with open(plots / "pareto.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == [*models, "teacher_torch_eager_int8"]


def test_html_is_self_contained(run_dir):
    _, page = make(run_dir)
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I), (
        "external reference"
    )
    assert not re.search(r"<(script|link|iframe|object)\b|@import|url\(", page, re.I)
    sources = re.findall(r'<img[^>]*\bsrc="([^"]+)"', page)
    assert len(sources) == 4
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")


def test_failed_gate_is_shown_as_failed(run_dir):
    write(run_dir / "reports" / "gate.json", gate_json(passed=False))
    md, page = make(run_dir)
    assert "Gate ✗ FAILED" in md and "Gate ✗ FAILED" in page
    assert re.search(r"^- ✗ p50 speed-up .*latency_speedup 1\.5 x is not >= 2\.0", md, re.M)
    assert re.search(r"^\| ✗ \| latency \|", md, re.M)
    assert "no candidate passed every check" in md
    # a failed model is never named or starred as the release
    assert "report: no release (the gate failed `student_qat_int8`)" in md
    assert "report: release" not in md and "report: release" not in page


def test_a_failed_gate_stars_no_release_in_the_figures(run_dir, monkeypatch):
    from resnet_slim.report import plots

    starred = []
    monkeypatch.setattr(
        plots, "pareto_png", lambda m, release, region: starred.append(release) or b"png"
    )
    monkeypatch.setattr(plots, "size_png", lambda m, release: starred.append(release) or b"png")
    for passed in (True, False):
        write(run_dir / "reports" / "gate.json", gate_json(passed=passed))
        make(run_dir)
    assert starred == ["student_qat_int8", "student_qat_int8", None, None]


def test_missing_optional_inputs_say_not_run(tmp_path):
    write(
        tmp_path / "reports" / "benchmark.json",
        {"models": {"teacher": row(97.0, 8.0, 44.0), "student": row(96.0, 1.0, 2.0)}},
    )
    md, page = make(tmp_path)
    assert "Gate: not run" in md
    for section in ("Pruning", "Distillation", "Quantization-aware training"):
        assert re.search(rf"## {section}\n\nNot run", md), section
    assert "Teacher: not run" in md and "not recorded in benchmark.json" in md.lower()
    assert "## Parameters" in md and "params.yaml not found" in md
    assert {p.name for p in (tmp_path / "reports" / "plots").iterdir()} == {
        "pareto.png",
        "pareto.csv",
        "size.png",
    }
    assert "| student |" in md and "<td>student</td>" in page


def test_malformed_optional_inputs_never_crash(run_dir):
    r = run_dir / "reports"
    (r / "gate.json").unlink()
    write(r / "prune" / "metrics.json", "{ not json")
    write(r / "prune" / "channels.json", {"conv1": 3})
    write(r / "distill" / "metrics.json", [1, 2])
    write(r / "qat_student" / "metrics.json", {"kernels": "x", "torch_top1": "high"})
    write(r / "teacher" / "summary.json", {"val_top1_curve": "abc"})
    write(r / "export" / "student.json", None)
    md, _ = make(run_dir)
    assert "Gate: not run" in md and re.search(r"## Pruning\n\nNot run", md)
    assert re.search(r"## Distillation\n\nNot run", md)
    assert "| student_qat_int8 |" in md


def report_stage(run_dir: Path, params: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / "report.py"), *report_args(run_dir, params)],
        cwd=run_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"passed": "no"}, "'passed' is 'no', not true or false"),
        ({"passed": True}, "'passed' is True but 1 check(s) failed"),  # a failed gate edited
        ({"checks": [{**gate_json()["checks"][0], "measured": "abc"}]}, "'measured' is 'abc'"),
        ({"release": 5}, "'release' is 5, not a model name"),
    ],
)
def test_a_gate_json_the_gate_did_not_write_is_refused_in_one_line(run_dir, edit, words):
    write(run_dir / "reports" / "gate.json", {**gate_json(passed=False), **edit})
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "reports").iterdir()}
    assert_one_line_error(report_stage(run_dir), 2, "gate.json", words)
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "reports").iterdir()}
    assert before == after  # nothing written


@pytest.mark.parametrize(
    "text, words",
    [
        ("gate:\n  release: 5\n", "gate.release: Input should be a valid string"),
        ("gate:\n  max_acc_drop_pp: 1.0e+308\n", "gate.max_acc_drop_pp: Input should be less"),
        (b"teacher:\n  epochs: \xff\n", "not a text file"),
    ],
)
def test_the_report_validates_params_as_every_stage_does(run_dir, text, words):
    params = run_dir / "bad_params.yaml"
    params.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_one_line_error(report_stage(run_dir, params), 2, words)


def test_a_signal_during_the_report_writes_leaves_one_whole_report(
    run_dir, monkeypatch, fresh_signal_state
):
    """md, html and plots are one set: stopped before the renames, the old set stays; stopped
    during them, the renames finish and the stage says it wrote all of them."""
    from resnet_slim import errors, io
    from resnet_slim.report import report as report_module

    make(run_dir)
    r = run_dir / "reports"
    old = {n: (r / n).read_bytes() for n in ("report.md", "report.html")}
    write(r / "gate.json", gate_json(passed=False))
    inputs = report_module.load_inputs(r, run_dir / "params.yaml")
    real_swap = io._swap_into_place

    def stopped_after_the_first(tmp, path):  # SIGTERM lands between two renames
        real_swap(tmp, path)
        errors._on_signal(15, None)

    monkeypatch.setattr(io, "_swap_into_place", stopped_after_the_first)
    monkeypatch.setattr(errors, "_arm_watchdog", lambda: None)  # no forced exit of pytest
    with pytest.raises(io.InterruptedWrite, match="interrupted after writing all of"):
        report_module.write_report(
            inputs, out_md=r / "report.md", out_html=r / "report.html", plots_dir=r / "plots"
        )
    errors._interrupting.clear()
    assert "Gate ✗ FAILED" in (r / "report.md").read_text()  # new md, html and plots: whole
    assert "Gate ✗ FAILED" in (r / "report.html").read_text()
    assert (r / "report.md").read_bytes() != old["report.md"]

    def stopped_while_writing(tmp):  # before any rename: the old set stays
        raise KeyboardInterrupt

    monkeypatch.setattr(io, "_swap_into_place", real_swap)
    monkeypatch.setattr(report_module, "render_html", lambda *a: stopped_while_writing(None))
    md_before = (r / "report.md").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        report_module.write_report(
            inputs, out_md=r / "report.md", out_html=r / "report.html", plots_dir=r / "plots"
        )
    assert (r / "report.md").read_bytes() == md_before
    assert not [p for p in r.iterdir() if ".tmp-" in p.name]


def test_magnitude_pruning_and_unhelpful_kd_are_said_plainly(run_dir):
    r = run_dir / "reports"
    prune = json.loads((r / "prune" / "metrics.json").read_text())
    write(r / "prune" / "metrics.json", {**prune, "method": "magnitude"})
    write(
        r / "distill" / "metrics.json",
        {"student_top1_kd": 95.0, "student_top1_no_kd": 96.0, "kd_gain_pp": -1.0},
    )
    write(r / "teacher" / "summary.json", {"val_top1_curve": [50.0, 80.0, 90.0, 95.0]})
    md, _ = make(run_dir)
    assert "it reduces non-zero weights, not latency or the dense file size" in md
    assert "KD did not help here" in md and "-1.00 pp for KD" in md
    assert "It had not plateaued" in md


@pytest.mark.parametrize(
    "ci, words",
    [
        ([-0.5, 1.6], "the interval includes 0, so on this test split KD is not distinguishable"),
        ([0.2, 0.9], "KD helped: +0.56 pp"),
    ],
)
def test_kd_gain_is_judged_by_its_paired_ci(run_dir, ci, words):
    metrics = {"student_top1_kd": 87.19, "student_top1_no_kd": 86.63, "kd_gain_pp": 0.56}
    write(
        run_dir / "reports" / "distill" / "metrics.json",
        {**metrics, "kd_gain_ci_pp": ci, "kd_mcnemar_p": 0.04},
    )
    md, _ = make(run_dir)
    assert words in md and f"CI [{ci[0]:+.2f}, {ci[1]:+.2f}] pp, McNemar p = 0.04" in md


def test_torch_eager_rows_already_in_the_benchmark_are_not_duplicated(run_dir):
    r = run_dir / "reports"
    bench = json.loads((r / "benchmark.json").read_text())
    bench["models"]["teacher_torch_eager_int8"] = {
        "file": "reports/torch_ptq/teacher.json",
        "runtime": "pytorch",
        "top1": 97.0,
        "p50_ms": 4.4,
        "size_mb": 11.3,
    }
    write(r / "benchmark.json", bench)
    md, _ = make(run_dir)
    assert len(re.findall(r"^\| teacher_torch_eager_int8 \|", md, re.M)) == 1


def test_vnni_cpu_gets_no_warning(run_dir):
    r = run_dir / "reports"
    bench = json.loads((r / "benchmark.json").read_text())
    bench["hardware"]["avx512_vnni"] = True
    write(r / "benchmark.json", bench)
    md, _ = make(run_dir)
    assert "no VNNI" not in md


def test_feasible_region_matches_the_gate():
    assert feasible_region(97.0, 8.0, 1.0, 2.0) == (96.0, 4.0)
    region = (96.0, 4.0)
    assert is_feasible(96.0, 4.0, region)  # both bounds are inclusive, like the gate's <= / >=
    assert is_feasible(99.0, 0.1, region)
    assert not is_feasible(95.9, 1.0, region) and not is_feasible(99.0, 4.01, region)
    assert not is_feasible(None, 1.0, region) and not is_feasible(99.0, 1.0, None)
    assert (
        feasible_region(None, 8.0, 1.0, 2.0) is None
        and feasible_region(97.0, 8.0, 1.0, 0.0) is None
    )
    g = GateParams(
        reference="teacher",
        max_acc_drop_pp=1.0,
        min_speedup=2.0,
        max_size_ratio=1.0,
        acc_drop_statistic="point",
    )  # the shaded region is drawn from point estimates
    results = {"teacher": {"top1": 97.0, "p50_ms": 8.0, "size_mb": 10.0}}
    for top1 in (95.5, 96.0, 96.5, 98.0):
        for p50 in (1.0, 3.9, 4.0, 4.1, 9.0):
            results["m"] = {"top1": top1, "p50_ms": p50, "size_mb": 1.0}
            assert is_feasible(top1, p50, region) == check_release(results, g, "m")["passed"], (
                top1,
                p50,
            )


def test_missing_benchmark_is_a_one_line_user_error(tmp_path):
    result = report_stage(tmp_path)  # no reports/ at all, no params.yaml
    assert_one_line_error(result, 2, "benchmark")
    assert not (tmp_path / "reports").exists()


def test_exp_show_parser_on_a_real_sample():
    entries = json.loads(EXP_SHOW.read_text())
    df = parse_exp_show(entries)
    assert list(df["experiment"]) == ["workspace", "main", "synthetic-ratio05"]
    assert list(df["state"]) == ["workspace", "baseline", "done"]
    assert set(changed_params(df)) == {"prune.ratio", "gate.min_speedup", "gate.enforce"}
    table = comparison_table(entries)
    exp = table.set_index("experiment").loc["synthetic-ratio05"]
    assert exp["prune.ratio"] == 0.5 and exp["gate.min_speedup"] == 40.0
    assert exp["gate passed"] is not None and not exp["gate passed"]
    assert table.set_index("experiment").loc["main", "gate passed"]
    assert exp["release"] == "student_qat_int8" and exp["release top-1 %"] == pytest.approx(
        99.259, abs=1e-3
    )
    assert exp["release p50 ms"] > 0 and exp["release MB"] > 0
    assert "teacher.epochs" not in table.columns  # unchanged params are left out


def test_exp_show_parser_tolerates_failed_and_queued_experiments():
    entries = [
        {
            "rev": "workspace",
            "name": None,
            "data": {"params": {"params.yaml": {"data": {"a": {"b": 1}}}}, "metrics": {}},
            "error": None,
            "experiments": None,
        },
        {
            "rev": "a" * 40,
            "name": "main",
            "data": None,
            "error": {"type": "X", "msg": "boom"},
            "experiments": [
                {
                    "name": "q",
                    "executor": {"state": "queued"},
                    "revs": [{"rev": "b" * 40, "name": "q", "data": None, "error": None}],
                }
            ],
        },
    ]
    df = parse_exp_show(entries)
    assert list(df["experiment"]) == ["workspace", "main", "q"]
    assert list(df["state"]) == ["workspace", "error", "queued"]
    assert df["release"].isna().all()


def test_compare_script_prints_the_saved_sample():
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages" / "compare_experiments.py"),
            "--json",
            str(EXP_SHOW),
            "--md",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "| synthetic-ratio05 |" in result.stdout and "prune.ratio" in result.stdout


def test_report_shows_intervals_what_the_data_support_and_a_too_small_warning(run_dir):
    r = run_dir / "reports"
    bench = json.loads((r / "benchmark.json").read_text())
    bench["models"]["teacher"].update(top1_ci_low=95.2, top1_ci_high=98.9)
    write(r / "benchmark.json", bench)
    gate = gate_json()
    gate["checks"][0].update(
        statistic="upper_ci",
        point=0.4,
        measured=2.1,
        ci=[-1.3, 2.1],
        level=0.95,
        basis="paired bootstrap over test images",
        n_test=270,
        mcnemar_p=0.69,
        ci_width_pp=3.4,
        decidable=False,
        images_needed=3122,
    )
    write(r / "gate.json", gate)
    md, _ = make(run_dir)
    assert "[95.2, 98.9]" in md  # the teacher's top-1 interval in the model table
    assert "top-1 drop 0.40 pp, 95% CI [-1.30, 2.10]" in md and "McNemar p = 0.69" in md
    assert "`gate.acc_drop_statistic: upper_ci`" in md
    assert "too small for this gate to decide" in md and "about 3,122 test images" in md
    assert "Seed repeats" in md and "Off (`base.seeds: []`)" in md


def test_report_shows_mean_and_std_across_seeds(run_dir):
    write(
        run_dir / "reports" / "seeds.json",
        {
            "seeds": [0, 1, 2],
            "repeats": True,
            "models": ["teacher", "student_qat_int8"],
            "rerun_stages": ["train_teacher", "distill_student"],
            "runs": [
                {"seed": s, "top1": {"teacher": t, "student_qat_int8": q}}
                for s, t, q in ((0, 97.0, 96.6), (1, 97.4, 96.9), (2, 96.8, 96.0))
            ],
            "top1": {
                "teacher": {"mean": 97.0667, "std": 0.3055},
                "student_qat_int8": {"mean": 96.5, "std": 0.4583},
            },
            "drop_pp": {
                "student_qat_int8": {"mean": 0.5667, "std": 0.2082, "ci_low": 0.05, "ci_high": 1.08}
            },
        },
    )
    md, _ = make(run_dir)
    assert "97.07 ± 0.31" in md and "96.50 ± 0.46" in md and "0.57 ± 0.21" in md
    assert "97.00, 97.40, 96.80" in md and "[0.1, 1.1]" in md


def test_report_shows_how_close_each_model_is_to_the_hardware_limit(run_dir):
    r = run_dir / "reports"
    bench = json.loads((r / "benchmark.json").read_text())
    bench["models"]["student_qat_int8"].update(
        macs=8_800_000,
        gmacs_per_s=9.8,
        floor_ms=0.2,
        peak_fraction=0.22,
        peak_kind="int8",
        p50_ms_all_cores=0.7,
        all_cores=2,
    )
    bench["roofline"] = {
        "threads": 1,
        "shapes": [{}, {}],
        "fp32_gmacs": 18.0,
        "int8_gmacs": 44.0,
        "int8_over_fp32": 2.44,
    }
    write(r / "benchmark.json", bench)
    md, _ = make(run_dir)
    assert "18.0 GMAC/s FP32, 44.0 GMAC/s INT8" in md and "2.44× for INT8" in md
    assert "8,800,000 MACs in 0.900 ms: 22% of the int8 limit" in md


def test_report_compares_with_openvino_peers_and_lists_targets(run_dir):
    r = run_dir / "reports"
    bench = json.loads((r / "benchmark.json").read_text())
    bench["models"]["teacher_openvino_fp32"] = row(
        97.0, 6.0, 44.0, runtime="openvino 2026.4.1", role="peer"
    )
    bench["models"]["teacher_openvino_nncf_int8"] = row(
        96.9, 1.8, 11.3, runtime="openvino 2026.4.1", role="peer"
    )
    bench["models"]["student_qat_int8_openvino"] = row(
        96.6,
        0.5,
        0.8,
        runtime="openvino 2026.4.1",
        role="release target",
        target="openvino",
        status="ok",
        parity={"reference": "student_qat_int8", "top1_agreement": 1.0},
    )
    bench["unavailable_targets"] = {
        "student_tensorrt_fp16": {"target": "tensorrt", "reason": "needs an NVIDIA GPU"}
    }
    write(r / "benchmark.json", bench)
    md, _ = make(run_dir)
    assert "| teacher_openvino_nncf_int8 |" in md and "| teacher_openvino_fp32 |" in md
    # best peer INT8 is the fastest INT8 build of the teacher: OpenVINO's 1.8 ms, not ORT's 3.0 ms
    assert "best peer INT8** (`teacher_openvino_nncf_int8`" in md and "2.0× faster" in md
    assert (
        "## Deployment targets" in md
        and "needs an NVIDIA GPU" in md
        and "student_qat_int8_openvino" in md
    )


def test_exp_show_rows_read_the_headline_metrics_file():
    metrics = {
        "release": "pruned_qat_int8",
        "passed": False,
        "top1": 97.5,
        "drop_pp": 1.4,
        "speedup_vs_reference": 3.2,
        "p50_ms": 2.5,
        "size_mb": 3.1,
        "checks": {"accuracy_drop_pp": {"passed": False, "measured": 1.4}},
    }
    entries = [
        {
            "rev": "workspace",
            "name": None,
            "error": None,
            "experiments": None,
            "data": {
                "params": {"params.yaml": {"data": {"a": 1}}},
                "metrics": {"reports/metrics.json": {"data": metrics}},
            },
        }
    ]
    row = parse_exp_show(entries).iloc[0]
    assert row["release"] == "pruned_qat_int8" and row["gate passed"] == False  # noqa: E712
    assert (row["release top-1 %"], row["drop pp"], row["speed-up x"]) == (97.5, 1.4, 3.2)
    assert (row["release p50 ms"], row["release MB"]) == (2.5, 3.1)


def test_pareto_frontier_keeps_only_undominated_models():
    from resnet_slim.report.plots import pareto_frontier

    points = {
        "fast": (0.5, 80.0),
        "mid": (1.0, 90.0),
        "slow_worse": (3.0, 89.0),
        "best": (2.0, 95.0),
        "tie_slower": (2.5, 95.0),
    }
    assert pareto_frontier(points) == ["fast", "mid", "best"]


def test_pareto_labels_do_not_overlap():
    import matplotlib.pyplot as plt

    from resnet_slim.report.plots import place_labels

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_xlim(0.1, 10)
    ax.set_ylim(90, 100)
    labels = [(f"a_rather_long_model_name_{i}", (1.0 + 0.01 * i, 95.0)) for i in range(5)]
    place_labels(fig, ax, labels)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    plt.close(fig)


def test_report_names_an_imported_teachers_origin():
    from resnet_slim.report.baselines import teacher_origin
    from resnet_slim.report.render import render_markdown

    origin = {
        "file": "models/imported/r56.th",
        "format": "cifar_resnet",
        "family": "cifar_resnet56",
        "sha256": "4bfd9763" + "0" * 56,
        "classes_in_file": 10,
        "head_replaced": False,
        "tracked_by_dvc": True,
        "top1_as_imported": {"val": 83.1, "test": 83.2},
        "top1_after_adaptation": {"val": 90.5, "test": 90.1},
    }
    md = render_markdown(teacher_origin({"origin": origin, "val_top1": 90.5}))
    for text in (
        "models/imported/r56.th",
        "cifar_resnet / cifar_resnet56",
        "4bfd9763",
        "83.10 / 83.20",
        "90.50 / 90.10",
    ):
        assert text in md, text
    scratch = render_markdown(teacher_origin({"val_top1": 98.0}))
    assert "Trained from scratch" in scratch


def test_pareto_figure_has_top1_ci_bars_the_frontier_and_every_label():
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from resnet_slim.report.plots import pareto_figure

    models = {
        "teacher": row(97.0, 8.0, 44.0, top1_ci_low=95.0, top1_ci_high=98.5),
        "fast": row(90.0, 0.5, 0.5, top1_ci_low=87.0, top1_ci_high=92.5),
        "mid": row(96.0, 1.0, 1.0, top1_ci_low=94.0, top1_ci_high=97.5),
        "dominated": row(89.0, 3.0, 2.0),  # no CI recorded: no bar, still a point and a label
        "nan_ci": row(95.0, 2.0, 2.0, top1_ci_low=math.nan, top1_ci_high=96.0),
    }
    fig = pareto_figure(models, "mid", region=(96.0, 4.0))
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # one per model with a finite CI around its top-1
    frontier = [line for line in ax.get_lines() if line.get_label() == "Pareto frontier"]
    assert len(frontier) == 1 and list(frontier[0].get_xdata()) == [0.5, 1.0, 8.0]
    assert sorted(t.get_text() for t in ax.texts) == sorted(models)
    plt.close(fig)


def test_the_report_opens_no_model_file(run_dir):
    """The report shows the opset the benchmark recorded for the release, not what is on disk."""
    inputs = report.load_inputs(run_dir / "reports", run_dir / "params.yaml")
    inputs["models"]["student_qat_int8"]["opset"] = 13  # the file on disk says 17
    md = render_markdown(report.build_report(inputs), "plots", {})
    assert "opset 13, onnxruntime" in md and "opset 17, onnxruntime" not in md


def test_report_shows_the_latency_plan_and_the_tables_prediction_errors(run_dir):
    r = run_dir / "reports"
    bench = json.loads((r / "benchmark.json").read_text())
    bench["models"]["pruned_qat_int8"].update(predicted_ms=1.26, prediction_error=0.05)
    bench["models"]["teacher"].update(predicted_ms=6.4, prediction_error=-0.2)
    bench["latency_model"] = {
        "same_machine": False,
        "host_drift": {"fp32": 0.02, "int8": 0.27},
        "host_drift_within": False,
        "errors": {"pruned_qat_int8": 0.05, "teacher": -0.2},
        "not_predicted": {"lowrank": "latency table has no unit 'x'"},
        "max_abs_error": 0.2,
        "max_error_allowed": 0.15,
        "all_within": False,
    }
    write(r / "benchmark.json", bench)
    prune = json.loads((r / "prune" / "metrics.json").read_text())
    plan = {
        "structure": "depth_width",
        "speedup": 4.8,
        "budget_int8_ms": 0.45,
        "teacher_predicted_ms": {"fp32": 2.16, "int8": 0.91},
        "teacher_measured_ms": {"fp32": 2.25, "int8": 0.93},
        "pruned_predicted_int8_ms": 0.44,
        "blocks": {  # as JSON stores it: widths as string keys
            "layer1.1": {"width": None, "ms": {"16": 0.04}},
            "layer2.3": {"width": 20, "ms": {"20": 0.025, "32": 0.029}},
            "layer3.0": {"width": 64, "ms": {"40": 0.017, "64": 0.022}},
        },
    }
    write(r / "prune" / "metrics.json", {**prune, "method": "latency", "latency_plan": plan})
    md, _ = make(run_dir)
    assert "teacher FP32 2.250 ms measured (2.160 predicted), INT8 0.910 ms predicted" in md
    assert "budget FP32 / 4.8 = 0.450 ms INT8, the plan predicts 0.440 ms" in md
    assert "1 of 3 residual blocks removed (layer1.1); 1 narrowed (layer2.3 32→20" in md
    assert "per parameter saved" not in md  # no size target set
    plan.update(max_params=40_000, pruned_params=39_120)
    write(r / "prune" / "metrics.json", {**prune, "method": "latency", "latency_plan": plan})
    md, _ = make(run_dir)
    assert "then, for the size target of 40,000 parameters (39,120 kept), per parameter" in md
    assert "The student was first fitted" not in md
    distill = json.loads((r / "distill" / "metrics.json").read_text())
    write(r / "distill" / "metrics.json", {**distill, "latency_plan": plan})
    md, _ = make(run_dir)
    assert "The student was first fitted to the teacher's latency budget (depth_width)" in md
    assert "worst error 20.0% (trusted within ±15%: ✗)" in md and "re-run latency_table" in md
    assert "The teacher measured +2% (FP32), +27% (INT8) against the table's own timing" in md
    assert "| pruned_qat_int8 |" in md and "+5.0%" in md and "Not predicted: `lowrank`" in md
