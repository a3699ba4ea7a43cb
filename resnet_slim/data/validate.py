"""Data validation of a prepared dataset's manifest with a Great Expectations suite.

Three tables are checked: the manifest itself (schema, nulls, label range), per-(split, class)
counts (every class in every split, class balance), and per-image-hash usage (no image in two
splits, no image with two labels). The result is a JSON report listing every expectation.
"""

import logging
import os

import pandas as pd

from resnet_slim.data.pixels import SPLITS
from resnet_slim.errors import UserError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
import great_expectations as gx  # noqa: E402
from great_expectations.data_context.types.base import ProgressBarsConfig  # noqa: E402

REQUIRED_COLUMNS = ["id", "split", "label", "class_name", "sha256", "width", "height"]


def class_share_table(manifest: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    """One row per (split, class), zero counts included, with the class's share of its split."""
    full = pd.MultiIndex.from_product([list(SPLITS), class_names], names=["split", "class_name"])
    counts = manifest.groupby(["split", "class_name"]).size().reindex(full, fill_value=0)
    table = counts.rename("count").reset_index()
    totals = table.groupby("split")["count"].transform("sum").clip(lower=1)
    table["share"] = table["count"] / totals
    return table


def hash_table(manifest: pd.DataFrame) -> pd.DataFrame:
    grouped = manifest.groupby("sha256")
    return pd.DataFrame(
        {
            "n_splits": grouped["split"].nunique(),
            "n_labels": grouped["label"].nunique(),
            "ids": grouped["id"].agg(lambda ids: " | ".join(ids[:3])),
        }
    ).reset_index()


def _suites(class_names: list[str], min_share: float, max_share: float) -> dict[str, list]:
    E = gx.expectations
    return {
        "manifest": [
            E.ExpectTableColumnsToMatchSet(column_set=REQUIRED_COLUMNS, exact_match=False),
            *[E.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED_COLUMNS],
            E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(len(class_names)))),
            E.ExpectColumnValuesToBeInSet(column="class_name", value_set=class_names),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
            E.ExpectColumnValuesToBeUnique(column="id"),
            E.ExpectColumnValuesToBeBetween(column="width", min_value=1),
            E.ExpectColumnValuesToBeBetween(column="height", min_value=1),
        ],
        "class_shares": [
            # every class must occur in every split, within the balance bounds
            E.ExpectColumnValuesToBeBetween(column="count", min_value=1),
            E.ExpectColumnValuesToBeBetween(
                column="share", min_value=min_share, max_value=max_share
            ),
        ],
        "image_hashes": [
            E.ExpectColumnValuesToBeBetween(column="n_splits", max_value=1),  # leakage
            E.ExpectColumnValuesToBeBetween(column="n_labels", max_value=1),  # conflicting labels
        ],
    }


def _unexpected_rows(result, table: pd.DataFrame) -> list:
    index = (result.result or {}).get("partial_unexpected_index_list") or []
    rows = table.loc[[i for i in index if i in table.index][:3]]
    columns = [c for c in rows.columns if c not in ("sha256", "width", "height", "label")]
    return rows[columns].astype(str).to_dict(orient="records")


def validate_manifest(
    manifest: pd.DataFrame,
    class_names: list[str],
    *,
    min_class_share: float,
    max_class_share: float,
) -> dict:
    """Run the suite; return {"success", "checks": [...], "failed": ["table: expectation ..."]}."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:  # the per-class / per-hash tables below cannot even be built
        raise UserError(f"manifest lacks column(s) {missing}; re-run the prepare stage")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    tables = {
        "manifest": manifest,
        "class_shares": class_share_table(manifest, class_names),
        "image_hashes": hash_table(manifest),
    }
    source = context.data_sources.add_pandas("prepared")
    checks = []
    for name, expectations in _suites(class_names, min_class_share, max_class_share).items():
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        result = batch.get_batch(batch_parameters={"dataframe": tables[name]}).validate(
            suite,
            result_format={"result_format": "COMPLETE", "return_unexpected_index_query": False},
        )
        for r in result.results:
            config = r.expectation_config
            kwargs = {k: v for k, v in config.kwargs.items() if k not in ("batch_id",)}
            checks.append(
                {
                    "table": name,
                    "expectation": config.type,
                    "kwargs": kwargs,
                    "success": bool(r.success),
                    "unexpected_count": (r.result or {}).get("unexpected_count"),
                    "unexpected_examples": [] if r.success else _unexpected_rows(r, tables[name]),
                }
            )
    failed = [
        f"{c['table']}: {c['expectation']}({_short(c['kwargs'])}) "
        f"{c['unexpected_count'] or 0} bad rows, e.g. {c['unexpected_examples'][:2]}"
        for c in checks
        if not c["success"]
    ]
    return {"success": not failed, "n_images": len(manifest), "checks": checks, "failed": failed}


def _short(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items() if k not in ("value_set", "column_set"))
