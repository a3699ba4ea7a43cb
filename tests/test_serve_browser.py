"""The web UI in a real browser: headless Debian chromium driven by Playwright over loopback.

Uploads a digit, waits for the top-3 list, and saves reports/serve_screenshot.png (the README
shows it). Without chromium the test is skipped, except on CI (CI set), where it fails.
"""

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

# pipeline_root and release are fixtures, used by name
from test_serve import RELEASE, digit_png, pipeline_root, post, release, running_server  # noqa: F401

from resnet_slim import serve

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "reports" / "serve_screenshot.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-proxy-server",
]


def chromium_path() -> str:
    # $CHROMIUM: another Chromium build (GitHub's Ubuntu runners ship one under another name)
    path = (
        os.environ.get("CHROMIUM")
        or shutil.which("chromium")
        or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    )
    if path is None:
        reason = (
            "chromium not found: install Debian's chromium (apt-get install chromium, or "
            "make browser as root) or set CHROMIUM to a Chromium binary"
        )
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return path


# the `release` parameter is the fixture imported from test_serve (F811 is a false positive)
def test_upload_in_a_real_browser_shows_the_top3(release, tiny_prepared, tmp_path):  # noqa: F811
    upload = tmp_path / "digit.png"
    upload.write_bytes(digit_png(tiny_prepared, 2, scale=16))  # 128 px: a visible preview
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("just some text\n")
    app = serve.create_app(release)
    expected = post(app.test_client(), "digit.png", upload.read_bytes()).get_json()["predictions"]

    with running_server(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 640})
            problems, foreign = [], []
            page.on(
                "console",
                lambda msg: (
                    msg.type == "error"
                    and "status of 400" not in msg.text
                    and problems.append(msg.text)
                ),
            )  # the 400 is the bad upload below
            page.on("pageerror", lambda err: problems.append(str(err)))
            page.on(
                "request",
                lambda req: req.url.startswith((url, f"blob:{url}")) or foreign.append(req.url),
            )  # blob: is the local preview
            page.goto(url)
            expect(page.locator("#model-name")).to_have_text(RELEASE)

            # A bad upload shows its message and leaves the page usable.
            page.set_input_files("#file", str(not_an_image))
            expect(page.locator("#error")).to_contain_text("not a recognised image")

            page.set_input_files("#file", str(upload))
            rows = page.locator("#predictions li")
            expect(rows).to_have_count(3)
            expect(page.locator("#error")).to_be_hidden()
            labels = [rows.nth(i).locator(".label").inner_text() for i in range(3)]
            assert labels == [p["class"] for p in expected]
            expect(page.locator("#latency")).to_contain_text(" ms")
            expect(page.locator("#preview")).to_be_visible()
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert problems == [], problems  # e.g. a script or stylesheet blocked by the CSP
    assert foreign == [], foreign  # the page loads nothing from outside the server
