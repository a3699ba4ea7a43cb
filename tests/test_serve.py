"""The web UI / JSON API (resnet_slim.serve): predictions, bad uploads, the gate, concurrency.

Every test serves fixture pipeline outputs built here (tiny models exported to ONNX, a gate and a
benchmark report), never the real pipeline's.
"""

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import chdir, contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import werkzeug.formparser
from PIL import Image
from torch import nn

from resnet_slim import serve, serve_app, serve_release
from resnet_slim.compress.export import export_onnx, make_session, run_onnx
from resnet_slim.data import loader as data
from resnet_slim.errors import UserError
from resnet_slim.gate.verdict import vouched_files
from resnet_slim.io import write_json
from resnet_slim.train.models import build_model, make_arch
from tests.conftest import REPO

RELEASE, OTHER = "fixture_centroid", "fixture_resnet"
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


# --- fixture pipeline outputs --------------------------------------------------------------------


def centroid_classifier(prepared: Path) -> nn.Module:
    """Nearest class mean as one linear layer: a fixture model that classifies digits untrained."""
    images, labels = data.normalized_split(prepared, "train")
    flat = images.flatten(1)
    means = torch.stack([flat[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    linear = nn.Linear(flat.shape[1], len(means))
    scale = 0.2  # argmax(x.m - |m|^2 / 2) is the nearest mean; scaled so softmax is not one-hot
    with torch.no_grad():
        linear.weight.copy_(means * scale)
        linear.bias.copy_(-0.5 * (means**2).sum(1) * scale)
    return nn.Sequential(nn.Flatten(), linear).eval()


def benchmark_entry(path: Path, prepared: Path, root: Path) -> dict:
    """The fields the server reads from reports/benchmark.json, measured on the fixture model."""
    session = make_session(path)
    images, labels = data.normalized_split(prepared, "test")
    top1 = float((run_onnx(session, images).argmax(1) == labels.numpy()).mean() * 100)
    one = images[:1].numpy()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        session.run(None, {"input": one})
        times.append((time.perf_counter() - start) * 1000)
    return {
        "file": path.relative_to(root).as_posix(),
        "runtime": "onnxruntime",
        "top1": top1,
        "size_mb": path.stat().st_size / 1e6,
        "p50_ms": float(np.median(times)),
    }


def gate_for(
    root: Path,
    *,
    passed: bool = True,
    reason: str = "latency_speedup 1.5 x is not >= 2",
    release_file: str | None = None,
) -> dict:
    """gate.json as the gate stage writes it (`gate.judge`): a verdict on RELEASE that vouches for
    the release file (benchmark.json's, unless `release_file`), meta.json and benchmark.json now
    under `root`, by their paths relative to it."""
    bench = json.loads((root / "reports" / "benchmark.json").read_text())
    release_file = release_file or bench["models"][RELEASE]["file"]
    check = {
        "name": "latency_speedup",
        "passed": passed,
        "measured": 2.5 if passed else 1.5,
        "threshold": 2.0,
        "op": ">=",
        "unit": "x",
        "reason": None if passed else reason,
    }
    with chdir(root):  # the gate stage runs in the workspace and records its relative paths
        files = vouched_files(
            release_file, meta="data/prepared/meta.json", benchmark="reports/benchmark.json"
        )
    return {
        "passed": passed,
        "release": RELEASE,
        "reference": OTHER,
        "enforce": True,
        "checks": [check],
        "failed": [] if passed else [reason],
        "selection": None,
        "files": files,
    }


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory, tiny_prepared) -> Path:
    """A repo-shaped directory: models/, reports/{gate,benchmark}.json, data/prepared/meta.json."""
    root = tmp_path_factory.mktemp("pipeline")
    image_size = data.load_meta(tiny_prepared)["image_size"]
    torch.manual_seed(0)
    resnet = build_model(make_arch(name="resnet18", num_classes=10, width=8, small_input=True))
    models = {}
    for name, model in ((RELEASE, centroid_classifier(tiny_prepared)), (OTHER, resnet.eval())):
        path = root / "models" / f"{name}.onnx"
        path.parent.mkdir(exist_ok=True)
        export_onnx(model, path, image_size=image_size, opset=17)
        models[name] = benchmark_entry(path, tiny_prepared, root)
    write_json(root / "reports" / "benchmark.json", {"models": models, "hardware": {}})
    (root / "data" / "prepared").mkdir(parents=True)
    shutil.copy(tiny_prepared / "meta.json", root / "data" / "prepared" / "meta.json")
    write_json(root / "reports" / "gate.json", gate_for(root))
    return root


def load(root: Path, **overrides) -> serve_release.Release:
    paths = {
        "gate": Path("reports/gate.json"),
        "benchmark": Path("reports/benchmark.json"),
        "prepared": Path("data/prepared"),
    }
    return serve.load_release(root=root, **{**paths, **overrides})


@pytest.fixture(scope="module")
def release(pipeline_root) -> serve_release.Release:
    return load(pipeline_root)


@pytest.fixture
def client(release):
    return serve.create_app(release).test_client()


# --- uploads --------------------------------------------------------------------------------------


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_png(prepared: Path, index: int, scale: int = 1) -> bytes:
    """Test-split image `index` as a PNG, optionally upscaled (nearest), like a bigger scan."""
    pixels = np.array(data.load_split(prepared, "test").images[index])
    return png_bytes(pixels.repeat(scale, axis=0).repeat(scale, axis=1))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: the shape of a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def noise_png(side: int) -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


BAD_UPLOADS = {  # name: (filename, payload or None for no file field, status, message fragment)
    "not an image": ("notes.txt", b"just some text\n", 400, "not a recognised image"),
    "corrupt image": ("cut.png", noise_png(64)[:6000], 400, "corrupt PNG image"),
    "empty upload": ("empty.png", b"", 400, "empty upload"),
    "no file field": (None, None, 400, "no file uploaded"),
    "over the size limit": ("big.png", b"\0" * int(5.5 * 1024 * 1024), 413, "larger than the 5 MB"),
    "decompression bomb": ("bomb.png", png_claiming(30_000, 30_000), 400, "decompression bomb"),
    "over the pixel limit": ("wide.png", png_claiming(6_000, 5_000), 400, "25 megapixel limit"),
}


def post(client, filename: str | None, payload: bytes | None):
    form = {} if payload is None else {"image": (io.BytesIO(payload), filename)}
    return client.post("/predict", data=form, content_type="multipart/form-data")


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max())
    return exp / exp.sum()


# --- behaviour ------------------------------------------------------------------------------------


def test_predictions_match_the_pipelines_test_transform(client, release, tiny_prepared):
    images, _ = data.normalized_split(tiny_prepared, "test")
    logits = run_onnx(release.session, images[:5])  # what the benchmark measured
    for index in range(5):
        response = post(client, "digit.png", digit_png(tiny_prepared, index))
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        expected = softmax(logits[index].astype(np.float64))
        top3 = np.argsort(-expected, kind="stable")[:3]
        assert [p["index"] for p in body["predictions"]] == top3.tolist()
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == pytest.approx(expected[top3], abs=1e-5)
        assert body["predictions"][0]["class"] == release.meta["class_names"][top3[0]]
        assert body["inference_ms"] > 0
        assert body["model"]["name"] == RELEASE and body["model"]["gated"] is True


def test_larger_images_are_resized_like_prepare(client, tiny_prepared):
    small = post(client, "small.png", digit_png(tiny_prepared, 0)).get_json()
    big = post(client, "big.png", digit_png(tiny_prepared, 0, scale=12)).get_json()
    assert big["image"] == {"width": 96, "height": 96, "format": "PNG"}
    assert big["predictions"][0]["class"] == small["predictions"][0]["class"]


@pytest.mark.parametrize("image_format", serve_app.UPLOAD_FORMATS)
def test_every_accepted_format_is_served(client, tiny_prepared, image_format):
    pixels = np.array(data.load_split(tiny_prepared, "test").images[0])
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    response = post(client, f"digit.{image_format.lower()}", buffer.getvalue())
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["image"]["format"] == image_format


def test_page_and_healthz(client, release):
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert RELEASE in html and "passed" in html and "ungated-warning" not in html
    assert "http://" not in html and "https://" not in html  # no CDN: the page works offline
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert client.get("/healthz").get_json() == {"status": "ok", "model": RELEASE, "gated": True}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_upload_gets_a_clear_4xx_and_the_app_keeps_serving(client, tiny_prepared, case):
    filename, payload, status, fragment = BAD_UPLOADS[case]
    response = post(client, filename, payload)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert fragment in error and "\n" not in error and "Traceback" not in error
    assert post(client, "digit.png", digit_png(tiny_prepared, 0)).status_code == 200


def test_uploads_are_never_written_to_disk(client, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
        if hasattr(werkzeug.formparser, name):
            monkeypatch.setattr(werkzeug.formparser, name, no_disk)
    payload = noise_png(700)  # over the 500 KB werkzeug would spool to disk
    assert len(payload) > 1024 * 1024
    assert post(client, "noise.png", payload).status_code == 200


def test_refuses_to_start_when_the_gate_failed(pipeline_root, tmp_path, capsys):
    gate = tmp_path / "gate.json"
    write_json(gate, gate_for(pipeline_root, passed=False))
    code = serve.main(["--root", str(pipeline_root), "--gate", str(gate)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: refusing to serve an ungated model") and error.count("\n") == 1
    assert "latency_speedup" in error and "--allow-ungated" in error


@pytest.mark.parametrize("gate_content", [None, "not json", {"release": RELEASE}])
def test_a_missing_or_unreadable_gate_is_not_a_pass(pipeline_root, tmp_path, gate_content):
    gate = tmp_path / "gate.json"
    if isinstance(gate_content, str):
        gate.write_text(gate_content)
    elif gate_content is not None:
        write_json(gate, gate_content)
    with pytest.raises(UserError, match="refusing to serve an ungated model"):
        load(pipeline_root, gate=gate)


def test_allow_ungated_serves_with_a_visible_warning(pipeline_root, tmp_path, tiny_prepared):
    gate = tmp_path / "gate.json"
    write_json(gate, gate_for(pipeline_root, passed=False, reason="size_ratio too big"))
    client = serve.create_app(load(pipeline_root, gate=gate, allow_ungated=True)).test_client()
    html = client.get("/").get_data(as_text=True)
    assert 'id="ungated-warning"' in html and "size_ratio too big" in html and "not passed" in html
    body = post(client, "digit.png", digit_png(tiny_prepared, 0)).get_json()
    assert body["model"]["gated"] is False and "did not pass" in body["model"]["warning"]
    assert client.get("/healthz").get_json()["gated"] is False


def test_another_model_than_the_release_needs_allow_ungated(pipeline_root, tiny_prepared):
    with pytest.raises(UserError, match=f"--model {OTHER} is not the gated release"):
        load(pipeline_root, model=OTHER)
    client = serve.create_app(load(pipeline_root, model=OTHER, allow_ungated=True)).test_client()
    body = post(client, "digit.png", digit_png(tiny_prepared, 0)).get_json()
    assert body["model"]["name"] == OTHER and len(body["predictions"]) == 3
    with pytest.raises(UserError, match="no benchmark results for model 'nope'.*fixture_centroid"):
        load(pipeline_root, model="nope", allow_ungated=True)


def test_missing_pipeline_outputs_say_to_run_the_pipeline(pipeline_root, tmp_path):
    with pytest.raises(UserError, match="benchmark results not found .run make repro first"):
        load(tmp_path, model=RELEASE, allow_ungated=True)
    shutil.copytree(pipeline_root / "reports", tmp_path / "reports")
    with pytest.raises(UserError, match="meta.json: prepared dataset metadata not found"):
        load(tmp_path)
    shutil.copytree(pipeline_root / "data", tmp_path / "data")
    with pytest.raises(UserError, match=f"ONNX file of model '{RELEASE}' not found"):
        load(tmp_path)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--max-upload-mb", "0", "must be a positive number"),
        ("--max-megapixels", "nan", "must be a positive number"),
        ("--port", "70000", "must be between 0 and 65535"),
        ("--max-decodes", "0", "must be between 1 and 64"),
        ("--threads", "100000", "must be between 1 and 256"),
    ],
)
def test_bad_flags_get_one_line(pipeline_root, capsys, flag, value, message):
    assert serve.main(["--root", str(pipeline_root), flag, value]) == 2
    assert f"error: {flag} {message}" in capsys.readouterr().err


# --- a real server on loopback --------------------------------------------------------------------


@contextmanager
def running_server(app, threads: int = serve.DEFAULT_THREADS):
    """Serve `app` with the production server (waitress) on 127.0.0.1 at a free port, in a
    background thread; yields its base URL."""
    server = serve.make_server(
        app, host="127.0.0.1", port=0, max_upload_mb=serve.DEFAULT_MAX_UPLOAD_MB, threads=threads
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.task_dispatcher.shutdown()  # worker threads finish their requests first
        server.close()
        thread.join(timeout=10)


def post_over_http(url: str, filename: str | None, payload: bytes | None) -> tuple[int, dict]:
    """POST /predict as multipart/form-data over a real socket; returns (status, JSON body)."""
    boundary = "resnet-slim-test-boundary"
    body = b""
    if payload is not None:
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + payload
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"{url}/predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with LOOPBACK.open(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        try:
            return err.code, json.loads(text)
        except ValueError:  # waitress's own plain-text answer (a body far over the limit)
            return err.code, {"error": text}


def test_concurrent_requests_share_one_session(client, release, tiny_prepared):
    uploads = [digit_png(tiny_prepared, index) for index in range(8)]
    expected = [post(client, "d.png", payload).get_json()["predictions"] for payload in uploads]
    with running_server(serve.create_app(release)) as url, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: post_over_http(url, "d.png", uploads[i % 8]), range(32)))
    for i, (status, body) in enumerate(answers):
        assert status == 200, body
        got = body["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in expected[i % 8]]
        assert [p["probability"] for p in got] == pytest.approx(
            [p["probability"] for p in expected[i % 8]], abs=1e-6
        )


def test_real_server_answers_bad_uploads_and_keeps_serving(release, tiny_prepared):
    with running_server(serve.create_app(release)) as url:
        for filename, payload, status, fragment in BAD_UPLOADS.values():
            got_status, body = post_over_http(url, filename, payload)
            assert (got_status, fragment in body["error"]) == (status, True), body
        status, body = post_over_http(url, "digit.png", digit_png(tiny_prepared, 0))
        assert status == 200 and len(body["predictions"]) == 3


def _send_headers_then_stall(
    port: int, claimed: int, body: bytes = b"--x\r\n...."
) -> socket.socket:
    """Open a connection that promises `claimed` body bytes and sends `body` (then nothing)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {claimed}\r\n"
        f"Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode()
        + body
    )
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """The whole answer: one recv may return the headers without the body (separate segments)."""
    chunks = []
    with sock:
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_body_far_over_the_limit_is_refused_before_it_is_read(release):
    with running_server(serve.create_app(release)) as url:
        # headers only: body bytes the server never reads would make it reset the connection
        sock = _send_headers_then_stall(int(url.rsplit(":", 1)[1]), 7 * 1024 * 1024, body=b"")
        answer = _read_until_closed(sock).decode()
    assert answer.startswith("HTTP/1.1 413") and "exceeds max_body" in answer


def test_a_body_shorter_than_its_content_length_holds_no_thread_and_times_out(
    release, tiny_prepared, monkeypatch
):
    monkeypatch.setattr(serve, "REQUEST_TIMEOUT_S", 2)
    with running_server(serve.create_app(release), threads=1) as url:
        port = int(url.rsplit(":", 1)[1])
        stalled = [_send_headers_then_stall(port, 100_000) for _ in range(3)]
        # the one worker thread still answers at once: waitress reads bodies in its I/O thread
        started = time.monotonic()
        status, _ = post_over_http(url, "digit.png", digit_png(tiny_prepared, 0))
        assert status == 200 and time.monotonic() - started < 5
        for sock in stalled:  # and each stalled connection is closed after the timeout
            assert sock.recv(1024) == b""  # EOF: closed by the server (recv times out after 30 s)
            assert time.monotonic() - started < 10
            sock.close()


def test_decoding_is_bounded_and_a_long_wait_gets_503(release, tiny_prepared, monkeypatch):
    active, most = [0], [0]
    lock = threading.Lock()
    decode = serve_app.decode_upload

    def slow_decode(payload, *, max_pixels):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3)
        with lock:
            active[0] -= 1
        return decode(payload, max_pixels=max_pixels)

    monkeypatch.setattr(serve_app, "decode_upload", slow_decode)
    upload = digit_png(tiny_prepared, 0)
    with (
        running_server(serve.create_app(release, max_decodes=2), threads=6) as url,
        ThreadPoolExecutor(6) as pool,
    ):
        answers = list(pool.map(lambda _: post_over_http(url, "d.png", upload), range(6)))
    assert [status for status, _ in answers] == [200] * 6 and most[0] == 2
    monkeypatch.setattr(serve_app, "DECODE_WAIT_S", 0.1)  # now the third waits too long
    with (
        running_server(serve.create_app(release, max_decodes=1), threads=3) as url,
        ThreadPoolExecutor(3) as pool,
    ):
        answers = list(pool.map(lambda _: post_over_http(url, "d.png", upload), range(3)))
    statuses = sorted(status for status, _ in answers)
    assert statuses[0] == 200 and 503 in statuses, answers
    assert all("busy" in body["error"] for status, body in answers if status == 503)


def test_main_serves_with_waitress_until_sigterm_like_ctrl_c(pipeline_root, tiny_prepared):
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnet_slim.serve", "--root", str(pipeline_root), "--port", "0"],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # "serving 'NAME' at http://127.0.0.1:PORT/ (Ctrl-C stops)"
        assert line.startswith(f"serving '{RELEASE}' at http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].split("/ ", 1)[0]
        status, body = post_over_http(url, "digit.png", digit_png(tiny_prepared, 0))
        assert status == 200 and len(body["predictions"]) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.stderr.close()


def test_a_port_in_use_is_one_line(pipeline_root, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve.main(["--root", str(pipeline_root), "--port", str(port)]) == 2
    error = capsys.readouterr().err
    assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use)" in error
    assert error.count("error:") == 1
