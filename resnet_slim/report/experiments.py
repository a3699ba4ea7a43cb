"""Compare DVC experiments side by side: the params that differ and the release's key metrics.

`parse_exp_show` reads the list that `dvc exp show --json` prints (DVC 3: one entry per baseline
commit or the workspace, each with its `experiments`, each with its `revs`) into one row per
experiment; `comparison_table` keeps the params that changed and the metrics a reviewer wants:
release model, its top-1 and drop, speed-up, p50 latency, file size and whether the gate passed
(from reports/metrics.json; older commits: from gate.json and benchmark.json).
"""

import json
import subprocess
import sys

import pandas as pd

from resnet_slim.errors import UserError
from resnet_slim.io import finite_number

ID_COLUMNS = ["experiment", "rev", "baseline", "state"]
KEY_METRICS = [
    "release",
    "gate passed",
    "release top-1 %",
    "drop pp",
    "speed-up x",
    "speed-up CI low",
    "release p50 ms",
    "release MB",
]


def flatten(obj: dict, prefix: str = "") -> dict:
    """{"prune": {"ratio": 0.3}} -> {"prune.ratio": 0.3}; lists become JSON text (hashable)."""
    out = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, list) else value
    return out


def _metrics_file(metrics: dict, suffix: str) -> dict:
    for path, entry in (metrics or {}).items():
        if path.replace("\\", "/").endswith(suffix) and isinstance(entry, dict):
            return entry.get("data") or {}
    return {}


def experiment_row(rev: dict, *, name: str, baseline: str, state: str) -> dict:
    """One row: identity, every param (flattened, file-prefixed unless params.yaml), key metrics."""
    data = rev.get("data") or {}
    sha = str(rev.get("rev") or "")
    row = {
        "experiment": name,
        "rev": sha[:7] if len(sha) == 40 else sha,
        "baseline": baseline,
        "state": "error" if rev.get("error") and not data else state,
    }
    for path, entry in (data.get("params") or {}).items():
        prefix = "" if path == "params.yaml" else f"{path}:"
        row.update(flatten((entry or {}).get("data") or {}, prefix))
    headline = _metrics_file(data.get("metrics"), "reports/metrics.json")
    if not headline:  # commits from before reports/metrics.json: the gate and benchmark files
        gate = _metrics_file(data.get("metrics"), "gate.json")
        models = _metrics_file(data.get("metrics"), "benchmark.json").get("models") or {}
        rel = models.get(gate.get("release"))
        headline = {
            "release": gate.get("release"),
            "passed": gate.get("passed"),
            **{
                k: v
                for k, v in (rel if isinstance(rel, dict) else {}).items()
                if k in ("top1", "p50_ms", "size_mb")
            },
        }
    row.update(
        {
            "release": headline.get("release"),
            "gate passed": headline.get("passed"),
            "release top-1 %": finite_number(headline.get("top1")),
            "drop pp": finite_number(headline.get("drop_pp")),
            "speed-up x": finite_number(headline.get("speedup_vs_reference")),
            "speed-up CI low": finite_number(headline.get("speedup_vs_reference_ci_low")),
            "release p50 ms": finite_number(headline.get("p50_ms")),
            "release MB": finite_number(headline.get("size_mb")),
        }
    )
    return row


def parse_exp_show(entries: list) -> pd.DataFrame:
    """Every workspace / baseline / experiment in `dvc exp show --json` output as one row."""
    if not isinstance(entries, list):
        raise UserError("dvc exp show --json: expected a list of revisions")
    rows = []
    for base in entries:
        if not isinstance(base, dict):
            continue
        base_name = base.get("name") or (
            "workspace" if base.get("rev") == "workspace" else str(base.get("rev") or "?")[:7]
        )
        rows.append(
            experiment_row(
                base,
                name=base_name,
                baseline=base_name,
                state="workspace" if base.get("rev") == "workspace" else "baseline",
            )
        )
        for exp in base.get("experiments") or []:
            executor = exp.get("executor") or {}
            state = executor.get("state") or "done"
            for rev in exp.get("revs") or []:
                rows.append(
                    experiment_row(
                        rev,
                        name=rev.get("name") or exp.get("name") or str(rev.get("rev"))[:7],
                        baseline=base_name,
                        state=state,
                    )
                )
    return pd.DataFrame(rows)


def changed_params(df: pd.DataFrame) -> list[str]:
    """Param columns whose values are not the same in every row."""
    params = [c for c in df.columns if c not in ID_COLUMNS + KEY_METRICS]
    return [c for c in params if df[c].astype(str).nunique(dropna=False) > 1]


def comparison_table(entries: list, all_params: bool = False) -> pd.DataFrame:
    """Identity columns, the params that differ (or all), then the key metrics."""
    df = parse_exp_show(entries)
    if df.empty:
        return df
    params = (
        [c for c in df.columns if c not in ID_COLUMNS + KEY_METRICS]
        if all_params
        else changed_params(df)
    )
    return df[ID_COLUMNS + params + KEY_METRICS]


def run_exp_show(extra_args: list[str] = (), cwd=None) -> list:
    """Run `dvc exp show --json` with this interpreter's DVC; read-only."""
    cmd = [sys.executable, "-m", "dvc", "exp", "show", "--json", *extra_args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd[2:])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    text = proc.stdout
    start = text.find("[")  # skip anything DVC printed before the JSON
    try:
        return json.loads(text[start:] if start >= 0 else text)
    except json.JSONDecodeError as err:
        raise UserError(f"dvc exp show --json printed no JSON ({err})") from None
