import numpy as np
import pytest
import torch
from PIL import Image

from resnet_slim.data import loader as data
from resnet_slim.data import pixels, prepare
from resnet_slim.errors import UserError
from tests.conftest import write_image_tree


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
