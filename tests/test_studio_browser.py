"""The studio end to end in a real browser: Debian's Chromium, driven by Playwright, against
`dreamloom studio` on localhost. A new user's first session: make a dataset, upload four pictures,
set the trigger, train the default recipe (toy-lora, on the pretrained toy base) with a checkpoint
and preview every 10 steps, watch it finish with a sample picture and the checkpoint grid, export
the checkpoint of step 10, download the kohya file; the download then loads in dreamloom's sampler.

Skipped only where no browser can be had (no Chromium, or no Playwright package)."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from dreamloom.jobs.queue import JobQueue
from dreamloom.models import load_base
from dreamloom.sampling import attach_loras, generate
from dreamloom.sampling.lora_files import read_lora
from helpers import write_subject_images

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no Chromium to drive: `apt-get install chromium` (Debian) enables this test", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the Playwright package is missing: `pip install playwright` enables this test")
# Playwright's own browser downloads are not used: Debian's Chromium, with nothing it would fetch.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# an image element can be in the page before its picture has arrived: wait for it to decode
LOADED_WIDTH = "img => img.decode().then(() => img.naturalWidth)"
SECOND = 1000  # Playwright counts in milliseconds
TRIGGER = "zwx"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return pids


@contextmanager
def run_studio(tmp_path, env):
    """`dreamloom studio` on a free port; stopped (with its worker) at the end."""
    home, port = tmp_path / "home", free_port()
    log = open(tmp_path / "studio.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "dreamloom", "studio", "--home", str(home), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"the studio did not start:\n{(tmp_path / 'studio.log').read_text()}")
            time.sleep(0.5)
    try:
        yield url, home
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    assert processes_mentioning(str(home)) == [], "the worker outlived the studio"


@pytest.fixture
def studio(tmp_path, cli_env):
    with run_studio(tmp_path, cli_env) as running:
        yield running


def open_browser(playwright, profile: Path):
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, accept_downloads=True,
        viewport={"width": 1400, "height": 1000})


def test_first_session_in_a_real_browser(studio, tmp_path):
    url, home = studio
    pictures = write_subject_images(tmp_path / "pictures")
    with sync_api.sync_playwright() as playwright:
        browser = open_browser(playwright, tmp_path / "profile")
        page = browser.new_page()
        page.set_default_timeout(60 * SECOND)
        try:
            page.goto(url)
            page.get_by_role("textbox", name="Name", exact=True).fill("stars")
            page.get_by_role("textbox", name="Class word", exact=True).fill("star")
            page.get_by_role("button", name="Create dataset").click()
            page.get_by_text("Dataset 'stars' created").wait_for()

            page.locator("input[type=file]").first.set_input_files([str(p) for p in pictures])
            page.get_by_role("button", name="Add to dataset").click()
            page.get_by_text("Added 4 picture(s)").wait_for()
            page.get_by_role("textbox", name="Trigger word", exact=True).locator("visible=true").fill(TRIGGER)
            page.get_by_role("button", name="Save words").click()
            page.get_by_text("Saved.").wait_for()

            page.get_by_role("link", name=re.compile("Train")).click()
            for name, value in (("Training steps", "20"), ("Checkpoint every N steps", "10"),
                                ("Preview pictures every N steps", "10")):
                field = page.get_by_role("spinbutton", name=name)
                field.fill(value)
                field.press("Enter")
            page.get_by_role("button", name=re.compile(r"Train$")).click()
            page.get_by_text("Job 1 is queued").wait_for()

            page.get_by_role("link", name=re.compile("Follow it on the Jobs page")).click()
            page.get_by_text("finished: 20 steps").wait_for(timeout=600 * SECOND)
            sample = page.locator("[data-testid=stImage] img").first
            sample.wait_for()
            assert sample.evaluate(LOADED_WIDTH) > 0
            page.get_by_text("Checkpoints side by side").wait_for()  # the grid of steps 10 and 20

            page.reload()  # the page stops refreshing itself once no job is live: a menu stays open
            page.get_by_text("Checkpoints side by side").wait_for()
            checkpoint = page.get_by_role("combobox", name="Checkpoint")
            checkpoint.click()
            page.keyboard.type("step 10")  # the picker filters as one types
            page.keyboard.press("Enter")
            sync_api.expect(checkpoint).to_have_value("step 10")
            page.get_by_role("button", name="Export this checkpoint").click()
            page.get_by_text("Exported step 10").wait_for(timeout=120 * SECOND)

            page.get_by_role("link", name=re.compile("Library")).first.click()
            with page.expect_download() as download:
                page.get_by_role("button", name=re.compile(rf"{TRIGGER}-lora\.safetensors · kohya")).click()
            downloaded = tmp_path / "downloads" / download.value.suggested_filename
            download.value.save_as(downloaded)

            # try it: a queued `dreamloom sample` job the studio's own worker draws; the panel polls for it
            page.get_by_role("button", name="Generate").click()
            page.get_by_text(f"{TRIGGER}-lora.safetensors at strength 1", exact=True).wait_for(timeout=180 * SECOND)
            tried = page.locator("[data-testid=stImage] img").last
            assert tried.evaluate(LOADED_WIDTH) > 64  # the base alone beside the LoRA
        except sync_api.TimeoutError:
            print("alerts on the page:", page.locator("[data-testid=stAlert]").all_inner_texts())
            raise
        finally:
            browser.close()

    assert 'name = "toy-lora"' in JobQueue(home).get(1).recipe  # the default recipe, on the toy base
    export = next((home / "runs").glob(f"*/exports/{TRIGGER}-lora.safetensors"))
    assert downloaded.read_bytes() == export.read_bytes() and read_lora(downloaded)[0] == "kohya"
    at_10 = next((home / "runs").glob(f"*/exports/step-10/{TRIGGER}-lora.safetensors"))
    assert read_lora(at_10)[0] == "kohya" and at_10.read_bytes() != export.read_bytes()
    base = load_base("toy")
    pipe = base.pipeline()
    attach_loras(pipe, base, [(downloaded, 1.0)])
    assert generate(pipe, [f"a {TRIGGER} star on a pink background"], steps=2, guidance_scale=3.0)[0].size == (64, 64)


PASSWORD = "team-secret-42"


def status_of(url: str, method: str = "GET", cookie: str | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers={"Cookie": cookie} if cookie else {})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        return opener.open(request, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def websocket_status(url: str, cookie: str | None = None) -> str:
    """The status line Streamlit's websocket answers an upgrade request with."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n").encode())
        return s.recv(1024).decode(errors="replace").splitlines()[0]


def test_a_shared_studio_lets_nobody_in_without_the_password(tmp_path, cli_env):
    """A studio with a password: no page, upload, media file or websocket without logging in, also
    by direct URL; a wrong password is refused; with it the normal flow works and jobs say who
    submitted them."""
    with run_studio(tmp_path, dict(cli_env, DREAMLOOM_PASSWORD=PASSWORD)) as (url, home):
        pictures = write_subject_images(tmp_path / "pictures")
        with sync_api.sync_playwright() as playwright:
            browser = open_browser(playwright, tmp_path / "profile")
            page = browser.new_page()
            page.set_default_timeout(60 * SECOND)
            page.goto(url + "/jobs")
            page.get_by_label("Your name").fill("ann")
            page.get_by_label("Password").fill("not the password")
            page.get_by_role("button", name="Log in").click()
            page.get_by_text("wrong password").wait_for()
            assert page.locator("[data-testid=stSidebar]").count() == 0
            page.get_by_label("Your name").fill("ann")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Log in").click()
            page.get_by_text("Logged in as").wait_for()
            assert page.url.endswith("/jobs")  # back where the visitor was going

            page.get_by_role("link", name=re.compile("Datasets")).click()
            page.get_by_role("textbox", name="Name", exact=True).fill("stars")
            page.get_by_role("textbox", name="Class word", exact=True).fill("star")
            page.get_by_role("button", name="Create dataset").click()
            page.get_by_text("Dataset 'stars' created").wait_for()
            page.locator("input[type=file]").first.set_input_files([str(p) for p in pictures])
            page.get_by_role("button", name="Add to dataset").click()
            page.get_by_text("Added 4 picture(s)").wait_for()
            thumb = page.locator("[data-testid=stImage] img").first
            assert thumb.evaluate(LOADED_WIDTH) > 0
            media = urllib.parse.urljoin(url + "/", thumb.get_attribute("src"))
            cookie = "; ".join(f"{c['name']}={c['value']}" for c in browser.cookies())
            # a media file lives as long as the page showing it: asked for now, without and with the session
            assert status_of(media) == 401 and status_of(media, cookie=cookie) == 200

            page.get_by_role("link", name=re.compile("Train")).click()
            field = page.get_by_role("spinbutton", name="Training steps")
            field.fill("2")
            field.press("Enter")
            page.get_by_role("button", name=re.compile(r"Train$")).click()
            page.get_by_text("Job 1 is queued").wait_for()
            page.get_by_role("link", name=re.compile("Follow it on the Jobs page")).click()
            page.locator("[data-testid=stDataFrame]").wait_for()
            browser.close()

        # without the session cookie: nothing but the login page, by any URL
        assert status_of(url + "/") == 303 and status_of(url + "/library") == 303
        for path in ("/_stcore/host-config", "/_stcore/upload_file/session/file", "/static/js/index.js"):
            assert status_of(url + path) == 401, path
        assert status_of(url + "/_stcore/upload_file/session/file", method="PUT") == 401
        assert " 403 " in websocket_status(url) and " 101 " in websocket_status(url, cookie)
        assert JobQueue(home).get(1).submitted_by == "ann"
    assert PASSWORD not in (tmp_path / "studio.log").read_text()

