"""Dataset sources: read the images of `digits`, `imagefolder` or `cifar10` as one RawDataset.

`digits` is `root/digits.csv.gz` (the embedded offline default), `imagefolder` is
`root/<class>/<image>` or given splits `root/train/<class>/`, `root/test/<class>/` and optionally
`root/val/<class>/` (decoded by resnet_slim/data/decode.py's worker pool), `cifar10` is
torchvision's python-format batches, never downloaded; its official test batch is a given split.
"""

import gzip
import hashlib
import itertools
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from resnet_slim.data.decode import decode_files, decoded_pixels, name_problem, printable_name
from resnet_slim.data.pixels import SPLITS, to_rgb_array
from resnet_slim.errors import UserError


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


def _class_folders(
    root: Path, split_mode: str, real_root: Path
) -> tuple[dict[str | None, Path], dict[str | None, list[Path]]]:
    """({split: folder}, {split: its class folders}) of an imagefolder root; the split is None
    for a flat root. Checked: no split or class folder is a symlink out of the root."""
    folders = given_split_folders(root, split_mode) or {None: root}
    for folder in folders.values():
        check_inside_root(folder, root, real_root)
    classes = {split: class_directories(folder) for split, folder in folders.items()}
    for dirs in classes.values():
        for class_dir in dirs:
            check_inside_root(class_dir, root, real_root)
    return folders, classes


def _class_names(root: Path, folders: dict, classes: dict) -> list[str]:
    """The classes (train/'s, or the flat root's); every given split must have exactly these,
    since a label means the same class in every split."""
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
    return class_names


def _file_tasks(
    root: Path,
    real_root: Path,
    folders: dict,
    classes: dict,
    class_names: list[str],
    *,
    image_size: int,
    max_bytes: int,
) -> tuple[list[tuple], list[int], list[str | None]]:
    """(decoding tasks, label per file, split per file) of every file in the class folders, in
    a fixed order (classes by name, files sorted), so the prepared data never depends on the
    order the file system lists them in."""
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
    return tasks, task_labels, task_splits


def _check_readable_classes(
    classes: dict, class_names: list[str], labels: np.ndarray, splits: np.ndarray
) -> None:
    """Every class keeps at least one image in every split once bad files are skipped."""
    for split, dirs in classes.items():
        in_split = splits == split
        for class_dir in dirs:
            if not (labels[in_split] == class_names.index(class_name(class_dir))).any():
                raise UserError(f"{class_dir}: class '{class_dir.name}' has no readable images")


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
    folders, classes = _class_folders(root, split_mode, real_root)
    class_names = _class_names(root, folders, classes)
    tasks, task_labels, task_splits = _file_tasks(
        root, real_root, folders, classes, class_names, image_size=image_size, max_bytes=max_bytes
    )
    decoded = decode_files(tasks, on_bad_image=on_bad_image, staging=staging, workers=workers)
    labels = np.asarray(task_labels, dtype=np.int64)[decoded.kept]
    splits = np.asarray(task_splits, dtype=object)[decoded.kept]
    _check_readable_classes(classes, class_names, labels, splits)
    return RawDataset(
        pixels=decoded_pixels(decoded, staging, image_size),
        rows=np.arange(len(decoded.kept)),
        labels=labels,
        class_names=class_names,
        ids=decoded.ids,
        sha256=decoded.sha256,
        sizes=decoded.sizes,
        skipped=decoded.skipped,
        given_split=None if None in folders else splits,
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
