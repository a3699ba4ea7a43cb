"""Pixels on disk: the one image preprocessing and the prepared-split file format.

Shared by `prepare` (which writes splits) and `data` (which reads them); torch-free, so that
`prepare` and its decoding workers never load torch.
"""

import mmap
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
IMAGES_FILE, LABELS_FILE = "{split}_images.npy", "{split}_labels.npy"


def to_rgb_array(image: Image.Image, image_size: int) -> np.ndarray:
    """The one preprocessing every image goes through: RGB, square `image_size`, uint8 HWC."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    elif image.mode == "F":  # float grayscale (TIFF): [0, 1] or any range, scaled to 8 bits
        array = np.nan_to_num(np.asarray(image, dtype=np.float64)).clip(0.0, None)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def map_pixels(path: Path, shape: tuple, offset: int) -> np.ndarray:
    """A read-only uint8 memory map of `shape` at `offset` bytes into the file at `path`."""
    with open(path, "rb") as file:
        if not np.prod(shape):
            return np.zeros(shape, np.uint8)
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array from this process's resident set.

    They stay in the page cache (a later read costs a minor fault, not disk I/O), but without this
    a pass over a mapped split would count the whole file in the process's RSS.
    """
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    if isinstance(base, mmap.mmap) and not base.closed:
        base.madvise(mmap.MADV_DONTNEED)
