import pandas as pd

from resnet_slim.data import loader as data
from resnet_slim.data.loader import load_manifest, load_meta
from resnet_slim.data.validate import validate_manifest


def _validate(manifest: pd.DataFrame, class_names):
    return validate_manifest(manifest, class_names, min_class_share=0.02, max_class_share=0.5)


def test_clean_manifest_passes(tiny_prepared):
    report = _validate(load_manifest(tiny_prepared), load_meta(tiny_prepared)["class_names"])
    assert report["success"] and report["failed"] == []
    assert len(report["checks"]) >= 15


def test_leaked_duplicate_across_splits_fails(tiny_prepared):
    manifest = load_manifest(tiny_prepared)
    test_row = manifest.index[manifest.split == "test"][0]
    train_row = manifest.index[
        (manifest.split == "train") & (manifest.label == manifest.label[test_row])
    ][0]
    manifest.loc[test_row, "sha256"] = manifest.loc[train_row, "sha256"]
    report = _validate(manifest, load_meta(tiny_prepared)["class_names"])
    assert not report["success"]
    assert any("column=n_splits" in f for f in report["failed"])
    assert not any(
        "column=n_labels" in f for f in report["failed"]
    )  # same label: a leak, not a conflict


def test_class_missing_from_a_split_fails(tiny_prepared):
    manifest = load_manifest(tiny_prepared)
    manifest = manifest[~((manifest.split == "val") & (manifest.class_name == "7"))]
    report = _validate(manifest, load_meta(tiny_prepared)["class_names"])
    assert not report["success"]
    assert any("count" in f and "'val'" in f and "'7'" in f for f in report["failed"])


def test_nulls_and_unknown_labels_fail(tiny_prepared):
    manifest = load_manifest(tiny_prepared)
    manifest.loc[0, "class_name"] = None
    manifest.loc[1, "label"] = 42
    failed = " ".join(_validate(manifest, load_meta(tiny_prepared)["class_names"])["failed"])
    assert "expect_column_values_to_not_be_null(column=class_name)" in failed
    assert "expect_column_values_to_be_in_set(column=label)" in failed


def test_class_imbalance_bounds_come_from_params(tiny_prepared):
    manifest = load_manifest(tiny_prepared)
    report = validate_manifest(
        manifest, load_meta(tiny_prepared)["class_names"], min_class_share=0.2, max_class_share=0.5
    )
    assert not report["success"] and any("share" in f for f in report["failed"])


def test_validation_flags_an_image_with_two_labels(tiny_prepared):
    from resnet_slim.data.validate import validate_manifest

    manifest = data.load_manifest(tiny_prepared)
    twin = manifest.iloc[[0]].assign(id="copy", label=(manifest.label[0] + 1) % 10)
    twin["class_name"] = str(twin.label.iloc[0])
    report = validate_manifest(
        pd.concat([manifest, twin], ignore_index=True),
        [str(d) for d in range(10)],
        min_class_share=0.0,
        max_class_share=1.0,
    )
    assert not report["success"] and any("column=n_labels" in f for f in report["failed"])
