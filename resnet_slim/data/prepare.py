"""Dataset preparation: read a source, drop duplicates, split, write a prepared directory.

Sources: `digits` (`root/digits.csv.gz`, the embedded offline default), `imagefolder`
(`root/<class>/<image>`, or given splits `root/train/<class>/`, `root/test/<class>/` and optionally
`root/val/<class>/`), `cifar10` (torchvision's python-format batches, never downloaded; its
official test batch is a given split).

Images are decoded by a pool of worker processes straight into a staging file on disk, never into
Python lists, so a dataset larger than RAM can be prepared. Each split is then written as
`<split>_images.npy` (uint8 N x S x S x 3, which `data.load_split` memory-maps) and
`<split>_labels.npy` (int64), beside `manifest.csv` (one row per image) and `meta.json`.
"""

import gzip
import hashlib
import io
import itertools
import multiprocessing
import os
import signal
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from resnet_slim.data.pixels import (
    IMAGES_FILE,
    LABELS_FILE,
    SPLITS,
    map_pixels,
    release_pages,
    to_rgb_array,
)
from resnet_slim.errors import UserError
from resnet_slim.io import atomic_path, write_json
from resnet_slim.limits import usable_cores

# ImageNet statistics of [0, 1] RGB pixels: what torchvision's and most published CIFAR models were
# trained with (prepare.normalize: imagenet), so an imported model sees the inputs it expects
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
CHUNK_BYTES = 64 << 20  # rows copied per write, and pages read before they are released


@dataclass
class RawDataset:
    """The images of a source, before splitting. Pixels stay where they were decoded to (an
    array, or a memory map of the staging file); `rows` picks this dataset's images from them, so
    selecting a subset never copies pixels."""

    pixels: np.ndarray  # uint8, M x S x S x 3
    rows: np.ndarray  # int64, N indices into pixels
    labels: np.ndarray  # int64, N
    class_names: list[str]
    ids: list[str]  # where each image came from
    sha256: list[str]  # of the source bytes: finds duplicates and leaks across splits
    sizes: list[tuple[int, int]]  # original (width, height)
    skipped: list[str]  # files left out under on_bad_image=skip, with the reason
    given_split: np.ndarray | None = None  # "train" / "val" / "test" per image, if the source has

    @property
    def images(self) -> np.ndarray:
        """The dataset's pixels as one array in memory (for small data and tests)."""
        return self.pixels[self.rows]


def load_digits(image_size: int, root: Path | None = None) -> RawDataset:
    """`root/digits.csv.gz` (scikit-learn's copy: 64 pixels of 0..16 and the label per row), or
    scikit-learn's own copy when `root` is None."""
    if root is None:
        from sklearn.datasets import load_digits as sklearn_digits

        digits = sklearn_digits()
        gray_levels, targets = digits.images, digits.target
    else:
        path = root / "digits.csv.gz"
        try:
            with gzip.open(path, "rt") as file:
                table = np.loadtxt(file, delimiter=",")
            gray_levels, targets = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
        except (OSError, ValueError, EOFError) as err:
            raise UserError(
                f"{path}: cannot read the digits table ({err.__class__.__name__}: "
                f"{err}); restore it from git"
            ) from None
    gray = (gray_levels * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 levels -> 0..255
    pixels = np.stack([to_rgb_array(Image.fromarray(g), image_size) for g in gray])
    return RawDataset(
        pixels=pixels,
        rows=np.arange(len(gray)),
        labels=targets.astype(np.int64),
        class_names=[str(d) for d in range(10)],
        ids=[f"digits/{i}" for i in range(len(gray))],
        sha256=[hashlib.sha256(g.tobytes()).hexdigest() for g in gray],
        sizes=[(8, 8)] * len(gray),
        skipped=[],
    )


def printable_name(name: str) -> str:
    """A file name as one printable line: undecodable bytes as \\xff, control characters as \\n."""
    text = os.fsencode(name).decode("utf-8", "backslashreplace")
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def name_problem(name: str) -> str | None:
    """Why a file or class name cannot go into manifest.csv, meta.json and the web UI, or None."""
    try:
        name.encode("utf-8")  # Python decodes undecodable bytes of a name as lone surrogates
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "its name contains a control character (newline, tab, ...)"
    return None


def class_name(directory: Path) -> str:
    """A class folder's name as a class: NFC-normalised Unicode, so "café" is one class whether
    the file system wrote its "é" as one character (NFC, Linux, Windows) or as "e" plus a combining
    accent (NFD, a folder copied from macOS)."""
    return unicodedata.normalize("NFC", directory.name)


def class_directories(folder: Path) -> list[Path]:
    """The class folders in `folder`, in the order of their (NFC) class names."""
    try:
        dirs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError as err:  # e.g. no read permission
        raise UserError(f"{folder}: cannot list the folder ({err.strerror or err})") from None
    for class_dir in dirs:
        if problem := name_problem(class_dir.name):
            raise UserError(
                f"{folder}: class directory '{printable_name(class_dir.name)}': "
                f"{problem}; rename it (class names go into meta.json and the web UI)"
            )
    dirs.sort(key=lambda d: (class_name(d), d.name))
    for first, second in itertools.pairwise(dirs):
        if class_name(first) == class_name(second):
            raise UserError(
                f"{folder}: class folders {ascii(first.name)} and {ascii(second.name)} are the "
                f"same name written two ways (Unicode NFC vs NFD: an accent as its own "
                f"character); merge or rename them"
            )
    return dirs


def check_inside_root(path: Path, root: Path, real_root: Path) -> None:
    """Refuse a symlink under `root` that leads outside it (`real_root`: root, resolved).

    DVC tracks prepare.root as the stage's dependency: it hashes what lies inside, so a file
    reached through a link to elsewhere could change without making prepare out of date, and
    the prepared data would silently stop matching dvc.lock.
    """
    if not path.is_symlink():
        return
    target = path.resolve()
    if not target.is_relative_to(real_root):
        raise UserError(
            f"{path}: a symlink to {target}, outside the dataset root {root} (DVC tracks only "
            f"what lies inside prepare.root, so changes there would not re-run prepare); copy "
            f"it into the root instead"
        )


def given_split_folders(root: Path, split_mode: str) -> dict[str, Path] | None:
    """{split: folder} when `root` holds given splits (train/ and test/, val/ optional) and
    `split_mode` keeps them; None for a flat `root/<class>/` folder."""
    present = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in present or "test" not in present:
        if split_mode == "given":
            raise UserError(
                f"{root}: prepare.split: given needs {root}/train/<class>/ and "
                f"{root}/test/<class>/; found "
                f"{sorted(p.name for p in class_directories(root)) or 'no folders'} "
                f"(use prepare.split: random for a flat <class>/ folder)"
            )
        return None
    others = [d.name for d in class_directories(root) if d.name not in SPLITS]
    if others:
        raise UserError(
            f"{root}: holds given splits (train/, test/) and also {others}; move "
            f"those folders out (or use prepare.split: random on a flat folder)"
        )
    return present


def _too_large(size: int, max_bytes: int) -> str:
    return (
        f"{size / 1e6:.6g} MB, over prepare.max_file_mb ({max_bytes / 1e6:.6g} MB); raise "
        f"the cap if the file is an image"
    )


def _decode_file(task: tuple[str, str, int, int]) -> tuple:
    """(id, error or None, pixels, sha256, (width, height)) of one image file; runs in a worker.

    A file over `max_bytes` is a bad image, refused from its size before a byte is read (each
    worker holds a whole file in memory: a 3 GB disk image would take 3 GB of RAM)."""
    path, rel, image_size, max_bytes = task
    try:
        if problem := name_problem(rel):
            rel = printable_name(rel)
            raise ValueError(f"{problem}; rename it")
        if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"not an image file type ({Path(path).suffix or 'no suffix'})")
        if (size := os.stat(path).st_size) > max_bytes:
            raise ValueError(_too_large(size, max_bytes))
        data = Path(path).read_bytes()
        if len(data) > max_bytes:  # grown since the stat
            raise ValueError(_too_large(len(data), max_bytes))
        if not data:
            raise ValueError("empty file")
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return (
                rel,
                None,
                to_rgb_array(image, image_size),
                hashlib.sha256(data).hexdigest(),
                image.size,
            )
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        detail = (
            "not a recognised image format (corrupt, or not an image)"
            if isinstance(err, UnidentifiedImageError)
            else str(err)
        )
        return rel, f"{rel}: {err.__class__.__name__}: {detail}", None, None, None


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _worker_signals() -> None:
    # the parent turns SIGTERM into a clean abort and then terminates the pool: workers must just
    # die on SIGTERM (the inherited handler needs a watcher thread a forked child does not have)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def start_decoders(workers: int):
    """A pool of `workers` forked decoding processes.

    A stop signal that lands inside fork() would run the stage's handler in one of Python's
    at-fork hooks, which drops its KeyboardInterrupt: the stop would be lost. So while forking,
    stop signals are only recorded, and re-sent to the stage's own handler once the pool exists.
    """
    received = []
    handlers = {
        number: signal.signal(number, lambda number, _: received.append(number))
        for number in STOP_SIGNALS
    }
    try:  # fork: the workers need nothing but this module, already imported
        pool = multiprocessing.get_context("fork").Pool(
            max(1, workers), initializer=_worker_signals
        )
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    if received:
        pool.terminate()
        signal.raise_signal(received[0])
    return pool


def load_imagefolder(
    root: Path,
    image_size: int,
    on_bad_image: str = "fail",
    *,
    split_mode: str = "auto",
    staging: Path | None = None,
    workers: int = 1,
    max_file_mb: float = 50.0,
) -> RawDataset:
    """Decode every image under `root` (flat `<class>/` or given splits, see given_split_folders).

    With `staging`, pixels are appended to that file as they are decoded and come back as a
    read-only memory map; without it, they are held in memory (small data, tests). A file over
    `max_file_mb` (MB, 10^6 bytes) is a bad image. A split folder, class folder or file that is
    a symlink to somewhere outside `root` is an error (see check_inside_root).
    """
    if not root.is_dir():
        raise UserError(f"{root}: imagefolder root not found (expected {root}/<class>/<image>)")
    real_root = root.resolve()
    max_bytes = int(max_file_mb * 1e6)
    folders = given_split_folders(root, split_mode) or {None: root}
    for folder in folders.values():
        check_inside_root(folder, root, real_root)
    classes = {split: class_directories(folder) for split, folder in folders.items()}
    for dirs in classes.values():
        for class_dir in dirs:
            check_inside_root(class_dir, root, real_root)
    class_names = [class_name(d) for d in classes.get("train", classes.get(None))]
    if len(class_names) < 2:
        raise UserError(f"{root}: found {len(class_names)} class directories; need at least 2")
    for split, dirs in classes.items():
        names = [class_name(d) for d in dirs]
        if missing := sorted(set(class_names) - set(names)):
            raise UserError(
                f"{folders[split]}: class(es) {missing} missing from this split "
                f"(every given split needs the classes of train/)"
            )
        if extra := sorted(set(names) - set(class_names)):
            raise UserError(
                f"{folders[split]}: class(es) {extra} are not in train/; every split "
                f"needs the same class folders"
            )
    tasks, task_labels, task_splits = [], [], []
    for split, dirs in classes.items():
        for class_dir in dirs:
            label = class_names.index(class_name(class_dir))  # by name: splits may sort apart
            # rglob does not descend into symlinked folders; a symlinked file is checked here
            files = sorted(
                p for p in class_dir.rglob("*") if p.is_file() and not p.name.startswith(".")
            )
            for f in files:
                check_inside_root(f, root, real_root)
            tasks += [
                (str(f), f.relative_to(root).as_posix(), image_size, max_bytes) for f in files
            ]
            task_labels += [label] * len(files)
            task_splits += [split] * len(files)
        if split is not None and not any(s == split for s in task_splits):
            raise UserError(f"{folders[split]}: empty split (no files in its class folders)")

    row_bytes = image_size * image_size * 3
    kept: list[int] = []
    ids, hashes, sizes, skipped, in_memory = [], [], [], [], []
    out = open(staging, "wb") if staging is not None else None
    try:
        with start_decoders(workers) as pool:
            for index, (rel, error, pixels, digest, size) in enumerate(
                pool.imap(_decode_file, tasks, chunksize=64)
            ):
                if error is not None:
                    if on_bad_image == "fail":
                        raise UserError(
                            f"bad image {error} (set prepare.on_bad_image: skip to "
                            f"leave such files out)"
                        )
                    skipped.append(error)
                    continue
                if out is not None:
                    out.write(pixels.tobytes())
                else:
                    in_memory.append(pixels)
                kept.append(index)
                ids.append(rel)
                hashes.append(digest)
                sizes.append(size)
    finally:
        if out is not None:
            out.close()
    labels = np.asarray(task_labels, dtype=np.int64)[kept]
    for split, dirs in classes.items():
        in_split = np.asarray(task_splits, dtype=object)[kept] == split
        for class_dir in dirs:
            if not (labels[in_split] == class_names.index(class_name(class_dir))).any():
                raise UserError(f"{class_dir}: class '{class_dir.name}' has no readable images")
    shape = (len(kept), image_size, image_size, 3)
    pixels = (
        map_pixels(staging, shape, offset=0)
        if staging is not None
        else np.stack(in_memory)
        if in_memory
        else np.zeros(shape, np.uint8)
    )
    assert len(kept) * row_bytes == pixels.nbytes
    given = None if None in folders else np.asarray(task_splits, dtype=object)[kept]
    return RawDataset(
        pixels=pixels,
        rows=np.arange(len(kept)),
        labels=labels,
        class_names=class_names,
        ids=ids,
        sha256=hashes,
        sizes=sizes,
        skipped=skipped,
        given_split=given,
    )


def load_cifar10(root: Path, image_size: int, split_mode: str = "auto") -> RawDataset:
    """torchvision's python batches: the 50,000 training and the official 10,000 test images."""
    if split_mode == "given" or split_mode == "auto":
        split_mode = "given"  # the official test batch always exists
    from torchvision.datasets import CIFAR10

    parts = []
    for train in (True, False):
        try:
            parts.append(CIFAR10(str(root), train=train, download=False))
        except RuntimeError:
            raise UserError(
                f"{root}: CIFAR-10 not found or incomplete. Download cifar-10-python.tar.gz from "
                f"https://www.cs.toronto.edu/~kriz/cifar.html and extract it so that "
                f"{root}/cifar-10-batches-py/ exists (this tool never downloads)"
            ) from None
    raw = np.concatenate([p.data for p in parts])
    pixels = np.stack([to_rgb_array(Image.fromarray(a), image_size) for a in raw])
    labels = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    split_names = ["train"] * len(parts[0].data) + ["test"] * len(parts[1].data)
    return RawDataset(
        pixels=pixels,
        rows=np.arange(len(raw)),
        labels=labels,
        class_names=list(parts[0].classes),
        ids=[f"cifar10/{s}/{i}" for i, s in enumerate(split_names)],
        sha256=[hashlib.sha256(a.tobytes()).hexdigest() for a in raw],
        sizes=[(32, 32)] * len(raw),
        skipped=[],
        given_split=np.asarray(split_names, dtype=object) if split_mode == "given" else None,
    )


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


def prepare_dataset(p, *, seed: int, out_dir: str | Path, workers: int | None = None) -> dict:
    """The prepare stage: `p` is params.PrepareParams. Returns a summary for the stage's log."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        root = None if p.root is None else Path(p.root)
        if p.source == "digits":
            if p.split == "given":
                raise UserError(
                    "prepare.split: given, but the digits source has no given "
                    "splits; use auto or random"
                )
            raw = load_digits(p.image_size, root)
        elif root is None:
            raise UserError(f"prepare.root: source '{p.source}' needs a root directory")
        elif p.source == "imagefolder":
            raw = load_imagefolder(
                root,
                p.image_size,
                on_bad_image=p.on_bad_image,
                split_mode=p.split,
                staging=tmp / "staging.u8",
                workers=workers or usable_cores(),
                max_file_mb=p.max_file_mb,
            )
        else:
            raw = load_cifar10(root, p.image_size, split_mode=p.split)
        if p.split == "random":
            raw.given_split = None  # re-split everything at random, whatever the layout
        conflicts = label_conflicts(raw)  # same bytes, different classes: the label is a guess
        check_no_leak_across_given_splits(raw)
        raw, n_duplicates = drop_duplicates(raw)
        if p.max_images_per_class is not None:
            raw = subsample_per_class(raw, p.max_images_per_class, seed=seed)
        if raw.given_split is not None:
            split = given_split(raw, val_fraction=p.val_fraction, seed=seed)
        else:
            split = stratified_split(
                raw.labels, val_fraction=p.val_fraction, test_fraction=p.test_fraction, seed=seed
            )
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
