"""The chat page with audio, in headless Chromium: an attached recording answered as generate()
answers it, and a microphone recording (Chromium's fake capture device playing a fixture clip)
made in the page, shown while it runs, encoded to WAV there, sent and played back."""

import base64
import io
from contextlib import contextmanager

import pytest
import soundfile

import phi3v_mlx
from phi3v_mlx.generate import chat_prompt
from tests.helpers import serving
from tests.test_chat_page import (
    CHROMEDRIVER,
    CHROMIUM,
    _answers,
    _ask,
    _by_id,
    _set,
    _wait,
    _wait_answer,
)
from tests.test_speech import LONGER, QUESTION, SHORT, speech_checkpoint

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no headless browser: install Debian's chromium and chromium-driver (.ci/run does)",
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = speech_checkpoint(tmp_path_factory.mktemp("page") / "tiny-phi4mm")
    return phi3v_mlx.load(folder, dtype="float32")


@contextmanager
def browser(tmp_path, capture):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--window-size=1100,820", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required",
                 f"--use-file-for-fake-audio-capture={capture}",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_sends_an_attached_clip_and_a_microphone_recording(loaded, tmp_path):
    model, processor = loaded
    with serving(*loaded, max_tokens=6) as base:
        with browser(tmp_path, LONGER) as driver:
            driver.get(base)
            _wait(lambda: _by_id(driver, "model").text == "tiny")
            _by_id(driver, "toggle-settings").click()
            _set(driver, "max-tokens", 6)
            driver.execute_script("document.getElementById('audio-file').hidden = false")
            _by_id(driver, "audio-file").send_keys(str(SHORT))
            _wait(lambda: len(driver.find_elements("css selector", "#pending audio")) == 1)
            _ask(driver, QUESTION)
            first = _wait_answer(driver, 1)
            expected = phi3v_mlx.generate(model, processor, chat_prompt(processor, QUESTION,
                                          audios=1), audios=[SHORT], max_tokens=6)  # fmt: skip
            assert first == expected.text
            assert driver.find_elements("css selector", ".message.user audio")

            _by_id(driver, "record").click()
            _wait(lambda: _by_id(driver, "recording").is_displayed())
            assert "Recording" in _by_id(driver, "recording").text
            assert _by_id(driver, "record").text == "Stop recording"
            _wait(lambda: "0:02" in _by_id(driver, "recording").text, seconds=20)
            _by_id(driver, "record").click()
            _wait(lambda: len(driver.find_elements("css selector", "#pending audio")) == 1)
            assert not _by_id(driver, "recording").is_displayed()
            url = driver.find_element("css selector", "#pending audio").get_attribute("src")
            assert url.startswith("data:audio/wav;base64,")
            samples, rate = soundfile.read(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            assert samples.ndim == 1 and len(samples) / rate >= 1.5
            assert abs(samples).max() > 0.01  # the fake device played the clip, not silence
            _ask(driver, "And this one?")
            _wait_answer(driver, 2)
            assert len(driver.find_elements("css selector", ".message.user audio")) == 2
            assert _answers(driver)[1].find_element("css selector", ".stats").text
