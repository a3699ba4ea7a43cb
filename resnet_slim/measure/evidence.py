"""The evidence chain from the benchmark to the gate: the gate judges only numbers it can trace.

The benchmark records what it measured: the sha256 of every model file, of the files that define the
test split (`manifest.csv`, `test_images.npy`, `test_labels.npy`) and of its other outputs
(`io.write_together`), and per-image predictions keyed by the manifest's image ids. Before judging,
the gate checks that this record still holds and agrees with itself: the files are the ones
measured, the predictions cover the test split once per image with the manifest's labels and
reproduce benchmark.json's top-1s, and seed repeats are about these very models. Anything else (a
stale file, a torn write, an edited number) is a named problem, and a named problem fails the gate.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from resnet_slim.data.loader import CSV_READ_ERRORS, load_manifest
from resnet_slim.errors import UserError
from resnet_slim.io import check_together, sha256_file
from resnet_slim.params import BaseParams

# the test split, and meta.json: its class names and normalisation decide what a prediction means
SPLIT_FILES = ("manifest.csv", "test_images.npy", "test_labels.npy", "meta.json")
TOP1_TOLERANCE_PP = 1e-6  # recomputed vs recorded top-1: both are the same float computation
# What a measurement can be; outside these a number is a fault or an edit, never a result (a
# percentage; a batch-1 latency between 1 ns and ~3 h; a model file between 1 byte and 1 TB).
PERCENT, LATENCY_MS = (0.0, 100.0), (1e-6, 1e7)
MEASUREMENT_RANGES = {
    "top1": PERCENT,
    "top1_ci_low": PERCENT,
    "top1_ci_high": PERCENT,
    "p50_ms": LATENCY_MS,
    "p90_ms": LATENCY_MS,
    "p99_ms": LATENCY_MS,
    "mean_ms": LATENCY_MS,
    "p50_ms_all_cores": LATENCY_MS,
    "size_mb": (1e-6, 1e6),
    "peak_rss_mb": (1e-3, 1e7),
}
# The gate range-checks these in its own checks (resnet_slim/gate/checks.py), naming the failed
# check; the chain checks the judged models' other numbers, where recorded.
GATED_METRICS = ("top1", "p50_ms", "size_mb")


def test_split_record(prepared_dir: str | Path) -> dict:
    """The sha256 of each file that defines the test split (what the benchmark measured on)."""
    prepared = Path(prepared_dir)
    missing = [name for name in SPLIT_FILES if not (prepared / name).is_file()]
    if missing:
        raise UserError(f"{prepared}: {missing} not found; run the prepare stage first")
    return {
        "path": str(prepared),
        "sha256": {name: sha256_file(prepared / name) for name in SPLIT_FILES},
    }


def test_images(prepared_dir: str | Path) -> pd.DataFrame:
    """The test split as the manifest lists it: columns id, label, in the test split files'
    order."""
    manifest = load_manifest(prepared_dir)
    path = Path(prepared_dir) / "manifest.csv"
    if not {"id", "split", "label"} <= set(manifest.columns) or not pd.api.types.is_integer_dtype(
        manifest["label"]
    ):
        raise UserError(
            f"{path}: manifest lacks id / split / whole-number label columns; re-run "
            f"the prepare stage"
        )
    test = manifest.loc[manifest["split"] == "test", ["id", "label"]].reset_index(drop=True)
    if test["id"].isna().any() or test["id"].duplicated().any():
        raise UserError(f"{path}: test image ids are empty or repeated; re-run the prepare stage")
    return test


def test_ids(prepared_dir: str | Path, labels: np.ndarray) -> list[str]:
    """The benchmark's side: the manifest ids of the test split's images, whose labels must
    agree."""
    test = test_images(prepared_dir)
    if len(test) != len(labels) or (test["label"].to_numpy() != np.asarray(labels)).any():
        raise UserError(
            f"{prepared_dir}: manifest.csv's {len(test)} test rows do not match "
            f"the test split's {len(labels)} images and labels; re-run the prepare stage"
        )
    return test["id"].tolist()


def read_predictions(path: str | Path) -> pd.DataFrame:
    """The benchmark's predictions table: image (id), label, then the class per image per model."""
    try:
        table = pd.read_csv(path, dtype={"image": str}, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise UserError(
            f"{path}: per-image predictions not found (re-run the benchmark stage)"
        ) from None
    except CSV_READ_ERRORS as err:
        raise UserError(
            f"{path}: per-image predictions are not a readable CSV ({err.__class__.__name__})"
        ) from None
    if not {"image", "label"} <= set(table.columns) or len(table) == 0:
        raise UserError(f"{path}: per-image predictions lack 'image' / 'label' columns or rows")
    bad = [c for c in table.columns if c != "image" and not pd.api.types.is_integer_dtype(table[c])]
    if bad:
        raise UserError(f"{path}: columns {bad} are not whole class numbers")
    return table


def coverage_problem(table: pd.DataFrame, test: pd.DataFrame, path: str | Path) -> str | None:
    """Why the predictions are not exactly one row per test image with its manifest label."""
    ids = table["image"]
    repeated = int(ids.duplicated().sum())
    missing = sorted(set(test["id"]) - set(ids))
    extra = sorted(set(ids.dropna()) - set(test["id"]))
    if repeated or missing or extra or ids.isna().any():
        return (
            f"{path}: {len(table)} rows for the {len(test)} test images ({repeated} repeated, "
            f"{len(missing)} missing, {len(extra)} not in the test split"
            + (f", e.g. {(missing or extra)[0]!r}" if missing or extra else "")
            + ")"
        )
    expected = test.set_index("id")["label"].reindex(ids).to_numpy()
    wrong = int((table["label"].to_numpy() != expected).sum())
    if wrong:
        return f"{path}: {wrong} of {len(table)} labels differ from the manifest's"
    return None


@dataclass
class Chain:
    """What the gate may trust: problems with the whole record, and with each judged model."""

    problems: list[str] = field(default_factory=list)
    model_problems: dict[str, list[str]] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)  # from verified predictions only
    correct_error: str | None = None
    predictions_broken: bool = False  # present but unusable: fails the accuracy check too
    n_test: int | None = None


def verify(
    bench: dict,
    *,
    names: list[str],
    benchmark: str | Path,
    predictions: str | Path,
    prepared: str | Path,
) -> Chain:
    """Check benchmark.json's record against the files on disk for the models `names`."""
    chain = Chain()
    bench = bench if isinstance(bench, dict) else {}
    table = _read_table(chain, predictions)  # first: its own problem is the one the check names
    test = _read_test_split(chain, bench, benchmark, prepared)
    if table is not None and test is not None:
        problem = coverage_problem(table, test, predictions)
        if problem:
            chain.problems.append(problem)
            chain.predictions_broken = True
    chain.problems += check_together(bench, record=benchmark)
    chain.problems += replaced_predictions(bench, benchmark, predictions)
    models = bench.get("models") if isinstance(bench.get("models"), dict) else {}
    images = []  # the normalised test split, loaded once by the first model re-scored
    for name in dict.fromkeys(names):
        if isinstance(models.get(name), dict):  # a missing row fails the metric checks already
            usable = None if chain.predictions_broken else table
            chain.model_problems[name] = model_problems(name, models[name], usable, chain.n_test)
            if usable is not None and not chain.problems and not chain.model_problems[name]:
                chain.model_problems[name] += rescore_problems(
                    name, models[name], usable, prepared, images
                )
    if chain.problems:
        chain.correct_error = f"per-image predictions not used: {chain.problems[0]}"
    elif table is not None:
        labels = table["label"].to_numpy()
        chain.correct = {
            c: table[c].to_numpy() == labels for c in table.columns if c not in ("image", "label")
        }
    return chain


def _read_table(chain: Chain, predictions: str | Path) -> pd.DataFrame | None:
    """The predictions table, or None with its problem recorded (broken if the file is there)."""
    try:
        return read_predictions(predictions)
    except UserError as err:
        chain.problems.append(str(err))
        chain.predictions_broken = Path(predictions).is_file()
        return None


def _read_test_split(
    chain: Chain, bench: dict, benchmark: str | Path, prepared: str | Path
) -> pd.DataFrame | None:
    """The manifest's test split (its size recorded in the chain), or None with the problem; a
    split other than the one benchmark.json was measured on is a problem too."""
    try:
        if (
            not isinstance(bench.get("test_split"), dict)
            or bench["test_split"].get("sha256") != test_split_record(prepared)["sha256"]
        ):
            chain.problems.append(
                f"the test split in {prepared} is not the one {benchmark} was "
                f"measured on (sha256 of {'/'.join(SPLIT_FILES)} differs or is not "
                f"recorded); re-run the benchmark"
            )
        test = test_images(prepared)
        chain.n_test = len(test)
        return test
    except UserError as err:
        chain.problems.append(str(err))
        return None


def replaced_predictions(bench: dict, benchmark: str | Path, predictions: str | Path) -> list[str]:
    """A problem when the predictions file is not the one benchmark.json recorded writing."""
    outputs = bench.get("outputs") if isinstance(bench.get("outputs"), dict) else {}
    recorded = outputs.get("predictions") if isinstance(outputs.get("predictions"), dict) else None
    if (
        recorded is not None
        and Path(predictions).is_file()
        and Path(predictions).resolve() != Path(str(recorded.get("path"))).resolve()
        and sha256_file(predictions) != recorded.get("sha256")
    ):
        return [f"{predictions} is not the predictions file {benchmark} was written with"]
    return []


def rescore_problems(
    name: str, entry: dict, table: pd.DataFrame, prepared, images: list
) -> list[str]:
    """Run an onnxruntime model's file on the test split again: its classes must be the ones in
    the predictions table, so no file's top-1 is taken on trust (a few seconds at most here).
    `images`: [the normalised test split] once a model has loaded it ([] before), shared."""
    if entry.get("runtime") != "onnxruntime" or name not in table.columns:
        return []  # other runtimes are timed, not re-scored: their rows' top-1 is checked above
    from resnet_slim.compress.export import make_session, run_onnx
    from resnet_slim.data.loader import (
        normalized_split,
    )  # torch / onnxruntime: only when re-scoring

    if not images:
        images.append(normalized_split(prepared, "test")[0])
    threads = entry.get("threads") if isinstance(entry.get("threads"), int) else 1
    classes = run_onnx(make_session(entry["file"], threads=threads), images[0]).argmax(1)
    differ = int((classes != table[name].to_numpy()).sum())
    if differ:
        return [
            f"{name}: re-scored on the test split, {entry['file']} gives another class than "
            f"the predictions file on {differ} of {len(classes)} images"
        ]
    return []


def model_problems(
    name: str, entry: dict, table: pd.DataFrame | None, n_test: int | None
) -> list[str]:
    """One model's row against its file (sha256, size) and against the predictions (top-1, n)."""
    problems = file_problems(name, entry) + range_problems(name, entry)
    if n_test is not None and entry.get("n_test") != n_test:
        problems.append(
            f"{name}: n_test {entry.get('n_test')!r} but the test split has {n_test} images"
        )
    if table is None:
        return problems
    return problems + top1_problems(name, entry, table)


def file_problems(name: str, entry: dict) -> list[str]:
    """The model file must be the one measured: recorded, present, same sha256 (and size)."""
    file, digest = entry.get("file"), entry.get("sha256")
    if not isinstance(file, str) or not isinstance(digest, str):
        return [f"{name}: benchmark.json records no file and sha256 (re-run the benchmark)"]
    if not Path(file).is_file():
        return [f"{name}: {file} is missing"]
    if sha256_file(file) != digest:
        return [
            f"{name}: {file} changed since it was benchmarked (sha256 differs); re-run "
            f"the benchmark"
        ]
    if (
        entry.get("runtime") == "onnxruntime"
        and entry.get("size_mb") != Path(file).stat().st_size / 1e6
    ):
        return [f"{name}: size_mb {entry.get('size_mb')!r} is not the size of {file}"]
    return []


def range_problems(name: str, entry: dict) -> list[str]:
    """Recorded numbers outside what a measurement can be (the gated ones: in the gate's checks)."""
    problems = []
    for key, (low, high) in MEASUREMENT_RANGES.items():
        value = entry.get(key)
        if (
            key not in GATED_METRICS
            and value is not None
            and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not low <= value <= high
            )
        ):
            problems.append(
                f"{name}: {key} {value!r} is not a measurement (outside [{low:g}, {high:g}])"
            )
    return problems


def top1_problems(name: str, entry: dict, table: pd.DataFrame) -> list[str]:
    """The recorded top-1 must be what the model's per-image predictions give."""
    if name not in table.columns:
        return [f"{name}: no per-image predictions"]
    top1, recorded = 100.0 * float((table[name] == table["label"]).mean()), entry.get("top1")
    if (
        isinstance(recorded, (int, float))
        and not isinstance(recorded, bool)
        and not abs(top1 - recorded) <= TOP1_TOLERANCE_PP
    ):
        return [
            f"{name}: benchmark.json says top-1 {recorded:.4g}% but its predictions "
            f"give {top1:.4f}%"
        ]
    return []


def seed_evidence(
    seeds, *, base: BaseParams, bench: dict, names: list[str]
) -> tuple[dict | None, str | None]:
    """(seeds.json, None) if the gate may use it, else (None, why not: a note for gate.json).

    Used only when base.seeds asks for 2+ seeds, the file covers exactly those, and it was run
    for the same model files (sha256) and test split as benchmark.json.
    """
    bench = bench if isinstance(bench, dict) else {}
    requested = sorted({base.seed, *base.seeds}) if base.seeds else [base.seed]
    if len(requested) < 2:
        return None, (
            None
            if seeds is None
            else f"seed repeats not used: base.seeds asks for one seed ({requested})"
        )
    if not isinstance(seeds, dict):
        return None, f"seed repeats not used: base.seeds asks for {requested} but none were found"
    ran = seeds.get("seeds")
    if (
        not isinstance(ran, list)
        or sorted(s for s in ran if isinstance(s, int)) != requested
        or len(ran) != len(requested)
    ):
        return (
            None,
            f"seed repeats not used: they cover seeds {ran!r}, base.seeds asks for {requested}",
        )
    stale = [
        n
        for n in names
        if not isinstance(_sha256(bench.get("models"), n), str)
        or _sha256(seeds.get("benchmark_models"), n) != _sha256(bench.get("models"), n)
    ]
    if stale:
        return None, (
            f"seed repeats not used: they were not run for benchmark.json's model files "
            f"of {stale}; re-run seed_repeats"
        )
    if seeds.get("test_split") != bench.get("test_split"):
        return (
            None,
            "seed repeats not used: they were run on another test split; re-run seed_repeats",
        )
    return seeds, None


def _sha256(rows, name: str):
    row = rows.get(name) if isinstance(rows, dict) else None
    return row.get("sha256") if isinstance(row, dict) else None
