"""Streamed decoding: image files to pixels in a pool of worker processes, never into a list.

`decode_files` hands the files to forked workers (`start_decoders`) and appends each decoded image
to a staging file on disk as it arrives (or keeps it in memory for small data and tests), so a
dataset larger than RAM can be prepared. A file that cannot be decoded, or whose name cannot go
into the manifest, is a bad image: an error, or skipped under prepare.on_bad_image: skip.
"""

import hashlib
import io
import multiprocessing
import os
import signal
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from resnet_slim.data.pixels import map_pixels, to_rgb_array
from resnet_slim.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


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
    received, parent = [], os.getpid()

    def record(number, _frame):
        if os.getpid() != parent:
            # a worker forked with this handler, stopped (the pool terminated early) before its
            # initializer ran: recording would swallow the SIGTERM, leaving a worker that never
            # exits and a parent that waits for it forever; die as the default handler would
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        received.append(number)

    handlers = {number: signal.signal(number, record) for number in STOP_SIGNALS}
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


@dataclass
class Decoded:
    """What `decode_files` made of its files, in their order; bad files skipped are left out."""

    kept: list[int] = field(default_factory=list)  # indices of the decoded files in the tasks
    ids: list[str] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "file: why" under on_bad_image=skip
    in_memory: list[np.ndarray] = field(default_factory=list)  # pixels, without a staging file


def decode_files(
    tasks: list[tuple[str, str, int, int]], *, on_bad_image: str, staging: Path | None, workers: int
) -> Decoded:
    """Decode `tasks` (`_decode_file`'s) in `workers` processes, in order. With `staging`, the
    pixels are appended to that file as they arrive, so no list of images grows in RAM."""
    decoded = Decoded()
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
                    decoded.skipped.append(error)
                    continue
                if out is not None:
                    out.write(pixels.tobytes())
                else:
                    decoded.in_memory.append(pixels)
                decoded.kept.append(index)
                decoded.ids.append(rel)
                decoded.sha256.append(digest)
                decoded.sizes.append(size)
    finally:
        if out is not None:
            out.close()
    return decoded


def decoded_pixels(decoded: Decoded, staging: Path | None, image_size: int) -> np.ndarray:
    """The decoded images as one uint8 N x S x S x 3 array: a read-only memory map of the
    staging file, or stacked from memory without one."""
    shape = (len(decoded.kept), image_size, image_size, 3)
    pixels = (
        map_pixels(staging, shape, offset=0)
        if staging is not None
        else np.stack(decoded.in_memory)
        if decoded.in_memory
        else np.zeros(shape, np.uint8)
    )
    assert len(decoded.kept) * image_size * image_size * 3 == pixels.nbytes
    return pixels
