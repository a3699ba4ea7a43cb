"""prepare at full size: given splits kept exactly, bad layouts refused, the dataset a DVC
dependency, splits memory-mapped, and an interrupted prepare leaves nothing a stage could read."""

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from resnet_slim.data import loader as data
from resnet_slim.data import pixels, prepare
from tests.conftest import REPO, assert_one_line_error, dvc_env, write_image_tree, write_params


def given_tree(root: Path, *, train: dict, test: dict, val: dict | None = None) -> Path:
    write_image_tree(root / "train", train, size=10, seed=1)
    write_image_tree(root / "test", test, size=10, seed=2)
    if val is not None:
        write_image_tree(root / "val", val, size=10, seed=3)
    return root


def run_prepare(tmp_path: Path, root: Path, **prepare_params) -> subprocess.CompletedProcess:
    params = write_params(
        tmp_path / "params.yaml",
        prepare={"source": "imagefolder", "root": str(root), "image_size": 8, **prepare_params},
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.prepare",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "prepared"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


def split_ids(prepared: Path) -> dict[str, set[str]]:
    manifest = data.load_manifest(prepared)
    return {s: set(manifest.loc[manifest.split == s, "id"]) for s in pixels.SPLITS}


def test_given_train_and_test_are_kept_and_val_is_carved_from_train(tmp_path):
    root = given_tree(tmp_path / "ds", train={"cat": 10, "dog": 10}, test={"cat": 4, "dog": 4})
    result = run_prepare(tmp_path, root, val_fraction=0.2)
    assert result.returncode == 0, result.stderr
    ids = split_ids(tmp_path / "prepared")
    assert ids["test"] == {f"test/{c}/{i}.png" for c in ("cat", "dog") for i in range(4)}
    assert ids["train"] | ids["val"] == {
        f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(10)
    }
    assert len(ids["val"]) == 4 and not ids["train"] & ids["val"]  # 20 % of train, stratified
    meta = data.load_meta(tmp_path / "prepared")
    assert meta["split"] == "given" and meta["counts"] == {"train": 16, "val": 4, "test": 8}


def test_a_given_val_folder_is_kept_too(tmp_path):
    root = given_tree(
        tmp_path / "ds", train={"a": 5, "b": 5}, test={"a": 2, "b": 2}, val={"a": 3, "b": 3}
    )
    assert run_prepare(tmp_path, root).returncode == 0
    ids = split_ids(tmp_path / "prepared")
    assert {len(v) for v in ids.values()} == {10, 6, 4}
    assert all(i.startswith(f"{s}/") for s, v in ids.items() for i in v)


def test_random_re_splits_a_given_layout_and_auto_splits_a_flat_folder(tmp_path):
    root = given_tree(tmp_path / "ds", train={"a": 10, "b": 10}, test={"a": 10, "b": 10})
    assert run_prepare(tmp_path, root, split="random").returncode == 0
    ids = split_ids(tmp_path / "prepared")
    assert any(i.startswith("train/") for i in ids["test"])  # mixed: re-split at random
    assert data.load_meta(tmp_path / "prepared")["class_names"] == ["a", "b"]
    flat = write_image_tree(tmp_path / "flat", {"a": 10, "b": 10})
    assert run_prepare(tmp_path, flat).returncode == 0
    assert data.load_meta(tmp_path / "prepared")["split"] == "random"


@pytest.mark.parametrize(
    "layout, words",
    [
        ("flat", ("prepare.split: given needs", "train/<class>/")),
        ("missing-class", ("class(es) ['dog'] missing", "test")),
        ("extra-class", ("class(es) ['emu'] are not in train/",)),
        ("empty-split", ("empty split",)),
        ("leak", ("appear in more than one given split", "train/cat/0.png = test/cat/0.png")),
        ("stray-folder", ("also ['extra']",)),
    ],
)
def test_bad_given_layouts_are_one_line_errors_and_write_nothing(tmp_path, layout, words):
    root = tmp_path / "ds"
    if layout == "flat":
        write_image_tree(root, {"cat": 3, "dog": 3})
    else:
        given_tree(root, train={"cat": 4, "dog": 4}, test={"cat": 2, "dog": 2})
    if layout == "missing-class":
        shutil.rmtree(root / "test" / "dog")
    elif layout == "extra-class":
        write_image_tree(root / "test", {"emu": 2}, size=10, seed=9)
    elif layout == "empty-split":
        for png in (root / "test").rglob("*.png"):
            png.unlink()
    elif layout == "leak":
        shutil.copy(root / "train" / "cat" / "0.png", root / "test" / "cat" / "0.png")
    elif layout == "stray-folder":
        (root / "extra").mkdir()
    result = run_prepare(tmp_path, root, split="given" if layout == "flat" else "auto")
    assert_one_line_error(result, 2, *words)
    assert not (tmp_path / "prepared").exists()
    assert not list(tmp_path.glob(".prepared.tmp-*"))


def test_worker_pool_output_equals_one_process(tmp_path):
    root = write_image_tree(tmp_path / "ds", {"a": 30, "b": 30, "c": 30})
    (root / "b" / "broken.png").write_bytes(b"not a png")
    one, two = (
        prepare.load_imagefolder(
            root, 8, on_bad_image="skip", workers=w, staging=tmp_path / f"staging-{w}"
        )
        for w in (1, 2)
    )
    assert np.array_equal(one.images, two.images) and one.ids == two.ids
    assert one.sha256 == two.sha256 and one.skipped == two.skipped and len(one.skipped) == 1
    assert isinstance(one.pixels.base, type(two.pixels.base))  # both mapped from their staging


def test_splits_are_read_only_memory_maps_and_batches_match_an_in_memory_copy(tiny_prepared):
    split = data.load_split(tiny_prepared, "train")
    assert not split.images.flags.writeable and not split.images.flags.owndata
    meta = data.load_meta(tiny_prepared)

    class Augment:
        crop_padding, hflip = 2, True

    def batches(images):
        loader = data.BatchLoader(
            images, split.labels, meta=meta, batch_size=32, shuffle=True, augment=Augment(), seed=5
        )
        return [(x, y) for _ in range(2) for x, y in loader]

    mapped, in_memory = batches(split.images), batches(np.array(split.images))
    assert len(mapped) == len(in_memory) > 2
    for (x1, y1), (x2, y2) in zip(mapped, in_memory, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_the_embedded_digits_file_is_scikit_learns(tmp_path):
    ours, sklearn = prepare.load_digits(8, REPO / "data" / "digits"), prepare.load_digits(8)
    assert np.array_equal(ours.images, sklearn.images) and ours.sha256 == sklearn.sha256
    assert np.array_equal(ours.labels, sklearn.labels)


def test_changing_the_dataset_folder_makes_prepare_out_of_date(tmp_path):
    """The real dvc.yaml prepare stage, in a temp git + DVC repo holding a copy of the code."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for package in ("stages", "resnet_slim"):
        shutil.copytree(
            REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": stage}}))
    dataset = write_image_tree(tmp_path / "photos", {"a": 8, "b": 8})
    write_params(
        repo / "params.yaml",
        prepare={"source": "imagefolder", "root": str(dataset), "image_size": 8},
    )
    dvc = [sys.executable, "-m", "dvc"]

    def run(*args: str) -> str:
        return subprocess.run(
            args, cwd=repo, env=dvc_env(), capture_output=True, text=True, check=True
        ).stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "repro", "-q")
    assert "up to date" in run(*dvc, "status")
    write_image_tree(dataset, {"a": 1}, size=12, seed=7)  # overwrites a/0.png: an edited image
    assert "prepare" in run(*dvc, "status")
    run(*dvc, "repro", "-q")
    (dataset / "b" / "new.png").write_bytes((dataset / "a" / "0.png").read_bytes())
    assert "prepare" in run(*dvc, "status")


def test_sigterm_while_writing_splits_leaves_no_partial_split(tmp_path):
    root = write_image_tree(tmp_path / "ds", {"a": 600, "b": 600}, size=64)
    params = write_params(
        tmp_path / "params.yaml",
        prepare={"source": "imagefolder", "root": str(root), "image_size": 64},
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stages.prepare",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "prepared"),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".prepared.tmp-*/staging.u8")) and proc.poll() is None:
        assert time.monotonic() < deadline, "prepare never started staging"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "prepared").exists() and not list(tmp_path.glob(".prepared.tmp-*"))
