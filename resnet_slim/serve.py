"""A small web UI and JSON API for the gated release model: upload an image, get the top-3 classes.

`python -m resnet_slim.serve` (also `make serve`, `resnet-slim-serve`) reads what the pipeline
wrote: `reports/gate.json` names the release model, `reports/benchmark.json` its ONNX file and
measured numbers, `data/prepared/meta.json` the class names and normalisation. It refuses to start
unless the gate passed for these very files (gate.json records their sha256, and the release file
must be `models/<release>.onnx` in the workspace); `--allow-ungated` starts anyway and every page
and answer carries a warning. A model file outside the workspace is never served.

Uploads stay in memory (never written to disk), are size-checked before they are read and
pixel-checked before they are decoded (decompression bombs), then go through
`data.preprocess_image`, the pipeline's own test transform. One onnxruntime session is shared by
all request threads: `InferenceSession.run` is thread-safe.

It runs on waitress, a production WSGI server: its I/O thread reads each request in full before a
worker thread sees it, so a client that sends less than its Content-Length holds no worker and is
disconnected after REQUEST_TIMEOUT_S. A slow client is bounded too (GuardedServer): each request
must arrive in full within REQUEST_DEADLINE_S, and one address holds at most
CLIENT_RECEIVING_LIMIT connections that are still sending, so /healthz and the page stay
reachable while others trickle. Memory is bounded by design: at most CONNECTION_LIMIT bodies
of at most the upload limit (+ MULTIPART_MARGIN) are buffered, and at most `max_decodes` images
are decoded at once (a 25-megapixel upload decodes to ~100 MB of RGBA, ~200 MB at peak while it is
converted); a request that waits DECODE_WAIT_S for a decoding slot gets HTTP 503. With the
defaults the cap is ~1.3 GB resident: ~0.7 GB idle (torch, onnxruntime) + 2 x 0.2 GB decoding +
at most 32 x 6 MB of bodies. Measured with 20 concurrent 25-megapixel uploads on 127.0.0.1: a
peak of 1.08 GB (Flask's development server before: 3.96 GB, one decode per upload at once).
"""

import argparse
import ctypes
import io
import ipaddress
import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from flask import Flask, Request, jsonify, render_template, request
from PIL import Image, UnidentifiedImageError
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, ServiceUnavailable

from resnet_slim.compress.export import check_input_size, make_session
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError, run_stage
from resnet_slim.gate.verdict import read_verdict, served_file_problems
from resnet_slim.io import finite_number, read_json

DEFAULT_MAX_UPLOAD_MB = 5.0  # request body limit; a larger upload gets HTTP 413
DEFAULT_MAX_MEGAPIXELS = 25.0  # width x height limit, checked from the header before decoding
DEFAULT_MAX_DECODES = 2  # uploads decoded at once (the memory bound; see the module docstring)
DEFAULT_THREADS = 8  # waitress worker threads: requests in the app at once
CONNECTION_LIMIT = 32  # open connections; each may buffer one request body in memory
MULTIPART_MARGIN = 1024 * 1024  # bytes over the upload limit waitress buffers (form overhead)
REQUEST_TIMEOUT_S = 10  # a connection that sends nothing for this long is closed
# A request (headers and body) must arrive in full within this, however it is trickled: the idle
# timeout above never fires for a client that sends a byte every few seconds. It asks 0.5 MB/s of
# a 5 MB upload; loopback and a LAN give far more.
REQUEST_DEADLINE_S = 10
# Connections one client address may hold while they are still sending a request (a browser opens
# up to 6): one client alone cannot take the CONNECTION_LIMIT slots.
CLIENT_RECEIVING_LIMIT = 8
# multipart parts in one upload: the page sends one, API clients may add a few (werkzeug: 1000)
MAX_FORM_PARTS = 100
DECODE_WAIT_S = 20  # longest wait for a decoding slot before answering 503
TOP_K = 3
# The formats prepare reads from an imagefolder (prepare.IMAGE_SUFFIXES). Pillow's rarer decoders
# (EPS runs Ghostscript, for one) never see an upload.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
# Said when a pipeline output is missing.
RUN_THE_PIPELINE = (
    "run make repro first; paths are relative to --root, default the current directory"
)
# Page resources come from this server only (the page works offline); previews are blob: URLs.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass
class Release:
    """The model being served, and what the page says about it."""

    session: ort.InferenceSession
    input_name: str
    meta: dict  # the prepared dataset's meta.json: class names, image size, mean/std
    card: dict  # name, file, top1, size_mb, p50_ms, n_classes, gated, warning


# --- loading the release -------------------------------------------------------------------------


def require_output(path: Path, what: str) -> Path:
    """`path`, or a UserError saying the pipeline has not written it."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found ({RUN_THE_PIPELINE})")
    return path


def gate_verdict(gate_path: Path) -> tuple[dict | None, str | None]:
    """(gate.json if the gate stage could have written it, why it is not a passed release or None).

    A gate.json edited by hand is not a pass: `read_verdict` names what is wrong with it."""
    try:
        verdict = read_verdict(require_output(gate_path, "gate result"))
    except UserError as err:
        return None, str(err)
    if not verdict["passed"]:  # fail closed: read_verdict lets `passed` be only true or false
        return verdict, (
            f"{gate_path}: the gate did not pass for release '{verdict['release']}': "
            f"{verdict['failed'][0]}"
        )
    return verdict, None


def refuse_ungated(not_gated: str | None, allow_ungated: bool) -> None:
    if not_gated and not allow_ungated:
        raise UserError(
            f"refusing to serve an ungated model: {not_gated}; pass --allow-ungated "
            f"to serve it anyway (the page will show a warning)"
        )


def benchmarked_model(benchmark_path: Path, name: str | None, root: Path) -> tuple[dict, Path]:
    """`name`'s row in benchmark.json and its ONNX file, which must lie inside `root`.

    Never a file elsewhere (`/etc/x.onnx`, `../x.onnx`, a link out of the workspace): the server
    only serves what the pipeline wrote, even with --allow-ungated."""
    results = read_json(
        require_output(benchmark_path, "benchmark results"), what="benchmark results"
    )
    models = results.get("models") if isinstance(results, dict) else None
    models = models if isinstance(models, dict) else {}
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        wanted = f"model '{name}'" if name else "the release model (the gate names none)"
        raise UserError(
            f"{benchmark_path}: no benchmark results for {wanted}; pass --model NAME "
            f"(benchmarked: {known})"
        )
    entry = models[name] if isinstance(models[name], dict) else {}
    file = entry.get("file")
    if not isinstance(file, str) or not file.endswith(".onnx"):
        raise UserError(
            f"{benchmark_path}: model '{name}' has no ONNX file (runtime "
            f"{entry.get('runtime', 'unknown')}); serve an onnxruntime model"
        )
    if "\0" in file:  # no path has one (resolving it would raise ValueError)
        raise UserError(f"{benchmark_path}: model '{name}' has no valid file name ({file!r})")
    workspace = root.resolve()
    path = (workspace / file).resolve()  # an absolute `file` stays itself
    if not path.is_relative_to(workspace):
        raise UserError(
            f"{benchmark_path}: the ONNX file of model '{name}' is {file}, outside the "
            f"workspace {workspace}; refusing to serve a file the pipeline did not write"
        )
    return entry, path


def unvouched(verdict: dict, root: Path, served: dict[str, Path]) -> str | None:
    """Why the files the server would read are not the ones the gate passed, or None if they are.

    `served` maps each vouched file (release, meta, benchmark) to the path the server reads: the
    recorded files must be unchanged, and they must be the ones read (not another --benchmark)."""
    problems = served_file_problems(verdict, root)
    files = verdict.get("files") if isinstance(verdict.get("files"), dict) else {}
    for name, path in served.items():
        record = files.get(name) if isinstance(files.get(name), dict) else {}
        recorded = record.get("path")
        if isinstance(recorded, str) and (root / recorded).resolve() != path.resolve():
            problems.append(f"the {name} file to serve is {path}, not {recorded} the gate judged")
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}; re-run the pipeline (make repro)"


def load_release(
    *,
    root: Path,
    gate: Path,
    benchmark: Path,
    prepared: Path,
    model: str | None = None,
    allow_ungated: bool = False,
) -> Release:
    """Open the gated release model (or `model`, with `allow_ungated`) for serving.

    Relative paths, including the model file named in the benchmark, are taken from `root`. A
    passed gate vouches for the release file, meta.json and benchmark.json by sha256: the server
    reads exactly those, or the model counts as ungated.
    """
    root = Path(root)
    gate_path, benchmark_path = root / gate, root / benchmark
    meta_path = root / prepared / "meta.json"
    verdict, not_gated = gate_verdict(gate_path)
    release_name = verdict["release"] if verdict else None
    if model and release_name and model != release_name and not_gated is None:
        not_gated = f"--model {model} is not the gated release ('{release_name}')"
    refuse_ungated(not_gated, allow_ungated)

    name = model or release_name
    entry, model_path = benchmarked_model(benchmark_path, name, root)
    require_output(meta_path, "prepared dataset metadata")
    meta = data.load_meta(root / prepared)
    require_output(model_path, f"ONNX file of model '{name}'")
    if not_gated is None:  # the gate passed: for these very files?
        served = {"release": model_path, "meta": meta_path, "benchmark": benchmark_path}
        not_gated = unvouched(verdict, root, served)
        refuse_ungated(not_gated, allow_ungated)

    session = make_session(model_path)
    check_input_size(session, int(meta["image_size"]), model_path)
    input_name = session.get_inputs()[0].name
    size = int(meta["image_size"])
    # One warm-up run doubles as the check that the model and the dataset agree on the classes,
    # and that the model computes numbers at all (NaN logits would rank classes arbitrarily).
    logits = session.run(None, {input_name: np.zeros((1, 3, size, size), dtype=np.float32)})[0]
    n_classes = len(meta["class_names"])
    if logits.shape != (1, n_classes):
        raise UserError(
            f"{model_path}: model outputs {list(logits.shape)} logits per batch but "
            f"{root / prepared} has {n_classes} classes"
        )
    if not np.isfinite(logits).all():
        raise UserError(
            f"{model_path}: model outputs non-finite logits (NaN or inf) for a blank image; "
            f"refusing to serve it (re-export it: make repro)"
        )
    card = {
        "name": name,
        "file": entry["file"],
        "top1": finite_number(entry.get("top1")),
        "size_mb": finite_number(entry.get("size_mb")),
        "p50_ms": finite_number(entry.get("p50_ms")),
        "n_classes": n_classes,
        "gated": not_gated is None,
        "warning": not_gated,
    }
    return Release(session=session, input_name=input_name, meta=meta, card=card)


# --- one request ----------------------------------------------------------------------------------


def decode_upload(payload: bytes, *, max_pixels: int) -> Image.Image:
    """The uploaded bytes as a decoded PIL image, or BadRequest with one clear line."""
    if not payload:
        raise BadRequest("empty upload: the file has 0 bytes")
    formats = ", ".join(UPLOAD_FORMATS)
    try:
        image = Image.open(io.BytesIO(payload), formats=UPLOAD_FORMATS)  # reads the header only
    except Image.DecompressionBombError as err:
        raise BadRequest(f"image refused as a decompression bomb: {err}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest(f"not a recognised image: upload one of {formats}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadRequest(
            f"image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over "
            f"the {max_pixels / 1e6:g} megapixel limit (decompression bomb guard)"
        )
    try:
        image.load()
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, struct.error, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise BadRequest(f"corrupt {image.format} image: {detail}") from None
    return image


def predict(release: Release, image: Image.Image) -> dict:
    """Top-k classes with probabilities, and the time onnxruntime took for this one image."""
    try:
        batch = data.preprocess_image(image, release.meta)
    except (OSError, ValueError) as err:  # e.g. a pixel mode Pillow cannot convert to RGB
        raise BadRequest(f"cannot convert this {image.mode} image to RGB: {err}") from None
    start = time.perf_counter()
    logits = release.session.run(None, {release.input_name: batch})[0][0].astype(np.float64)
    inference_ms = (time.perf_counter() - start) * 1000.0
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    top = np.argsort(-probabilities, kind="stable")[:TOP_K]
    names = release.meta["class_names"]
    return {
        "predictions": [
            {"class": str(names[i]), "index": int(i), "probability": float(probabilities[i])}
            for i in top
        ],
        "inference_ms": inference_ms,
    }


# --- the app --------------------------------------------------------------------------------------


class InMemoryRequest(Request):
    """Keeps uploaded files in memory: werkzeug would spool those over 500 KB to a temp file.

    MAX_CONTENT_LENGTH bounds the memory one request can take.
    """

    def _get_file_stream(
        self, total_content_length, content_type, filename=None, content_length=None
    ):
        return io.BytesIO()


def too_large(content_length: int | None, max_upload_bytes: int, max_upload_mb: float) -> str:
    """What a 413 means: werkzeug raises the same error for a body over the size limit and for a
    form with more than MAX_FORM_PARTS parts; the body's length tells them apart."""
    if content_length is not None and content_length <= max_upload_bytes:
        return (
            f"too many form fields: at most {MAX_FORM_PARTS}; send the image alone, "
            f"in the field 'image'"
        )
    return f"upload is larger than the {max_upload_mb:g} MB limit"


def create_app(
    release: Release,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    max_decodes: int = DEFAULT_MAX_DECODES,
) -> Flask:
    """The Flask app: `/` (the page), `POST /predict` (JSON), `/healthz`."""
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    max_upload_bytes = int(max_upload_mb * 1024 * 1024)
    app.config["MAX_CONTENT_LENGTH"] = max_upload_bytes
    app.config["MAX_FORM_PARTS"] = MAX_FORM_PARTS
    # A text field may be as large as the body, like the file (werkzeug: 500 KB): then a 413 for
    # a body within the size limit can only mean too many parts, and the answer says so.
    app.config["MAX_FORM_MEMORY_SIZE"] = max_upload_bytes
    max_pixels = int(max_megapixels * 1e6)
    decoding = threading.BoundedSemaphore(max_decodes)

    @app.get("/")
    def index():
        return render_template(
            "index.html",
            card=release.card,
            max_upload_mb=max_upload_mb,
            max_upload_bytes=max_upload_bytes,
            formats=UPLOAD_FORMATS,
        )

    @app.post("/predict")
    def predict_upload():
        upload = request.files.get("image")  # parsing the body enforces MAX_CONTENT_LENGTH (413)
        if upload is None:
            raise BadRequest(
                "no file uploaded: send multipart/form-data with the image in the field 'image'"
            )
        payload = upload.read()
        if not decoding.acquire(timeout=DECODE_WAIT_S):
            raise ServiceUnavailable(f"busy: {max_decodes} images are being decoded; retry shortly")
        try:  # the decoded image (up to ~100 MB) lives only inside this block
            image = decode_upload(payload, max_pixels=max_pixels)
            info = {"width": image.width, "height": image.height, "format": image.format}
            result = predict(release, image)
            image.close()
        finally:
            decoding.release()
        return jsonify({**result, "image": info, "model": release.card})

    @app.get("/healthz")
    def healthz():
        return jsonify(
            {"status": "ok", "model": release.card["name"], "gated": release.card["gated"]}
        )

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException):
        # Every error is one JSON line for scripts and for the page's script to show.
        message = err.description
        if isinstance(err, RequestEntityTooLarge):
            message = too_large(request.content_length, max_upload_bytes, max_upload_mb)
        return jsonify({"error": message}), err.code

    @app.after_request
    def security_headers(response):
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return app


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="resnet-slim-serve",
        description="Serve the gated release model: a web page and a JSON API on localhost.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("."),
        help="repository root the paths below are relative to (default: the current directory)",
    )
    parser.add_argument("--gate", type=Path, default=Path("reports/gate.json"))
    parser.add_argument("--benchmark", type=Path, default=Path("reports/benchmark.json"))
    parser.add_argument(
        "--prepared",
        type=Path,
        default=Path("data/prepared"),
        help="prepared dataset directory (its meta.json: classes, normalisation)",
    )
    parser.add_argument(
        "--model",
        help="serve this benchmarked model instead of the gate's release (needs --allow-ungated)",
    )
    parser.add_argument(
        "--allow-ungated",
        action="store_true",
        help="serve even if the gate did not pass; the page shows a warning",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help="largest accepted upload (default: %(default)s MB)",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=DEFAULT_MAX_MEGAPIXELS,
        help="largest accepted image, width x height (default: %(default)s)",
    )
    parser.add_argument(
        "--max-decodes",
        type=int,
        default=DEFAULT_MAX_DECODES,
        help="uploads decoded at once, the memory bound (default: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=int, default=DEFAULT_THREADS, help="worker threads (default: %(default)s)"
    )
    return parser.parse_args(argv)


class DeadlineChannel(HTTPChannel):
    """A waitress connection that must deliver each whole request within a deadline.

    waitress closes a connection only after REQUEST_TIMEOUT_S of silence, so a client trickling
    a byte every few seconds holds it for ever; here the server's maintenance closes it once its
    request has been arriving for longer than the deadline."""

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map=map)
        self.ready_since = time.monotonic()  # when it began waiting for its current request
        server.make_room_for(self)

    def receiving(self) -> bool:
        """Waiting for, or part-way through, a request: none complete in the app, nothing to send.

        Only the I/O thread turns such a connection into a busy one (`received`), so the answer
        holds while that thread acts on it."""
        return not (
            self.requests or self.total_outbufs_len or self.will_close or self.close_when_flushed
        )

    def service(self):  # in a worker thread, once per complete request
        super().service()
        self.ready_since = time.monotonic()  # the next request's deadline starts now


class GuardedServer(TcpWSGIServer):
    """waitress's TCP server with a per-request deadline and a per-client cap on connections that
    are still sending their request (slow clients, "slowloris").

    The cap evicts the client's oldest such connection rather than refusing the new one: a client
    that sends a whole request at once (a browser, /healthz) is always served, while one that
    trickles is dropped once it is the oldest of CLIENT_RECEIVING_LIMIT. One address then holds
    at most that many of the CONNECTION_LIMIT slots; several addresses together can still fill
    them, each connection for at most the deadline."""

    channel_class = DeadlineChannel

    def __init__(self, application, *, deadline_s: float, per_client: int, **adjustments):
        self.deadline_s, self.per_client = deadline_s, per_client
        super().__init__(application, **adjustments)

    def make_room_for(self, newcomer: DeadlineChannel) -> None:
        client = newcomer.addr[0]
        waiting = [
            channel
            for channel in self.active_channels.values()
            if channel is not newcomer and channel.addr[0] == client and channel.receiving()
        ]
        waiting.sort(key=lambda channel: channel.ready_since)
        for channel in waiting[: max(0, len(waiting) + 1 - self.per_client)]:  # the oldest
            channel.will_close = True  # the I/O loop closes it on its next pass

    def maintenance(self, now):  # every cleanup_interval, in the I/O thread
        super().maintenance(now)  # waitress: connections silent for channel_timeout
        cutoff = time.monotonic() - self.deadline_s
        for channel in self.active_channels.values():
            if channel.receiving() and channel.ready_since < cutoff:
                channel.will_close = True


def make_server(
    app: Flask, *, host: str, port: int, max_upload_mb: float, threads: int = DEFAULT_THREADS
) -> GuardedServer:
    """A waitress server for `app` (not started: call `.run()`; `.effective_port` is the port).

    It listens on the first address `host` resolves to (waitress's create_server would open one
    server per address, and return an object without `.effective_port` for several)."""
    max_body = int(max_upload_mb * 1024 * 1024) + MULTIPART_MARGIN
    return GuardedServer(
        app,
        deadline_s=REQUEST_DEADLINE_S,
        per_client=CLIENT_RECEIVING_LIMIT,
        host=host,
        port=port,
        threads=threads,
        connection_limit=CONNECTION_LIMIT,
        channel_timeout=REQUEST_TIMEOUT_S,
        cleanup_interval=1,  # how often maintenance runs (waitress: 30 s): the deadline's precision
        max_request_body_size=max_body,  # larger bodies get 413 before they are read
        inbuf_overflow=max_body,  # keep bodies in memory: uploads are never written to disk
        asyncore_use_poll=True,  # no select() limit of 1024 file descriptors
        ident="resnet-slim",
    )


def keep_big_blocks_mmapped() -> None:
    """Give a decoded image's memory back to the system when it is freed (glibc only).

    glibc raises its mmap threshold after a big block is freed, so later images (Pillow allocates
    them in 16 MB blocks) land in per-thread heaps that are never returned: resident memory then
    grows with the number of worker threads, not with `max_decodes` (measured: +1.0 GB instead of
    +0.4 GB for 20 concurrent 25-megapixel uploads). A fixed threshold keeps them mmapped.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1024 * 1024)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):  # not glibc: its allocator may behave, or not; no harm
        pass


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def serve() -> None:
        for flag, value in (
            ("--max-upload-mb", args.max_upload_mb),
            ("--max-megapixels", args.max_megapixels),
        ):
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{flag} must be a positive number (got {value})")
        for flag, value, most in (
            ("--max-decodes", args.max_decodes, 64),
            ("--threads", args.threads, 256),
        ):
            if not 1 <= value <= most:
                raise UserError(f"{flag} must be between 1 and {most} (got {value})")
        if not 0 <= args.port <= 65535:
            raise UserError(f"--port must be between 0 and 65535 (got {args.port})")
        release = load_release(
            root=args.root,
            gate=args.gate,
            benchmark=args.benchmark,
            prepared=args.prepared,
            model=args.model,
            allow_ungated=args.allow_ungated,
        )
        app = create_app(
            release,
            max_upload_mb=args.max_upload_mb,
            max_megapixels=args.max_megapixels,
            max_decodes=args.max_decodes,
        )
        keep_big_blocks_mmapped()
        if release.card["warning"]:
            print(f"warning: serving an ungated model: {release.card['warning']}", file=sys.stderr)
        if not _is_loopback(args.host):
            print(
                f"warning: listening on {args.host} exposes the web UI beyond this machine",
                file=sys.stderr,
            )
        try:
            server = make_server(
                app,
                host=args.host,
                port=args.port,
                max_upload_mb=args.max_upload_mb,
                threads=args.threads,
            )
        except OSError as err:  # port in use, address not on this machine, port < 1024
            raise UserError(
                f"cannot listen on {args.host}:{args.port} ({err.strerror or err})"
            ) from None
        print(
            f"serving '{release.card['name']}' at http://{args.host}:{server.effective_port}/ "
            f"(Ctrl-C stops)",
            file=sys.stderr,
        )
        server.run()  # returns on Ctrl-C / SIGTERM, after closing the connections

    return run_stage(serve)


if __name__ == "__main__":
    raise SystemExit(main())
