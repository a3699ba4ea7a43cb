"""A report a person reads: reports/report.md, a self-contained reports/report.html and figures.

`load_inputs` gathers what the pipeline wrote (only benchmark.json is required; each other input
is optional and its section then says "not run"), `build_report` turns it into blocks
(sections.py, baselines.py, methods.py, measured.py), `make_plots` draws the figures (plots.py)
and `write_report` writes all of it atomically. The HTML embeds the figures as base64 PNGs and
references nothing outside itself.
"""

import csv
import io
import os
from pathlib import Path

from resnet_slim.errors import UserError
from resnet_slim.gate.verdict import read_verdict
from resnet_slim.io import finite_number, read_json, replace_together
from resnet_slim.params import parse_params, read_params_file
from resnet_slim.report import baselines, measured, methods, plots
from resnet_slim.report import sections as sec
from resnet_slim.report.render import render_html, render_markdown


def optional_json(path: Path, kind: type = dict):
    """The parsed file, or None when it is missing, unreadable or not a `kind` (section: not
    run)."""
    try:
        content = read_json(path) if Path(path).is_file() else None
    except UserError:
        return None
    return content if isinstance(content, kind) else None


def _torch_row(path: Path, r: dict) -> dict:
    """A torch_ptq report as a model row (newer benchmark.json files already carry these rows)."""
    return {
        **{
            k: r.get(k)
            for k in (
                "top1",
                "n_test",
                "size_mb",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "mean_ms",
                "threads",
            )
        },
        "file": str(path),
        "runtime": "pytorch",
        "peak_rss_mb": r.get("process_peak_rss_mb"),
    }


def load_inputs(reports: Path, params_path: Path, benchmark: Path | None = None) -> dict:
    """Everything the report shows; UserError only for a missing or malformed benchmark.

    The report opens no model file: what it says of a model (opset, size, ops) is what the
    benchmark recorded when it measured that file."""
    reports = Path(reports)
    benchmark = Path(benchmark or reports / "benchmark.json")
    bench = read_json(benchmark, what="benchmark results")
    models = benchmark_rows(bench, benchmark, reports)
    params, params_text = checked_params(Path(params_path))
    gate_path = reports / "gate.json"
    hardware, roofline, timing = bench.get("hardware"), bench.get("roofline"), bench.get("timing")
    return {
        "models": models,
        "hardware": hardware if isinstance(hardware, dict) else {},
        "roofline": roofline if isinstance(roofline, dict) else None,
        "timing": timing if isinstance(timing, dict) else None,
        "latency_model": bench.get("latency_model")
        if isinstance(bench.get("latency_model"), dict)
        else None,
        "unavailable_targets": bench.get("unavailable_targets")
        if isinstance(bench.get("unavailable_targets"), dict)
        else {},
        "gate": read_verdict(gate_path) if gate_path.is_file() else None,
        **stage_reports(reports),
        "curves": training_curves(reports),
        "params": params if isinstance(params, dict) else {},
        "params_text": params_text,
    }


def benchmark_rows(bench, benchmark: Path, reports: Path) -> dict:
    """benchmark.json's model rows (refused without one), plus a row per torch_ptq report that
    an older benchmark.json does not carry yet."""
    models = bench.get("models") if isinstance(bench, dict) else None
    if not isinstance(models, dict) or not any(isinstance(m, dict) for m in models.values()):
        raise UserError(f"{benchmark}: benchmark results list no models")
    models = {n: m for n, m in models.items() if isinstance(m, dict)}
    for path in sorted((reports / "torch_ptq").glob("*.json")):
        r, name = optional_json(path), f"{path.stem}_torch_eager_int8"
        if isinstance(r, dict) and name not in models:
            models[name] = _torch_row(path, r)
    return models


def checked_params(params_path: Path) -> tuple[dict, str]:
    """(params, its text) for the report's parameters section; ({}, "") without a file.

    Shown in the report, so refused as every other stage refuses it."""
    params_text, params = "", {}
    if params_path.is_file():
        params = read_params_file(params_path)
        parse_params(params, source=str(params_path))
        params_text = params_path.read_text(encoding="utf-8")
    return params, params_text


def stage_reports(reports: Path) -> dict:
    """The optional per-stage reports, each None (or empty) when its stage did not run."""
    return {
        "seeds": optional_json(reports / "seeds.json"),
        "prune": optional_json(reports / "prune" / "metrics.json"),
        "channels": optional_json(reports / "prune" / "channels.json", list),
        "lowrank": optional_json(reports / "lowrank" / "metrics.json"),
        "distill": optional_json(reports / "distill" / "metrics.json"),
        "qat": {
            p.parent.name.removeprefix("qat_") + "_qat_int8": optional_json(p)
            for p in sorted(reports.glob("qat_*/metrics.json"))
        },
        "export": {p.stem: optional_json(p) for p in sorted((reports / "export").glob("*.json"))},
        "teacher": optional_json(reports / "teacher" / "summary.json"),
    }


def training_curves(reports: Path) -> dict:
    """Run label -> (step, validation top-1) pairs from every DVCLive log under `reports`."""
    curves = {}
    for tsv in sorted(reports.glob("**/plots/metrics/val_top1.tsv")):
        label = tsv.parents[2].relative_to(reports).as_posix().removesuffix("/live")
        if pairs := plots.read_curve(tsv):
            curves[label] = pairs
    return curves


def build_report(inputs: dict) -> list:
    """All sections, in reading order, as render blocks."""
    s = sec.gate_settings(inputs)
    blocks = sec.headline(inputs) + baselines.comparison(inputs)
    blocks += [
        (
            "img",
            "pareto.png",
            "Top-1 vs p50 latency; shaded: where point estimates meet the gate's thresholds "
            f"around `{s['reference']}`",
        ),
        ("img", "size.png", "File size per model"),
    ]
    blocks += baselines.teacher_origin(inputs["teacher"])
    blocks += sec.checklist(inputs) + baselines.deployment_targets(
        inputs["models"], inputs["unavailable_targets"]
    )
    blocks += measured.seed_repeats(inputs["seeds"])
    blocks += measured.timing_noise(inputs["models"], inputs["timing"], s)
    blocks += measured.hardware_limit(inputs["models"], inputs["roofline"], s["release"])
    blocks += measured.latency_predictions(inputs["models"], inputs["latency_model"])
    blocks += methods.pruning(inputs["prune"])
    blocks += methods.lowrank_vs_pruning(inputs["lowrank"], inputs["prune"], inputs["models"])
    blocks += methods.distillation(inputs["distill"])
    blocks += methods.quantization(inputs["qat"]) + methods.training(
        inputs["teacher"], inputs["curves"]
    )
    blocks += measured.hardware(inputs["hardware"]) + sec.params_section(inputs["params_text"])
    return blocks


def pareto_rows(models: dict) -> list[dict]:
    """(model, top1, p50_ms) for every model with both numbers: the data behind pareto.png."""
    rows = [
        {"model": n, "top1": finite_number(m.get("top1")), "p50_ms": finite_number(m.get("p50_ms"))}
        for n, m in models.items()
    ]
    return [r for r in rows if r["top1"] is not None and r["p50_ms"] is not None]


def make_plots(inputs: dict) -> dict[str, bytes]:
    """File name -> PNG (and pareto.csv) bytes; figures without data are left out."""
    s = sec.gate_settings(inputs)
    models, release = inputs["models"], s["release"]
    if not (isinstance(inputs["gate"], dict) and inputs["gate"].get("passed") is True):
        release = None  # a model the gate failed is never starred as the release
    out = {}
    if rows := pareto_rows(models):
        out["pareto.png"] = plots.pareto_png(models, release, sec.region_for(inputs))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["model", "top1", "p50_ms"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        out["pareto.csv"] = buf.getvalue().encode()
    if any(finite_number(m.get("size_mb")) is not None for m in models.values()):
        out["size.png"] = plots.size_png(models, release)
    if inputs["curves"]:
        out["training_curves.png"] = plots.curves_png(inputs["curves"])
    if isinstance(inputs["channels"], list) and inputs["channels"]:
        out["channels.png"] = plots.channels_png(inputs["channels"])
    return out


def write_report(inputs: dict, *, out_md: Path, out_html: Path, plots_dir: Path) -> dict:
    """Write the figures directory, report.md and report.html, replaced together: a signal
    part-way leaves the previous report whole, or the new one whole."""
    blocks = build_report(inputs)
    files = make_plots(inputs)
    plots_dir = Path(plots_dir)
    images = {n: d for n, d in files.items() if n.endswith(".png")}
    rel = Path(os.path.relpath(plots_dir, Path(out_md).parent)).as_posix()

    def write_plots(tmp: Path) -> None:  # the whole directory: no stale figure survives a rerun
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    replace_together(
        {
            plots_dir: write_plots,
            out_md: lambda tmp: tmp.write_text(
                render_markdown(blocks, rel, images), encoding="utf-8"
            ),
            out_html: lambda tmp: tmp.write_text(render_html(blocks, images), encoding="utf-8"),
        }
    )
    return {
        "release": sec.gate_settings(inputs)["release"],
        "models": list(inputs["models"]),
        "plots": sorted(files),
    }
