"""`mmtune web` in a real browser: headless Chromium driven by Playwright.

The app is served on a free 127.0.0.1 port with the tiny built-in model: in this process
(:func:`mmtune.serve.web.launch`, sharing the already loaded model) for the default tests,
and as ``python -m mmtune.serve.web`` in a subprocess for the composed multimodal model.
Screenshots go to ``test-artifacts/`` in the repository root. Skipped only where Chromium
(``/usr/bin/chromium``, Debian package ``chromium``) or the Playwright package is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path(os.environ.get("MMTUNE_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

if not CHROMIUM.exists():
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set MMTUNE_CHROMIUM)",
                allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebApp:
    """``python -m mmtune.serve.web`` in a subprocess, waited for with a bounded loop."""

    def __init__(self, model: Path, workdir: Path, runs: Path):
        from mmtune.models.tiny import default_cache_root

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "web.log"
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "MMTUNE_CACHE": str(default_cache_root().resolve())}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mmtune.serve.web", "--model", str(model), "--port", str(self.port),
             "--runs-dir", str(runs)], cwd=workdir, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 150.0) -> WebApp:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmtune web exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mmtune web did not answer in {timeout:.0f} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, write_continual_report):
    runs = tmp_path_factory.mktemp("runs")
    write_continual_report(runs / "continual-replay")
    return runs


class InProcessWeb:
    """:func:`mmtune.serve.web.launch` in this process (returns once the server is up)."""

    def __init__(self, backend, runs: Path):
        from mmtune.serve.web import launch

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = launch(host="127.0.0.1", port=self.port, runs_dir=str(runs), backend=backend,
                          prevent_thread_lock=True)

    def tail(self) -> str:
        return "(in-process server: see the captured output)"

    def stop(self) -> None:
        self.app.close()


@pytest.fixture(scope="module")
def web(text_backend, runs_dir):
    app = InProcessWeb(text_backend, runs_dir)
    yield app
    job = app.app.mmtune_jobs.job
    if job is not None and job.alive:  # a run the test left going: stop it, keep the thread short
        job.stop()
        job.join(120)
    app.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1400, "height": 950})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()


def shot(page, name: str, full_page: bool = False) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def open_chat(page, url: str):
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    box = page.locator("#mm-input textarea")
    box.wait_for(state="visible", timeout=60_000)
    return box


def watch_reply(page, timeout: float = 60.0) -> list[str]:
    """Poll the last assistant message until generation ends (the input is enabled again);
    returns the texts seen, in order."""
    seen: list[str] = []
    box = page.locator("#mm-input textarea")
    bots = page.locator("#mm-chat .bot")
    deadline = time.monotonic() + timeout
    started = False
    while time.monotonic() < deadline:
        text = bots.last.inner_text() if bots.count() else ""
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        started = started or not box.is_enabled()
        if started and box.is_enabled() and seen:
            break
        time.sleep(0.1)
    return seen


def test_chat_reply_streams_into_the_page(web, page):
    box = open_chat(page, web.url)
    assert " ".join(page.locator("#mm-route").inner_text().split()) == "Answering: base model"
    assert "tiny" in page.locator("#mm-header").inner_text()
    box.fill("What is 3 + 4?")
    box.press("Enter")
    seen = watch_reply(page)
    assert seen, f"no reply appeared; server log:\n{web.tail()}"
    lengths = [len(s) for s in seen]
    # streamed, not shown all at once: the text grew several times while the page was watched
    # (Markdown rendering may drop a character when, say, a second `*` closes an emphasis)
    grew = sum(b > a for a, b in zip(lengths, lengths[1:]))
    assert grew >= 2 and lengths[-1] > lengths[0] > 0, f"the reply did not grow over time: {lengths}"
    assert "What is 3 + 4?" in page.locator("#mm-chat .user").first.inner_text()
    shot(page, "web_chat.png")


def test_stop_button_ends_the_reply_and_frees_the_model(web, page):
    box = open_chat(page, web.url)
    box.fill("Tell me a long story.")
    box.press("Enter")
    bots = page.locator("#mm-chat .bot")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (bots.count() and len(bots.last.inner_text()) > 10):
        time.sleep(0.1)
    page.locator("#mm-input button.stop-button").click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not box.is_enabled():
        time.sleep(0.1)
    assert box.is_enabled(), "the input stayed disabled after Stop"
    stopped = bots.last.inner_text()
    time.sleep(1.5)
    assert bots.last.inner_text() == stopped  # no more text after Stop
    box.fill("What is 3 + 4?")  # the model is free again: the next message gets a reply
    box.press("Enter")
    seen = watch_reply(page)
    assert page.locator("#mm-chat .bot").count() == 2 and seen and seen[-1] != stopped


def test_image_upload_reaches_the_model(web, page, tmp_path):
    from PIL import Image, ImageDraw

    img = tmp_path / "red_circle.png"
    im = Image.new("RGB", (96, 96), (240, 240, 255))
    ImageDraw.Draw(im).ellipse((18, 18, 78, 78), fill=(220, 40, 40))
    im.save(img)
    box = open_chat(page, web.url)
    page.locator("#mm-input input[type=file]").set_input_files(str(img))
    page.locator("#mm-input img").first.wait_for(state="visible")  # the upload's thumbnail
    box.fill("What shape is this?")
    box.press("Enter")
    seen = watch_reply(page)
    assert seen, f"no reply appeared; server log:\n{web.tail()}"
    final = seen[-1]
    # the backend got the file (it names it) and, having no vision encoder, says so
    assert "no vision encoder" in final and "red_circle.png" in final
    assert len(final.split("text only.", 1)[-1].strip()) > 0  # and still answers the text
    assert page.locator("#mm-chat .user img").count() >= 1  # the image is shown in the conversation
    shot(page, "web_chat_image.png")


def test_reports_tab_shows_a_continual_report(web, page):
    open_chat(page, web.url)
    page.get_by_role("tab", name="Reports").click()
    report = page.locator("#mm-report")
    report.get_by_text(re.compile("Continual learning report")).wait_for()
    assert report.locator('img[src^="data:image/png"]').count() == 2  # heatmap and curves inline
    assert "Average accuracy" in report.inner_text()
    shot(page, "web_reports.png", full_page=True)


@pytest.mark.slow
def test_train_tab_runs_stops_and_opens_the_result(web, page, tmp_path):
    out = tmp_path / "run"
    open_chat(page, web.url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#mm-overrides textarea").fill(
        # quickstart trains full weights; a LoRA run shows its adapter in the route badge once opened
        f"train.output_dir={out}\ntrain.max_steps=300\ntrain.eval_every=2\ntrain.save_every=1000\nadapter.type=lora")
    page.locator("#mm-start").click()
    progress = page.locator("#mm-progress")
    progress.wait_for(timeout=60_000)
    deadline = time.monotonic() + 120
    step = 0
    while time.monotonic() < deadline:
        m = re.search(r"step (\d+) / 300", progress.inner_text())
        step = int(m[1]) if m else 0
        if step >= 3 and "eval loss" in progress.inner_text():
            break
        time.sleep(0.5)
    assert step >= 3, f"training made no progress; server log:\n{web.tail()}"
    shot(page, "web_train_running.png", full_page=True)
    page.locator("#mm-stop").click()
    page.locator("#mm-train-status").get_by_text("Run stopped").wait_for(timeout=120_000)
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (out / "final" / "meta.json").is_file()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert step <= stopped_at < 300
    assert f"step {stopped_at} / 300" in progress.inner_text()
    shot(page, "web_train_stopped.png", full_page=True)
    page.locator("#mm-chat-result").click()
    page.locator("#mm-header").get_by_text("run/final").wait_for(timeout=60_000)
    assert "LoRA adapter run/final" in " ".join(page.locator("#mm-route").inner_text().split())


@pytest.mark.slow
def test_composed_model_routes_images_to_its_vision_adapter(composed_dir, runs_dir, browser, tmp_path):
    from PIL import Image

    app = WebApp(composed_dir, tmp_path, runs_dir).wait()
    try:
        ctx = browser.new_context(viewport={"width": 1400, "height": 950})
        page = ctx.new_page()
        page.set_default_timeout(30_000)
        img = tmp_path / "square.png"
        Image.new("RGB", (64, 64), (30, 160, 60)).save(img)
        box = open_chat(page, app.url)
        assert "image" in page.locator("#mm-header").inner_text()
        page.locator("#mm-input input[type=file]").set_input_files(str(img))
        page.locator("#mm-input img").first.wait_for(state="visible")
        box.fill("Describe the image briefly.")
        box.press("Enter")
        seen = watch_reply(page)
        assert seen and "no vision encoder" not in seen[-1]
        page.locator("#mm-route").get_by_text("vision").wait_for()
        shot(page, "web_chat_multimodal.png")
        ctx.close()
    finally:
        app.stop()
