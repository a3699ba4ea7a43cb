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

The release is loaded in resnet_slim/serve_release.py and the Flask app is
resnet_slim/serve_app.py; this module runs it on waitress from the command line.
"""

import argparse
import ctypes
import ipaddress
import math
import sys
import time
from pathlib import Path

from flask import Flask
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from resnet_slim.errors import UserError, run_stage
from resnet_slim.serve_app import (
    DEFAULT_MAX_DECODES,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_UPLOAD_MB,
    create_app,
)
from resnet_slim.serve_release import load_release

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
    add_release_arguments(parser)
    add_limit_arguments(parser)
    return parser.parse_args(argv)


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the pipeline's outputs are, and which model to serve."""
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


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """The memory and concurrency bounds (see the module docstring)."""
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
    return run_stage(lambda: run_server(args))


def run_server(args: argparse.Namespace) -> None:
    """Check the flags, open the release and serve it until Ctrl-C / SIGTERM."""
    check_flags(args)
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
    server = listen(app, args)
    print(
        f"serving '{release.card['name']}' at http://{args.host}:{server.effective_port}/ "
        f"(Ctrl-C stops)",
        file=sys.stderr,
    )
    server.run()  # returns on Ctrl-C / SIGTERM, after closing the connections


def check_flags(args: argparse.Namespace) -> None:
    """Refuse limits that are not numbers in range before anything is loaded."""
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


def listen(app: Flask, args: argparse.Namespace) -> GuardedServer:
    """The server for `app` on --host:--port, or a UserError saying why it cannot listen there."""
    try:
        return make_server(
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


if __name__ == "__main__":
    raise SystemExit(main())
