"""Dataset preparation: read a source, drop duplicates, split, write a prepared directory.

The sources (`digits`, `imagefolder`, `cifar10`) are read by resnet_slim/data/sources.py, an
imagefolder's files decoded by a pool of worker processes straight into a staging file on disk
(resnet_slim/data/decode.py), never into Python lists, so a dataset larger than RAM can be
prepared. Each split is then written as `<split>_images.npy` (uint8 N x S x S x 3, which
`data.load_split` memory-maps) and `<split>_labels.npy` (int64), beside `manifest.csv` (one row
per image) and `meta.json`.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from resnet_slim.data.pixels import IMAGES_FILE, LABELS_FILE, SPLITS, release_pages
from resnet_slim.data.sources import RawDataset, load_cifar10, load_digits, load_imagefolder
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path, write_json
from resnet_slim.limits import usable_cores

# ImageNet statistics of [0, 1] RGB pixels: what torchvision's and most published CIFAR models were
# trained with (prepare.normalize: imagenet), so an imported model sees the inputs it expects
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHUNK_BYTES = 64 << 20  # rows copied per write, and pages read before they are released


def select(raw: RawDataset, keep: np.ndarray) -> RawDataset:
    """The images at indices `keep`, in that order (no pixels are copied)."""
    pick = lambda values: [values[i] for i in keep]  # noqa: E731
    return RawDataset(
        pixels=raw.pixels,
        rows=raw.rows[keep],
        labels=raw.labels[keep],
        class_names=raw.class_names,
        ids=pick(raw.ids),
        sha256=pick(raw.sha256),
        sizes=pick(raw.sizes),
        skipped=raw.skipped,
        given_split=None if raw.given_split is None else raw.given_split[keep],
    )


def duplicate_groups(raw: RawDataset) -> list[list[int]]:
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(raw.sha256):
        groups.setdefault(digest, []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def label_conflicts(raw: RawDataset) -> list[str]:
    """Byte-identical images filed under different classes ("a/1.png = b/7.png"), for the user
    to fix.

    drop_duplicates keeps the first copy (the first class), which may be the wrong label.
    """
    return [
        " = ".join(raw.ids[i] for i in group)
        for group in duplicate_groups(raw)
        if len({int(raw.labels[i]) for i in group}) > 1
    ]


def check_no_leak_across_given_splits(raw: RawDataset) -> None:
    """A byte-identical image in two given splits (say train/ and test/) is a leak the dataset
    came with: dropping one copy would silently change a published split, so it is an error."""
    if raw.given_split is None:
        return
    leaks = [
        " = ".join(raw.ids[i] for i in group)
        for group in duplicate_groups(raw)
        if len({raw.given_split[i] for i in group}) > 1
    ]
    if leaks:
        raise UserError(
            f"{len(leaks)} image(s) appear in more than one given split (a leak): "
            f"{'; '.join(leaks[:3])}; remove the copies from one split"
        )


def drop_duplicates(raw: RawDataset) -> tuple[RawDataset, int]:
    """Keep the first copy of byte-identical images, so no image can land in two splits."""
    _, first = np.unique(np.asarray(raw.sha256), return_index=True)
    keep = np.sort(first)
    return select(raw, keep), len(raw.ids) - len(keep)


def subsample_per_class(raw: RawDataset, max_per_class: int, seed: int) -> RawDataset:
    """At most `max_per_class` images per class (per given split, if the source has them)."""
    rng = np.random.default_rng(seed)
    groups = [None] if raw.given_split is None else sorted(set(raw.given_split))
    keep = []
    for group in groups:
        in_group = np.ones(len(raw.labels), bool) if group is None else raw.given_split == group
        keep += [
            rng.permutation(np.flatnonzero(in_group & (raw.labels == c)))[:max_per_class]
            for c in range(len(raw.class_names))
        ]
    return select(raw, np.sort(np.concatenate(keep)))


def _stratified(index: np.ndarray, labels: np.ndarray, share: float, seed: int):
    try:
        return train_test_split(index, test_size=share, stratify=labels[index], random_state=seed)
    except ValueError as err:
        counts = np.bincount(labels[index]) if len(index) else np.zeros(1, dtype=int)
        raise UserError(
            f"cannot split {len(index)} images with every class in every split "
            f"(smallest class: {counts.min()} image(s); add images or drop that "
            f"class): {err}"
        ) from None


def stratified_split(
    labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> np.ndarray:
    """Assign each index to train/val/test, keeping class proportions in every split."""
    rest, test = _stratified(np.arange(len(labels)), labels, test_fraction, seed)
    train, val = _stratified(rest, labels, val_fraction / (1.0 - test_fraction), seed)
    split = np.empty(len(labels), dtype=object)
    split[train], split[val], split[test] = "train", "val", "test"
    return split


def given_split(raw: RawDataset, *, val_fraction: float, seed: int) -> np.ndarray:
    """The source's own splits; without a given val/, a stratified `val_fraction` of train."""
    split = raw.given_split.copy()
    if not (split == "val").any():
        train, val = _stratified(np.flatnonzero(split == "train"), raw.labels, val_fraction, seed)
        split[val] = "val"
    return split


def normalization_stats(normalize, pixels: np.ndarray, rows: np.ndarray | None = None) -> dict:
    """meta.json's {mean, std, normalization} for `prepare.normalize`.

    dataset: per-channel statistics of `pixels[rows]`, the training split (two passes over chunks
    of rows, so a large split is never held as floats); imagenet: IMAGENET_MEAN/STD; or given
    {mean, std} (3 values each, std > 0). Every stage, ONNX evaluation, the benchmark and the web
    UI read them from meta.json through `data.normalize`, so the choice made here reaches all of
    them.
    """
    if normalize == "dataset":
        rows = np.arange(len(pixels)) if rows is None else rows
        count = len(rows) * pixels.shape[1] * pixels.shape[2]

        def chunks():  # a fresh generator per pass
            return (
                pixels[chunk].astype(np.float64) / 255.0
                for chunk in row_chunks(pixels, rows, CHUNK_BYTES // 16)
            )

        mean = sum(c.sum(axis=(0, 1, 2)) for c in chunks()) / count
        var = sum(((c - mean) ** 2).sum(axis=(0, 1, 2)) for c in chunks()) / count
        return {
            "mean": mean.round(6).tolist(),
            "std": np.sqrt(var).clip(1e-3).round(6).tolist(),
            "normalization": "dataset",
        }
    if normalize == "imagenet":
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "normalization": "imagenet"}
    given = normalize if isinstance(normalize, dict) else getattr(normalize, "__dict__", {})
    try:  # a {mean, std} mapping or params.NormalizeStats
        mean, std = (np.asarray(given[key], dtype=np.float64) for key in ("mean", "std"))
        valid = mean.shape == std.shape == (3,) and np.isfinite([mean, std]).all() and std.min() > 0
    except (KeyError, TypeError, ValueError):
        valid = False
    if not valid:
        raise UserError(
            f"prepare.normalize must be dataset, imagenet or {{mean: [r, g, b], std: "
            f"[r, g, b]}} with std > 0; got {normalize!r}"
        )
    return {"mean": mean.tolist(), "std": std.tolist(), "normalization": "custom"}


def row_chunks(pixels: np.ndarray, rows: np.ndarray, chunk_bytes: int = CHUNK_BYTES):
    """`rows` in pieces of about `chunk_bytes` of pixels; mapped pages are released after each
    piece, so reading a split of any size keeps the resident set small."""
    step = max(1, chunk_bytes // max(1, pixels[0].nbytes if len(pixels) else 1))
    for start in range(0, len(rows), step):
        yield rows[start : start + step]
        release_pages(pixels)


def write_npy(path: Path, pixels: np.ndarray, rows: np.ndarray) -> None:
    """`pixels[rows]` as a .npy file, written a chunk at a time (no whole-split copy in memory)."""
    header = {
        "descr": np.lib.format.dtype_to_descr(pixels.dtype),
        "fortran_order": False,
        "shape": (len(rows), *pixels.shape[1:]),
    }
    with open(path, "wb") as file:
        np.lib.format.write_array_header_2_0(file, header)
        for chunk in row_chunks(pixels, rows):
            file.write(np.ascontiguousarray(pixels[chunk]).tobytes())


def write_prepared(
    out_dir: str | Path, raw: RawDataset, split: np.ndarray, extra_meta: dict, normalize="dataset"
) -> None:
    """Write the prepared dataset directory atomically (`normalize`: see normalization_stats)."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_prepared_into(tmp, raw, split, extra_meta, normalize)


def write_prepared_into(
    folder: Path, raw: RawDataset, split: np.ndarray, extra_meta: dict, normalize="dataset"
) -> None:
    meta = {
        "class_names": raw.class_names,
        "image_size": int(raw.pixels.shape[1]),
        **normalization_stats(normalize, raw.pixels, raw.rows[split == "train"]),
        "counts": {s: int((split == s).sum()) for s in SPLITS},
        "skipped_images": raw.skipped,
        **extra_meta,
    }
    manifest = pd.DataFrame(
        {
            "id": raw.ids,
            "split": split,
            "label": raw.labels,
            "class_name": [raw.class_names[label] for label in raw.labels],
            "sha256": raw.sha256,
            "width": [w for w, _ in raw.sizes],
            "height": [h for _, h in raw.sizes],
        }
    )
    for name in SPLITS:
        mask = split == name
        write_npy(folder / IMAGES_FILE.format(split=name), raw.pixels, raw.rows[mask])
        np.save(folder / LABELS_FILE.format(split=name), raw.labels[mask])
    manifest.to_csv(folder / "manifest.csv", index=False)
    write_json(folder / "meta.json", meta)


def read_source(p, *, staging: Path, workers: int | None) -> RawDataset:
    """The images of the source `p` (params.PrepareParams) names; an imagefolder's pixels go to
    `staging` (a file in the output folder being written), decoded by `workers` processes."""
    root = None if p.root is None else Path(p.root)
    if p.source == "digits":
        if p.split == "given":
            raise UserError(
                "prepare.split: given, but the digits source has no given "
                "splits; use auto or random"
            )
        return load_digits(p.image_size, root)
    if root is None:
        raise UserError(f"prepare.root: source '{p.source}' needs a root directory")
    if p.source == "imagefolder":
        return load_imagefolder(
            root,
            p.image_size,
            on_bad_image=p.on_bad_image,
            split_mode=p.split,
            staging=staging,
            workers=workers or usable_cores(),
            max_file_mb=p.max_file_mb,
        )
    return load_cifar10(root, p.image_size, split_mode=p.split)


def assign_splits(raw: RawDataset, p, *, seed: int) -> np.ndarray:
    """train/val/test per image: the source's given splits, or a stratified random split."""
    if raw.given_split is not None:
        return given_split(raw, val_fraction=p.val_fraction, seed=seed)
    return stratified_split(
        raw.labels, val_fraction=p.val_fraction, test_fraction=p.test_fraction, seed=seed
    )


def prepare_dataset(p, *, seed: int, out_dir: str | Path, workers: int | None = None) -> dict:
    """The prepare stage: `p` is params.PrepareParams. Returns a summary for the stage's log."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        raw = read_source(p, staging=tmp / "staging.u8", workers=workers)
        if p.split == "random":
            raw.given_split = None  # re-split everything at random, whatever the layout
        conflicts = label_conflicts(raw)  # same bytes, different classes: the label is a guess
        check_no_leak_across_given_splits(raw)
        raw, n_duplicates = drop_duplicates(raw)
        if p.max_images_per_class is not None:
            raw = subsample_per_class(raw, p.max_images_per_class, seed=seed)
        split = assign_splits(raw, p, seed=seed)
        write_prepared_into(
            tmp,
            raw,
            split,
            extra_meta={
                "source": p.source,
                "root": p.root,
                "split": "given" if raw.given_split is not None else "random",
                "duplicates_dropped": n_duplicates,
                "duplicate_label_conflicts": conflicts,
            },
            normalize=p.normalize,
        )
        (tmp / "staging.u8").unlink(missing_ok=True)
    return {
        "images": len(raw.labels),
        "classes": len(raw.class_names),
        "split": "given" if raw.given_split is not None else "random",
        "counts": {s: int((split == s).sum()) for s in SPLITS},
        "duplicates": n_duplicates,
        "skipped": len(raw.skipped),
        "conflicts": conflicts,
    }
