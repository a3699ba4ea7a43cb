"""The release the web UI / JSON API serves (resnet_slim/serve.py): the gate's verdict, the
benchmarked ONNX file and the dataset's metadata, vouched for by sha256 and opened for serving.

It refuses a model the gate did not pass for these very files (unless `allow_ungated`, which puts
the reason on every page and answer), and never serves a file outside the workspace.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from resnet_slim.compress.export import check_input_size, make_session
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.gate.verdict import read_verdict, served_file_problems
from resnet_slim.io import finite_number, read_json

# Said when a pipeline output is missing.
RUN_THE_PIPELINE = (
    "run make repro first; paths are relative to --root, default the current directory"
)


@dataclass
class Release:
    """The model being served, and what the page says about it."""

    session: ort.InferenceSession
    input_name: str
    meta: dict  # the prepared dataset's meta.json: class names, image size, mean/std
    card: dict  # name, file, top1, size_mb, p50_ms, n_classes, gated, warning


def require_output(path: Path, what: str) -> Path:
    """`path`, or a UserError saying the pipeline has not written it."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found ({RUN_THE_PIPELINE})")
    return path


def gate_verdict(gate_path: Path) -> tuple[dict | None, str | None]:
    """(gate.json if the gate stage could have written it, why it is not a passed release or None).

    A gate.json edited by hand is not a pass: `read_verdict` names what is wrong with it."""
    try:
        verdict = read_verdict(require_output(gate_path, "gate result"))
    except UserError as err:
        return None, str(err)
    if not verdict["passed"]:  # fail closed: read_verdict lets `passed` be only true or false
        return verdict, (
            f"{gate_path}: the gate did not pass for release '{verdict['release']}': "
            f"{verdict['failed'][0]}"
        )
    return verdict, None


def refuse_ungated(not_gated: str | None, allow_ungated: bool) -> None:
    if not_gated and not allow_ungated:
        raise UserError(
            f"refusing to serve an ungated model: {not_gated}; pass --allow-ungated "
            f"to serve it anyway (the page will show a warning)"
        )


def benchmarked_model(benchmark_path: Path, name: str | None, root: Path) -> tuple[dict, Path]:
    """`name`'s row in benchmark.json and its ONNX file, which must lie inside `root`.

    Never a file elsewhere (`/etc/x.onnx`, `../x.onnx`, a link out of the workspace): the server
    only serves what the pipeline wrote, even with --allow-ungated."""
    results = read_json(
        require_output(benchmark_path, "benchmark results"), what="benchmark results"
    )
    models = results.get("models") if isinstance(results, dict) else None
    models = models if isinstance(models, dict) else {}
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        wanted = f"model '{name}'" if name else "the release model (the gate names none)"
        raise UserError(
            f"{benchmark_path}: no benchmark results for {wanted}; pass --model NAME "
            f"(benchmarked: {known})"
        )
    entry = models[name] if isinstance(models[name], dict) else {}
    file = entry.get("file")
    if not isinstance(file, str) or not file.endswith(".onnx"):
        raise UserError(
            f"{benchmark_path}: model '{name}' has no ONNX file (runtime "
            f"{entry.get('runtime', 'unknown')}); serve an onnxruntime model"
        )
    if "\0" in file:  # no path has one (resolving it would raise ValueError)
        raise UserError(f"{benchmark_path}: model '{name}' has no valid file name ({file!r})")
    workspace = root.resolve()
    path = (workspace / file).resolve()  # an absolute `file` stays itself
    if not path.is_relative_to(workspace):
        raise UserError(
            f"{benchmark_path}: the ONNX file of model '{name}' is {file}, outside the "
            f"workspace {workspace}; refusing to serve a file the pipeline did not write"
        )
    return entry, path


def unvouched(verdict: dict, root: Path, served: dict[str, Path]) -> str | None:
    """Why the files the server would read are not the ones the gate passed, or None if they are.

    `served` maps each vouched file (release, meta, benchmark) to the path the server reads: the
    recorded files must be unchanged, and they must be the ones read (not another --benchmark)."""
    problems = served_file_problems(verdict, root)
    files = verdict.get("files") if isinstance(verdict.get("files"), dict) else {}
    for name, path in served.items():
        record = files.get(name) if isinstance(files.get(name), dict) else {}
        recorded = record.get("path")
        if isinstance(recorded, str) and (root / recorded).resolve() != path.resolve():
            problems.append(f"the {name} file to serve is {path}, not {recorded} the gate judged")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}; re-run the pipeline (make repro)"


def load_release(
    *,
    root: Path,
    gate: Path,
    benchmark: Path,
    prepared: Path,
    model: str | None = None,
    allow_ungated: bool = False,
) -> Release:
    """Open the gated release model (or `model`, with `allow_ungated`) for serving.

    Relative paths, including the model file named in the benchmark, are taken from `root`. A
    passed gate vouches for the release file, meta.json and benchmark.json by sha256: the server
    reads exactly those, or the model counts as ungated.
    """
    root = Path(root)
    gate_path, benchmark_path = root / gate, root / benchmark
    meta_path = root / prepared / "meta.json"
    verdict, not_gated = gate_verdict(gate_path)
    release_name = verdict["release"] if verdict else None
    if model and release_name and model != release_name and not_gated is None:
        not_gated = f"--model {model} is not the gated release ('{release_name}')"
    refuse_ungated(not_gated, allow_ungated)

    name = model or release_name
    entry, model_path = benchmarked_model(benchmark_path, name, root)
    require_output(meta_path, "prepared dataset metadata")
    meta = data.load_meta(root / prepared)
    require_output(model_path, f"ONNX file of model '{name}'")
    if not_gated is None:  # the gate passed: for these very files?
        served = {"release": model_path, "meta": meta_path, "benchmark": benchmark_path}
        not_gated = unvouched(verdict, root, served)
        refuse_ungated(not_gated, allow_ungated)

    session = open_checked_session(model_path, meta, root / prepared)
    card = model_card(name, entry, n_classes=len(meta["class_names"]), not_gated=not_gated)
    return Release(session=session, input_name=session.get_inputs()[0].name, meta=meta, card=card)


def open_checked_session(model_path: Path, meta: dict, prepared: Path) -> ort.InferenceSession:
    """An onnxruntime session on `model_path`, refused unless it takes the dataset's image size
    and gives finite scores for its classes (`prepared` is the dataset folder, for the error)."""
    session = make_session(model_path)
    check_input_size(session, int(meta["image_size"]), model_path)
    input_name = session.get_inputs()[0].name
    size = int(meta["image_size"])
    # One warm-up run doubles as the check that the model and the dataset agree on the classes,
    # and that the model computes numbers at all (NaN logits would rank classes arbitrarily).
    logits = session.run(None, {input_name: np.zeros((1, 3, size, size), dtype=np.float32)})[0]
    n_classes = len(meta["class_names"])
    if logits.shape != (1, n_classes):
        raise UserError(
            f"{model_path}: model outputs {list(logits.shape)} logits per batch but "
            f"{prepared} has {n_classes} classes"
        )
    if not np.isfinite(logits).all():
        raise UserError(
            f"{model_path}: model outputs non-finite logits (NaN or inf) for a blank image; "
            f"refusing to serve it (re-export it: make repro)"
        )
    return session


def model_card(name: str, entry: dict, *, n_classes: int, not_gated: str | None) -> dict:
    """What the page and every answer say about the model: its measured numbers (a number that is
    not a measurement shows as missing) and, when ungated, why."""
    return {
        "name": name,
        "file": entry["file"],
        "top1": finite_number(entry.get("top1")),
        "size_mb": finite_number(entry.get("size_mb")),
        "p50_ms": finite_number(entry.get("p50_ms")),
        "n_classes": n_classes,
        "gated": not_gated is None,
        "warning": not_gated,
    }
