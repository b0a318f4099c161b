"""The toolbar page in a real browser: headless Chromium (Debian's) driven by Playwright, with a fake
microphone that plays a real recording, against the real proxy, bridge and engine."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the module is skipped below
    expect = None

from tests.conftest import ROOT
from tests.helpers import wer
from tests.speech import librispeech_samples, librispeech_text, read_wav16, without_pauses, write_wav16
from tests.test_proxy import ProxyProcess, add_key

FAIL_BETTER = re.compile("fail(ed)? better", re.IGNORECASE)
LONG_TURN = "2033-164914-0008"  # 17.3 s of read speech
OPEN_LINE_WITH_WORDS = """() => [...document.querySelectorAll('#transcript .seg.partial span')]
    .some((s) => s.textContent.trim().split(/\\s+/).length >= 2)"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / ".cache" / "artifacts"

pytestmark = pytest.mark.skipif(CHROMIUM is None or expect is None,
                                reason="Debian's chromium or Playwright is not installed")


@pytest.fixture(scope="module")
def page_stack(bridge, tmp_path_factory):
    work = tmp_path_factory.mktemp("toolbar")
    key = add_key(work / "api-keys.json", "browser")
    proxy = ProxyProcess(bridge.url, work)
    yield proxy, key
    proxy.stop()


@pytest.fixture(scope="module")
def microphone(beckett, tmp_path_factory) -> Path:
    """What the fake microphone plays: Beckett's lines, a pause, a LibriSpeech sentence with its
    pauses shortened (one long turn of 15 s), then silence."""
    samples = read_wav16(beckett) if _is_wav16(beckett) else None
    if samples is None:
        from tests.speech import ffmpeg_convert

        samples = read_wav16(ffmpeg_convert(beckett, tmp_path_factory.mktemp("mic") / "b16.wav", "-ac", "1",
                                            "-ar", "16000", "-sample_fmt", "s16"))
    out = tmp_path_factory.mktemp("mic") / "mic.wav"
    long_turn = without_pauses(librispeech_samples(LONG_TURN))
    return write_wav16(out, np.concatenate([np.zeros(8000, dtype=np.float32), samples,
                                            np.zeros(16000 * 2, dtype=np.float32), long_turn,
                                            np.zeros(16000 * 30, dtype=np.float32)]))


def _is_wav16(path: Path) -> bool:
    try:
        read_wav16(path)
        return True
    except (AssertionError, Exception):  # noqa: BLE001 - any other format is converted
        return False


@pytest.fixture(scope="module")
def browser(microphone):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}%noloop", "--autoplay-policy=no-user-gesture-required",
            "--no-sandbox"])
        yield b
        b.close()


def open_page(browser, proxy: ProxyProcess):
    context = browser.new_context()
    context.grant_permissions(["microphone"], origin=proxy.url)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(proxy.url + "/")
    return page, problems


def test_the_page_loads_without_a_key_and_has_no_outside_references(page_stack):
    proxy, _ = page_stack
    r = httpx.get(proxy.url + "/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for path in ("/static/app.js", "/static/pcm-worklet.js", "/static/vendor/openai-7.57.0.min.mjs"):
        asset = httpx.get(proxy.url + path)
        assert asset.status_code == 200 and "javascript" in asset.headers["content-type"], path
    for text in (r.text, httpx.get(proxy.url + "/static/app.js").text):
        assert "http://" not in text.replace("http://127.0.0.1", "") and "https://" not in text


def test_upload_mode_records_and_shows_the_text(browser, page_stack):
    proxy, key = page_stack
    page, problems = open_page(browser, proxy)
    page.fill("#key", key)
    page.select_option("#mode", "upload")
    page.click("#record")
    page.wait_for_selector("#record.on")
    page.wait_for_timeout(11500)  # the recording's 10.5 s
    page.click("#record")
    expect(page.locator("#transcript")).to_contain_text(FAIL_BETTER, timeout=60000)
    text = page.inner_text("#transcript").lower()
    assert "ever tried" in text and ":" in text  # segments with their times
    assert page.inner_text("#error") == "" and not problems
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "toolbar-upload.png"), full_page=True)
    page.context.close()


def test_live_mode_shows_text_while_speaking(browser, page_stack):
    proxy, key = page_stack
    page, problems = open_page(browser, proxy)
    page.fill("#key", key)
    page.select_option("#mode", "live")
    page.click("#record")
    # Text of the first lines appears while the recording still plays.
    page.locator("#transcript .seg:not(.partial)").nth(1).wait_for(timeout=30000)
    first = page.inner_text("#transcript").lower()
    assert "ever tried" in first
    expect(page.locator("#transcript")).to_contain_text(FAIL_BETTER, timeout=60000)
    # The long turn: its words show in an open (partial) line while it plays, then the line completes.
    try:
        page.wait_for_function(OPEN_LINE_WITH_WORDS, timeout=40000)
    except Exception as exc:  # noqa: BLE001 - say what the page showed instead
        raise AssertionError(f"no open line with words; the page shows: {page.inner_text('#transcript')!r}") from exc
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "toolbar-live-open-turn.png"), full_page=True)
    try:  # then every line completes, the long turn's among them
        page.wait_for_function("""() => !document.querySelector('#transcript .seg.partial')
            && document.querySelectorAll('#transcript .seg').length >= 7""", timeout=60000)
    except Exception as exc:  # noqa: BLE001 - say what the page showed instead
        raise AssertionError(f"lines still open; the page shows: {page.inner_text('#transcript')!r}") from exc
    lines = page.locator("#transcript .seg span").all_inner_texts()
    long_turn = " ".join(line for line in lines if not FAIL_BETTER.search(line) and "ever" not in line.lower()
                         and "again" not in line.lower() and "matter" not in line.lower())
    assert wer(librispeech_text(LONG_TURN), long_turn) <= 0.35, lines
    page.click("#record")
    assert page.inner_text("#error") == "" and not problems
    page.screenshot(path=str(ARTIFACTS / "toolbar-live.png"), full_page=True)
    page.context.close()


def test_a_wrong_key_shows_the_error_in_words(browser, page_stack, beckett):
    proxy, _ = page_stack
    page, _ = open_page(browser, proxy)
    page.fill("#key", "sk-mvp-not-a-real-key-000000000000")
    page.set_input_files("#file", str(beckett))
    expect(page.locator("#error")).to_contain_text("API key was refused", timeout=30000)
    page.select_option("#mode", "live")
    page.click("#record")
    expect(page.locator("#error")).to_contain_text("refused", timeout=30000)
    expect(page.locator("#status")).to_contain_text("refused")
    expect(page.locator("#record")).to_have_text("Record")  # not left "recording"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "toolbar-wrong-key.png"), full_page=True)
    page.context.close()


def test_speakers_are_shown_when_the_diarize_model_is_chosen(browser, diarizing, tmp_path):
    """A two-voice recording picked as a file, with "who spoke when": each line says who spoke it."""
    from tests.speech import conversation

    path, _ = conversation(tmp_path / "talk.wav", ["1688", "2609"], turns=4)
    page, problems = open_page(browser, diarizing)
    page.fill("#key", diarizing.key)
    page.dispatch_event("#key", "change")  # the model list loads with the key
    expect(page.locator("#model option[value='gpt-4o-transcribe-diarize']")).to_have_count(1, timeout=30000)
    page.select_option("#model", "gpt-4o-transcribe-diarize")
    page.set_input_files("#file", str(path))
    expect(page.locator("#status")).to_contain_text("Done", timeout=180000)
    speakers = [text.split(":")[0] for text in page.locator("#transcript .seg span").all_inner_texts()]
    assert [s for i, s in enumerate(speakers) if not i or speakers[i - 1] != s] == ["A", "B", "A", "B"], speakers
    assert page.inner_text("#error") == "" and not problems
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "toolbar-speakers.png"), full_page=True)
    page.context.close()
