"""resnet_slim.serve against bad inputs: only the files the gate passed are served, a broken
meta.json or model is one line at start-up, slow clients cannot starve the server, and a form with
too many fields is told so.

Servers run on 127.0.0.1 at a free port; every slow-client test is bounded in time.
"""

import io
import json
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_serve import (  # noqa: F401  (pipeline_root and release are fixtures, used by name)
    LOOPBACK,
    OTHER,
    RELEASE,
    digit_png,
    gate_for,
    pipeline_root,
    post,
    release,
    running_server,
)
from torch import nn

from resnet_slim import serve, serve_app
from resnet_slim.compress.export import export_onnx
from resnet_slim.data import loader as data
from resnet_slim.io import write_json
from tests.conftest import REPO, assert_one_line_error

GATE = Path("reports/gate.json")
BENCHMARK = Path("reports/benchmark.json")
PREPARED = Path("data/prepared")
RELEASE_FILE = f"models/{RELEASE}.onnx"


# --- workspaces to damage -------------------------------------------------------------------------


@pytest.fixture
def workspace(pipeline_root, tmp_path) -> Path:  # noqa: F811
    """A copy of the fixture pipeline's outputs, gated, for one test to change."""
    root = tmp_path / "workspace"
    shutil.copytree(pipeline_root, root)
    return root


@pytest.fixture
def no_server(monkeypatch):
    """A refusal test that wrongly gets as far as serving fails at once instead of hanging."""

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(serve, "make_server", started)


def edit_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    write_json(path, content)


def vouch(root: Path, **gate) -> None:
    """Re-run the gate on what is in `root` now: gate.json vouches for these files."""
    write_json(root / GATE, gate_for(root, **gate))


def refusal(capsys, root: Path, *args: str) -> str:
    """`serve.main` on `root` exits 2 with one `error:` line (returned) and no traceback."""
    code = serve.main(["--root", str(root), "--port", "0", *args])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --- the served model is the gated one ------------------------------------------------------------


def swap_release_file(root: Path) -> None:
    shutil.copy(root / "models" / f"{OTHER}.onnx", root / RELEASE_FILE)


def rename_a_class(root: Path) -> None:
    edit_json(root / PREPARED / "meta.json", lambda meta: meta["class_names"].__setitem__(0, "o"))


def pass_a_failed_gate(root: Path) -> None:
    """gate.json edited by hand: `passed` true, the failures removed, the failed check kept."""
    vouch(root, passed=False)
    edit_json(root / GATE, lambda gate: gate.update(passed=True, failed=[]))


def drop_the_file_record(root: Path) -> None:
    edit_json(root / GATE, lambda gate: gate.pop("files"))


def copy_the_benchmark(root: Path) -> None:
    shutil.copy(root / BENCHMARK, root / "reports" / "other.json")


def benchmark_another_release_file(root: Path) -> None:
    """benchmark.json names another file for the release than the one gate.json vouches for."""
    edit_json(
        root / BENCHMARK, lambda bench: bench["models"][RELEASE].update(file=f"models/{OTHER}.onnx")
    )
    vouch(root, release_file=RELEASE_FILE)


NOT_GATED = {  # case: (change to the workspace, extra arguments, fragment of the one line)
    "swapped release file": (
        swap_release_file,
        [],
        f"the release file {RELEASE_FILE} is not the one the gate judged (sha256 differs)",
    ),
    "edited meta.json": (
        rename_a_class,
        [],
        "the meta file data/prepared/meta.json is not the one the gate judged (sha256 differs)",
    ),
    "gate.json edited to passed": (
        pass_a_failed_gate,
        [],
        "not a gate result the gate stage wrote ('passed' is true but a check failed)",
    ),
    "gate.json from an older gate": (drop_the_file_record, [], "gate.json records no files"),
    "another benchmark.json": (
        copy_the_benchmark,
        ["--benchmark", "reports/other.json"],
        "not reports/benchmark.json the gate judged",
    ),
    "benchmark names another release file": (
        benchmark_another_release_file,
        [],
        f"models/{OTHER}.onnx, not {RELEASE_FILE} the gate judged",
    ),
}


@pytest.mark.parametrize("case", NOT_GATED)
def test_files_the_gate_did_not_judge_are_refused_in_one_line(workspace, capsys, no_server, case):
    change, args, fragment = NOT_GATED[case]
    change(workspace)
    line = refusal(capsys, workspace, *args)
    assert line.startswith("error: refusing to serve an ungated model: "), line
    assert fragment in line and "--allow-ungated" in line


def test_the_release_file_the_gate_judged_is_the_one_served(workspace):
    served = serve.load_release(root=workspace, gate=GATE, benchmark=BENCHMARK, prepared=PREPARED)
    assert served.card["gated"] is True and served.card["file"] == RELEASE_FILE
    assert served.card["warning"] is None


@pytest.mark.parametrize("allow", [False, True], ids=["gated", "allow-ungated"])
@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_a_model_file_outside_the_workspace_is_never_served(
    workspace, tmp_path, capsys, no_server, where, allow
):
    outside = tmp_path / "outside.onnx"  # a working model: the old server loaded it
    shutil.copy(workspace / RELEASE_FILE, outside)
    file = str(outside) if where == "absolute" else "../outside.onnx"
    edit_json(workspace / BENCHMARK, lambda bench: bench["models"][RELEASE].update(file=file))
    vouch(workspace)  # as the gate stage records it: the benchmark's file for the release
    line = refusal(capsys, workspace, *(["--allow-ungated"] if allow else []))
    assert f"the ONNX file of model '{RELEASE}' is {file}, outside the workspace" in line


def test_a_model_file_name_with_a_nul_byte_is_one_line(workspace, capsys, no_server):
    file = "models/a\0.onnx"
    edit_json(workspace / BENCHMARK, lambda bench: bench["models"][RELEASE].update(file=file))
    line = refusal(capsys, workspace, "--allow-ungated")
    assert f"model '{RELEASE}' has no valid file name ({file!r})" in line


def test_allow_ungated_serves_changed_files_with_the_reason_on_every_answer(
    workspace, tiny_prepared
):
    swap_release_file(workspace)
    served = serve.load_release(
        root=workspace, gate=GATE, benchmark=BENCHMARK, prepared=PREPARED, allow_ungated=True
    )
    reason = f"the release file {RELEASE_FILE} is not the one the gate judged (sha256 differs)"
    assert served.card["gated"] is False and reason in served.card["warning"]
    client = serve.create_app(served).test_client()
    html = client.get("/").get_data(as_text=True)
    assert 'id="ungated-warning"' in html and reason in html
    body = post(client, "digit.png", digit_png(tiny_prepared, 0)).get_json()
    assert body["model"]["gated"] is False and reason in body["model"]["warning"]
    assert client.get("/healthz").get_json()["gated"] is False


# --- start-up inputs ------------------------------------------------------------------------------


def test_a_malformed_meta_json_is_one_line_from_the_command(workspace):
    edit_json(workspace / PREPARED / "meta.json", lambda meta: meta.update(image_size="sixteen"))
    vouch(workspace)  # the pipeline wrote it so: the gate vouches for it, load_meta refuses it
    result = subprocess.run(
        [sys.executable, "-m", "resnet_slim.serve", "--root", str(workspace), "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,  # a server that wrongly started fails the test instead of hanging it
    )
    assert_one_line_error(result, 2, "meta.json", "image_size")


def test_a_model_with_non_finite_logits_is_refused_at_start(workspace, capsys, no_server):
    image_size = data.load_meta(workspace / PREPARED)["image_size"]
    linear = nn.Linear(3 * image_size * image_size, 10)
    with torch.no_grad():
        linear.bias.fill_(float("nan"))
    export_onnx(
        nn.Sequential(nn.Flatten(), linear),
        workspace / RELEASE_FILE,
        image_size=image_size,
        opset=17,
    )
    vouch(workspace)
    line = refusal(capsys, workspace)
    assert RELEASE_FILE in line and "non-finite logits (NaN or inf)" in line


# --- requests -------------------------------------------------------------------------------------


def test_too_many_form_fields_are_named_not_called_too_large(release, tiny_prepared):  # noqa: F811
    client = serve.create_app(release).test_client()

    def upload_with(fields: int):
        form = {f"field{i}": "x" for i in range(fields)}
        form["image"] = (io.BytesIO(digit_png(tiny_prepared, 0)), "digit.png")
        return client.post("/predict", data=form, content_type="multipart/form-data")

    response = upload_with(5_000)
    assert response.status_code == 413
    error = response.get_json()["error"]
    assert error.startswith(f"too many form fields: at most {serve_app.MAX_FORM_PARTS}"), error
    assert "MB" not in error
    assert upload_with(serve_app.MAX_FORM_PARTS).status_code == 413  # one part more than allowed
    assert upload_with(serve_app.MAX_FORM_PARTS - 1).status_code == 200  # the image is a part


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (end of file or reset); never blocks."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except OSError:  # reset: the server closed it while bytes were on the way
        return True


def send_byte(sock: socket.socket, byte: bytes) -> bool:
    """Send one byte; False if the connection is gone."""
    try:
        sock.sendall(byte)
    except OSError:
        return False
    return True


def test_slow_clients_cannot_starve_healthz(release):  # noqa: F811
    """CONNECTION_LIMIT clients trickling their headers took every connection: /healthz timed
    out. Now each new connection evicts its address's oldest one still sending a request."""
    header = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 16
    with running_server(serve.create_app(release)) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = [
            socket.create_connection(("127.0.0.1", port)) for _ in range(serve.CONNECTION_LIMIT)
        ]
        try:
            for second in range(4):  # well within the deadline: the cap makes room, not it
                for sock in slow:
                    send_byte(sock, header[second : second + 1])
                started = time.monotonic()
                with LOOPBACK.open(f"{url}/healthz", timeout=1) as response:
                    assert json.load(response)["status"] == "ok"
                assert time.monotonic() - started < 1
                time.sleep(1)
            closed = sum(closed_by_server(sock) for sock in slow)
        finally:
            for sock in slow:
                sock.close()
    # all but the newest few slow connections were evicted, one per newer connection
    assert serve.CONNECTION_LIMIT - serve.CLIENT_RECEIVING_LIMIT <= closed < serve.CONNECTION_LIMIT


def test_a_trickled_request_is_closed_at_the_deadline(release):  # noqa: F811
    """A byte every 0.5 s kept a connection open for ever (the idle timeout never fired)."""
    starts = {
        "headers": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",
        "body": (
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=x\r\n\r\n"
        ),
    }
    lasted = {}
    with running_server(serve.create_app(release)) as url:
        port = int(url.rsplit(":", 1)[1])
        clients = {name: socket.create_connection(("127.0.0.1", port)) for name in starts}
        try:
            for name, sock in clients.items():
                sock.sendall(starts[name])
            opened = time.monotonic()
            while len(lasted) < len(clients) and time.monotonic() - opened < 20:
                time.sleep(0.5)
                for name, sock in clients.items():
                    if name not in lasted and (closed_by_server(sock) or not send_byte(sock, b"a")):
                        lasted[name] = time.monotonic() - opened
        finally:
            for sock in clients.values():
                sock.close()
    assert set(lasted) == set(clients), lasted
    for name, seconds in lasted.items():
        assert serve.REQUEST_DEADLINE_S - 1 <= seconds <= serve.REQUEST_DEADLINE_S + 3, (
            name,
            lasted,
        )
