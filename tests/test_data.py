import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnet_slim.data import loader as data
from resnet_slim.data import pixels, prepare
from resnet_slim.errors import UserError
from tests.conftest import imagefolder_params, imagefolder_with, stage_main, write_image_tree


def test_digits_are_real_rgb_images_of_the_requested_size():
    raw = prepare.load_digits(16)
    assert raw.images.shape == (1797, 16, 16, 3) and raw.images.dtype == np.uint8
    assert sorted(set(raw.labels.tolist())) == list(range(10))
    assert raw.images.max() > 200  # scaled from 0..16 to 0..255


def test_imagefolder_reads_classes_in_sorted_order_and_resizes(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"cat": 3, "ant": 2}, size=20)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(root / "cat" / "gray.png")  # grayscale
    Image.new("RGBA", (9, 9)).save(root / "ant" / "alpha.png")
    raw = prepare.load_imagefolder(root, image_size=8)
    assert raw.class_names == ["ant", "cat"]
    assert raw.images.shape == (7, 8, 8, 3)
    assert raw.labels.tolist().count(1) == 4
    assert (7, 5) in raw.sizes  # original width x height recorded


def test_imagefolder_bad_file_fails_or_is_skipped_by_policy(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 2, "b": 2})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="broken.png"):
        prepare.load_imagefolder(root, image_size=8)
    raw = prepare.load_imagefolder(root, image_size=8, on_bad_image="skip")
    assert len(raw.ids) == 4 and len(raw.skipped) == 1 and "broken.png" in raw.skipped[0]


def test_imagefolder_missing_root_and_single_class_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        prepare.load_imagefolder(tmp_path / "nope", image_size=8)
    write_image_tree(tmp_path / "one", {"only": 3})
    with pytest.raises(UserError, match="need at least 2"):
        prepare.load_imagefolder(tmp_path / "one", image_size=8)


def test_cifar10_missing_files_tell_the_user_where_to_put_them(tmp_path):
    with pytest.raises(UserError, match="cifar-10-batches-py"):
        prepare.load_cifar10(tmp_path, image_size=32)


def test_duplicates_are_dropped_before_splitting(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3})
    (root / "b" / "copy.png").write_bytes((root / "a" / "0.png").read_bytes())
    raw, dropped = prepare.drop_duplicates(prepare.load_imagefolder(root, image_size=8))
    assert dropped == 1 and len(set(raw.sha256)) == len(raw.sha256) == 6


def test_split_is_stratified_seeded_and_complete():
    labels = np.repeat(np.arange(5), 40)
    split = prepare.stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=3)
    again = prepare.stratified_split(labels, val_fraction=0.2, test_fraction=0.2, seed=3)
    assert (split == again).all()
    for name in pixels.SPLITS:
        counts = np.bincount(labels[split == name], minlength=5)
        assert counts.min() == counts.max() > 0
    assert (split == "train").sum() == 120


def test_prepared_dataset_round_trip(tiny_prepared):
    meta = data.load_meta(tiny_prepared)
    manifest = data.load_manifest(tiny_prepared)
    assert list(manifest.columns) == [
        "id",
        "split",
        "label",
        "class_name",
        "sha256",
        "width",
        "height",
    ]
    total = sum(len(data.load_split(tiny_prepared, s).labels) for s in pixels.SPLITS)
    assert total == len(manifest) == 400
    images, labels = data.normalized_split(tiny_prepared, "train")
    assert images.dtype == torch.float32 and images.shape[1:] == (3, 8, 8)
    assert abs(images.mean().item()) < 0.05  # standardised with the train mean / std
    assert meta["class_names"] == [str(d) for d in range(10)]


def test_augment_batch_translates_within_padding_and_is_seeded():
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    images[:, :, 3, 3] = 255
    out = data.augment_batch(
        images, crop_padding=2, hflip=False, generator=torch.Generator().manual_seed(0)
    )
    again = data.augment_batch(
        images, crop_padding=2, hflip=False, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(out, again) and out.shape == images.shape
    for image in out:
        ys, xs = torch.nonzero(image[0], as_tuple=True)
        assert len(ys) == 1 and abs(ys.item() - 3) <= 2 and abs(xs.item() - 3) <= 2


def test_batch_loader_covers_every_image_once_per_epoch(tiny_prepared):
    split = data.load_split(tiny_prepared, "train")
    loader = data.BatchLoader(
        split.images, split.labels, meta=data.load_meta(tiny_prepared), batch_size=64, shuffle=True
    )
    seen = torch.cat([labels for _, labels in loader])
    assert len(loader) == 4 and sorted(seen.tolist()) == sorted(split.labels.tolist())


# --------------------------------------------------------------------------------------------
# bad image files, imagefolder layouts and damaged prepared datasets


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "a/broken.png",
            b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
            "a/broken.png: UnidentifiedImageError: not a recognised image",
        ),
        ("a/notes.txt", b"not an image", "a/notes.txt: ValueError: not an image file type (.txt)"),
        ("a/empty.png", b"", "a/empty.png: ValueError: empty file"),
        ("b/README", b"hello", "b/README: ValueError: not an image file type (no suffix)"),
    ],
    ids=["corrupt", "not-an-image-type", "zero-bytes", "no-suffix"],
)
def test_bad_image_files_fail_naming_the_file(tmp_path, name, content, message):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=8)
    (root / name).write_bytes(content)
    with pytest.raises(
        UserError, match=f"bad image {message.replace('(', '[(]').replace(')', '[)]')}"
    ):
        prepare.load_imagefolder(root, 8)


def _save_mode(path: Path, mode: str) -> None:
    gradient = np.linspace(0, 1, 64).reshape(8, 8)
    if mode == "I;16":
        Image.fromarray((gradient * 4000).astype(np.uint16)).save(path)  # 16-bit PNG
    elif mode == "F":
        Image.fromarray(gradient.astype(np.float32)).save(path)  # float TIFF in [0, 1]
    else:
        Image.fromarray((gradient * 255).astype(np.uint8)).convert(mode).save(path)


@pytest.mark.parametrize(
    "mode, suffix",
    [
        ("L", "png"),
        ("LA", "png"),
        ("RGBA", "png"),
        ("P", "png"),
        ("1", "png"),
        ("I;16", "png"),
        ("F", "tif"),
        ("CMYK", "jpg"),
    ],
)
def test_unusual_image_modes_are_accepted_and_converted(tmp_path, mode, suffix):
    root = write_image_tree(tmp_path / "imgs", {"a": 2, "b": 2}, size=8)
    _save_mode(root / "a" / f"odd.{suffix}", mode)
    with Image.open(root / "a" / f"odd.{suffix}") as image:
        assert image.mode == mode
    raw = prepare.load_imagefolder(root, 8)
    odd = raw.images[raw.ids.index(f"a/odd.{suffix}")]
    assert raw.images.shape == (5, 8, 8, 3) and raw.images.dtype == np.uint8 and not raw.skipped
    if mode not in ("1", "CMYK"):  # a gradient, scaled to 8 bits: not clipped to black or white
        assert odd.max() >= 200 and odd.min() <= 30 and len(np.unique(odd)) > 8


def test_empty_class_directory_is_an_error(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=8)
    (root / "c").mkdir()
    with pytest.raises(UserError, match="class 'c' has no readable images"):
        prepare.load_imagefolder(root, 8)


def test_class_of_only_bad_files_is_an_error_even_when_skipping(tmp_path):
    root = write_image_tree(tmp_path / "imgs", {"a": 3}, size=8)
    (root / "b").mkdir()
    (root / "b" / "x.png").write_bytes(b"junk")
    with pytest.raises(UserError, match="class 'b' has no readable images"):
        prepare.load_imagefolder(root, 8, on_bad_image="skip")


@pytest.mark.parametrize(
    "layout, message",
    [
        ("single_class", "found 1 class directories; need at least 2"),
        ("missing", "imagefolder root not found"),
        ("a_file", "imagefolder root not found"),
    ],
    ids=["single-class", "missing", "a-file"],
)
def test_imagefolder_root_problems(tmp_path, layout, message):
    root = tmp_path / "imgs"
    if layout == "single_class":
        write_image_tree(root, {"only": 4}, size=8)
    elif layout == "a_file":
        root.write_text("not a directory")
    with pytest.raises(UserError, match=message):
        prepare.load_imagefolder(root, 8)


def test_unreadable_image_file(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "imgs", {"a": 3, "b": 3}, size=8)
    locked = root / "a" / "0.png"
    if os.geteuid() != 0:
        locked.chmod(0)
    else:  # root reads any file whatever its mode: make reading it fail the way it would
        real_read = Path.read_bytes

        def read_bytes(self):
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real_read(self)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
    try:
        with pytest.raises(UserError, match="bad image a/0.png: PermissionError"):
            prepare.load_imagefolder(root, 8)
        raw = prepare.load_imagefolder(root, 8, on_bad_image="skip")
        assert len(raw.ids) == 5 and "PermissionError" in raw.skipped[0]
    finally:
        locked.chmod(0o644)


def test_unreadable_root_directory(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "imgs", {"a": 2, "b": 2}, size=8)
    if os.geteuid() != 0:
        root.chmod(0o300)  # may enter, may not list
    else:

        def iterdir(self):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "iterdir", iterdir)
    try:
        with pytest.raises(UserError, match="cannot list the folder .Permission denied"):
            prepare.load_imagefolder(root, 8)
    finally:
        root.chmod(0o755)


def test_decompression_bomb_is_a_bad_image(tmp_path, monkeypatch):
    root = write_image_tree(tmp_path / "imgs", {"a": 2, "b": 2}, size=8)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(root / "a" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 > 2x the limit: PIL refuses it
    with pytest.raises(UserError, match="bad image a/huge.png: DecompressionBombError"):
        prepare.load_imagefolder(root, 8)


def test_bad_file_names_are_skipped_and_recorded_escaped(tmp_path):
    root = imagefolder_with(tmp_path, b"two\nlines\xff.png")
    raw = prepare.load_imagefolder(root, 8, on_bad_image="skip")
    assert len(raw.ids) == 11 and all(name.isprintable() for name in raw.ids)
    assert raw.skipped == [
        "a/two\\nlines\\xff.png: ValueError: its name is not valid UTF-8; rename it"
    ]


def test_skip_policy_and_duplicates_are_counted_in_meta_and_validation_report(tmp_path, capsys):
    root = write_image_tree(tmp_path / "imgs", {"a": 8, "b": 8, "c": 8}, size=8)
    (root / "a" / "broken.png").write_bytes(b"junk")
    (root / "b" / "notes.txt").write_text("x")
    (root / "c" / "copy_of_a0.png").write_bytes((root / "a" / "0.png").read_bytes())
    params = imagefolder_params(tmp_path / "params.yaml", root, on_bad_image="skip")
    stage_main("prepare")(["--params", str(params), "--out", str(tmp_path / "prepared")])
    assert "1 image(s) filed under more than one class" in capsys.readouterr().out
    meta = data.load_meta(tmp_path / "prepared")
    assert len(meta["skipped_images"]) == 2 and meta["duplicates_dropped"] == 1
    assert meta["duplicate_label_conflicts"] == ["a/0.png = c/copy_of_a0.png"]
    assert len(data.load_manifest(tmp_path / "prepared")) == 24  # the copy in c/ is gone
    stage_main("validate_data")(
        [
            "--params",
            str(params),
            "--data",
            str(tmp_path / "prepared"),
            "--report",
            str(tmp_path / "dv.json"),
        ]
    )
    report = json.loads((tmp_path / "dv.json").read_text())
    assert report["success"] and len(report["skipped_images"]) == 2
    assert len(report["duplicate_label_conflicts"]) == 1


def test_cifar10_with_incomplete_files(tmp_path):
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"truncated download")
    with pytest.raises(UserError, match="CIFAR-10 not found or incomplete"):
        prepare.load_cifar10(tmp_path / "cifar", 8)


def _validate(prepared: Path) -> dict:
    from resnet_slim.data.validate import validate_manifest

    return validate_manifest(
        data.load_manifest(prepared), ["0"], min_class_share=0.0, max_class_share=1.0
    )


@pytest.mark.parametrize(
    "damage, call, message",
    [
        (
            "train_images.npy:junk",
            lambda d: data.load_split(d, "train"),
            "train: prepared split is corrupt",
        ),
        ("meta.json:[1, 2]", data.load_meta, "metadata lacks \\['class_names'"),
        ("meta.json:{not json", data.load_meta, "metadata is not valid JSON"),
        ("manifest.csv:", data.load_manifest, "manifest.csv: manifest is not a readable CSV"),
        (
            "manifest.csv:id,split\nx,train\n",
            lambda d: _validate(d),
            "manifest lacks column\\(s\\) \\['label'",
        ),
    ],
    ids=["npz", "meta-list", "meta-json", "manifest-empty", "manifest-columns"],
)
def test_damaged_prepared_dataset(prepared_copy, damage, call, message):
    name, _, content = damage.partition(":")
    (prepared_copy / name).write_text(content)
    with pytest.raises(UserError, match=message):
        call(prepared_copy)
