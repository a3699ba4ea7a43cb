"""Inputs that would hang, exhaust memory or crash are one-line errors: image files over
prepare.max_file_mb, symlinks out of the dataset root, class names written two ways (NFC / NFD), a
damaged meta.json and JSON no reader can hold. (Params files: alias bombs, deep nesting, huge
integers and files are in tests/test_params.py.)"""

import json
import re
import resource
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from resnet_slim.data import loader as data
from resnet_slim.data import prepare
from resnet_slim.errors import UserError
from tests.conftest import (
    assert_not_written,
    assert_one_line_error,
    peak_rss_kb,
    run_prepare_stage,
    write_image_tree,
    write_params,
)

# --------------------------------------------------------------------------------------------
# prepare: file sizes, symlinks, class names


def test_an_oversize_image_is_refused_before_it_is_read(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=8)
    with (root / "a" / "huge.png").open("wb") as file:
        file.truncate(3 * 10**9)  # sparse: 3 GB by its size, nothing on disk
    # the decoding workers are child processes: their peak counts in RUSAGE_CHILDREN
    children = lambda: resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # noqa: E731
    before, before_children, start = peak_rss_kb(), children(), time.monotonic()
    with pytest.raises(UserError) as caught:
        prepare.load_imagefolder(root, 8)
    assert "bad image a/huge.png: ValueError: 3000 MB, over prepare.max_file_mb (50 MB)" in (
        str(caught.value)
    )
    raw = prepare.load_imagefolder(root, 8, on_bad_image="skip", workers=2)
    assert len(raw.ids) == 6 and len(raw.skipped) == 1 and "huge.png" in raw.skipped[0]
    assert time.monotonic() - start < 30
    assert (peak_rss_kb() - before) / 1024 < 100 and (children() - before_children) / 1024 < 500


def test_max_file_mb_is_the_cap_the_stage_uses(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 10, "b": 10}, size=8)
    (root / "a" / "big.png").write_bytes(b"\0" * 20_000)  # would be a bad image anyway: not read
    prepare_params = {"source": "imagefolder", "root": str(root), "image_size": 8}
    params = write_params(tmp_path / "params.yaml", prepare={**prepare_params, "max_file_mb": 0.01})
    assert_one_line_error(
        run_prepare_stage(tmp_path, params), 2, "a/big.png", "over prepare.max_file_mb (0.01 MB)"
    )
    assert_not_written(tmp_path / "prepared")
    skip = {**prepare_params, "max_file_mb": 0.01, "on_bad_image": "skip"}
    result = run_prepare_stage(tmp_path, write_params(tmp_path / "params.yaml", prepare=skip))
    assert result.returncode == 0, result.stderr
    assert "1 bad files skipped" in result.stdout
    assert "max_file_mb" in data.load_meta(tmp_path / "prepared")["skipped_images"][0]


def test_a_class_folder_linked_from_outside_the_root_is_refused(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 4, "b": 4}, size=8)
    outside = write_image_tree(tmp_path / "elsewhere", {"c": 4}, size=8, seed=5)
    (root / "c").symlink_to(outside / "c")
    with pytest.raises(UserError, match="a symlink to .*elsewhere/c, outside the dataset root"):
        prepare.load_imagefolder(root, 8)
    params = write_params(
        tmp_path / "params.yaml",
        prepare={"source": "imagefolder", "root": str(root), "image_size": 8},
    )
    assert_one_line_error(
        run_prepare_stage(tmp_path, params), 2, "imgs/c", "outside the dataset root"
    )
    assert_not_written(tmp_path / "prepared")


def test_an_image_linked_from_outside_the_root_is_refused_and_one_inside_is_read(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 4, "b": 4}, size=8)
    write_image_tree(root / ".store", {"x": 1}, size=8, seed=3)  # hidden: not a class
    (root / "a" / "inside.png").symlink_to(root / ".store" / "x" / "0.png")
    raw = prepare.load_imagefolder(root, 8)
    assert "a/inside.png" in raw.ids and len(raw.ids) == 9
    write_image_tree(tmp_path / "elsewhere", {"y": 1}, size=8, seed=4)
    (root / "b" / "outside.png").symlink_to(tmp_path / "elsewhere" / "y" / "0.png")
    with pytest.raises(UserError, match="b/outside.png: a symlink to .* outside the dataset"):
        prepare.load_imagefolder(root, 8, on_bad_image="skip")  # a layout error, not a bad image


def test_a_root_that_is_itself_a_symlink_is_fine(tmp_path):
    real = write_image_tree(tmp_path / "real", {"a": 3, "b": 3}, size=8)
    (tmp_path / "link").symlink_to(real)
    assert len(prepare.load_imagefolder(tmp_path / "link", 8).ids) == 6


CAFE_NFC, CAFE_NFD = "caf\u00e9", "cafe\u0301"


def test_class_folders_equal_after_nfc_normalisation_are_refused(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {CAFE_NFC: 3, CAFE_NFD: 3, "tea": 3}, size=8)
    with pytest.raises(UserError) as caught:
        prepare.load_imagefolder(root, 8)
    message = str(caught.value)
    assert ascii(CAFE_NFC) in message and ascii(CAFE_NFD) in message and "NFC" in message
    assert "\n" not in message


def test_class_names_are_nfc_and_match_across_given_splits(tmp_path):
    # NFC "café" sorts after "cafez", NFD "café" before it: labels must follow names, not order
    write_image_tree(tmp_path / "ds" / "train", {CAFE_NFC: 4, "cafez": 4}, size=8, seed=1)
    write_image_tree(tmp_path / "ds" / "test", {CAFE_NFD: 2, "cafez": 2}, size=8, seed=2)
    raw = prepare.load_imagefolder(tmp_path / "ds", 8, split_mode="given")
    assert raw.class_names == ["cafez", CAFE_NFC]
    for image_id, label in zip(raw.ids, raw.labels, strict=True):
        folder = unicodedata.normalize("NFC", image_id.split("/")[1])
        assert raw.class_names[label] == folder, image_id


# --------------------------------------------------------------------------------------------
# meta.json


GOOD_META = {"class_names": ["a", "b"], "image_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}


def write_meta(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "meta.json").write_text(text)
    return folder


def test_a_good_meta_json_loads(tmp_path):
    assert data.load_meta(write_meta(tmp_path / "p", json.dumps(GOOD_META))) == GOOD_META


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("image_size", "sixteen", "image_size must be an integer (got 'sixteen')"),
        ("image_size", True, "image_size must be an integer"),
        ("image_size", 8.0, "image_size must be an integer"),
        ("image_size", 0, "image_size 0 is outside"),
        ("image_size", 10**6, "image_size 1000000 is outside"),
        ("mean", [0.5, 0.5], "mean must be 3 finite numbers"),
        ("mean", [0.5, 0.5, float("nan")], "mean must be 3 finite numbers"),
        ("mean", [0.5, 0.5, 10**400], "mean must be 3 finite numbers"),
        ("mean", "0.5", "mean must be 3 finite numbers"),
        ("std", [0, 0, 0], "std must be > 0 for every channel"),
        ("std", [0.2, -0.2, 0.2], "std must be > 0"),
        ("std", [0.2, 0.2, float("inf")], "std must be 3 finite numbers"),
        ("std", [0.2, False, 0.2], "std must be 3 finite numbers"),
        ("std", [1e-300, 1, 1], "would overflow float32"),
        ("class_names", [], "class_names must be a non-empty list"),
        ("class_names", "ab", "class_names must be a non-empty list"),
        ("class_names", ["a", ""], "class_names must be non-empty strings (got '')"),
        ("class_names", ["a", 3], "class_names must be non-empty strings (got 3)"),
        ("class_names", ["a", "b", "a"], "class_names lists 'a' more than once"),
    ],
)
def test_a_bad_meta_json_is_one_line_saying_to_re_run_prepare(tmp_path, key, value, words):
    folder = write_meta(tmp_path / "p", json.dumps({**GOOD_META, key: value}))
    with pytest.raises(UserError) as caught:
        data.load_meta(folder)
    message = str(caught.value)
    assert message.startswith(f"{folder / 'meta.json'}: prepared dataset metadata"), message
    assert words in message and "re-run the prepare stage" in message and "\n" not in message


def test_a_meta_json_integer_past_pythons_digit_limit_is_one_line(tmp_path):
    folder = write_meta(tmp_path / "p", json.dumps(GOOD_META).replace("8", "8" * 5000, 1))
    with pytest.raises(UserError, match=r"metadata is not valid JSON \(Exceeds the limit"):
        data.load_meta(folder)


def test_a_prepared_dataset_passes_the_meta_checks(tiny_prepared):
    meta = data.load_meta(tiny_prepared)
    assert meta["image_size"] == 8 and np.all(np.asarray(meta["std"]) > 0)


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"seed": ' + "1" * 5000 + "}", "is not valid JSON (Exceeds the limit"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        ("{not json", "is not valid JSON (Expecting property name"),
    ],
    ids=["5000-digit-number", "deep-nesting", "syntax"],
)
def test_every_json_reader_refuses_what_json_cannot_hold_in_one_line(tmp_path, text, words):
    from resnet_slim.io import read_json

    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(words)) as caught:
        read_json(path, what="benchmark results")
    assert "\n" not in str(caught.value)


def test_a_decoder_stopped_before_its_initializer_dies(monkeypatch):
    # A pool terminated early can SIGTERM a worker forked while the parent's recording handler
    # was installed and before the worker's initializer reset it: that worker must die, not
    # record the signal and live on (the parent then waited for it forever, a CI hang).
    import os
    import signal as signals

    from resnet_slim.data import decode

    outcome = {}

    class ForkingContext:
        def Pool(self, workers, initializer):  # noqa: N802 (multiprocessing's name)
            child = os.fork()
            if child == 0:  # the worker, still with the parent's handler
                signals.pthread_sigmask(signals.SIG_UNBLOCK, {signals.SIGTERM})
                os.kill(os.getpid(), signals.SIGTERM)
                os._exit(0)  # reached only when the signal was swallowed
            _, status = os.waitpid(child, 0)
            outcome["status"] = status
            return type("Pool", (), {"terminate": lambda self: None})()

    monkeypatch.setattr(decode.multiprocessing, "get_context", lambda method: ForkingContext())
    decode.start_decoders(1)
    assert os.WIFSIGNALED(outcome["status"])
    assert os.WTERMSIG(outcome["status"]) == signals.SIGTERM
