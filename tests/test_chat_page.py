"""The chat page at / driven in a real headless browser (Debian's chromium and chromedriver)."""

import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import IMAGES
from tests.test_server import live_server, reference

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no headless browser: install Debian's chromium and chromium-driver (.ci/run does)",
)


@contextmanager
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1100,820",
                 f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def _by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def _set(driver, name, value):
    field = _by_id(driver, name)
    field.clear()
    field.send_keys(str(value))


def _attach(driver, path):
    driver.execute_script("document.getElementById('file').hidden = false")
    _by_id(driver, "file").send_keys(str(path))
    driver.execute_script("document.getElementById('file').hidden = true")


def _ask(driver, text):
    from selenium.webdriver.common.keys import Keys

    _by_id(driver, "input").send_keys(text, Keys.ENTER)


def _answers(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant")


def _wait(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "the page did not get there"
        time.sleep(0.05)


def _wait_answer(driver, count):
    _wait(lambda: len(_answers(driver)) >= count
          and _answers(driver)[count - 1].get_attribute("data-done") == "true")  # fmt: skip
    return (
        _answers(driver)[count - 1]
        .find_element("css selector", ".text")
        .get_attribute("textContent")
    )


def test_chat_page_conversation_stop_and_errors(tmp_path):
    image = IMAGES / "b_small.png"
    with live_server() as base, browser(tmp_path) as driver:
        driver.get(base)
        _wait(lambda: _by_id(driver, "model").text == "tiny")
        _by_id(driver, "toggle-settings").click()
        _set(driver, "max-tokens", 6)
        _set(driver, "temperature", 0)
        _set(driver, "num-crops", 4)
        _attach(driver, image)
        _wait(lambda: len(driver.find_elements("css selector", "#pending img")) == 1)
        _ask(driver, "What is in this picture?")
        first = _wait_answer(driver, 1)
        parts = [{"type": "image_url", "image_url": {"url": "x"}},
                 {"type": "text", "text": "What is in this picture?"}]  # fmt: skip
        question = {"role": "user", "content": parts}
        assert first == reference([question], [image], 6).text
        assert driver.find_elements("css selector", ".message.user .thumbs img")
        assert "tok/s" in _answers(driver)[0].find_element("css selector", ".stats").text
        shot = tmp_path / "chat-page.png"  # docs/chat-page.png is one of these
        driver.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        _ask(driver, "And the colours?")
        second = _wait_answer(driver, 2)
        again = {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]}
        follow = [question, {"role": "assistant", "content": first}, again]
        assert second == reference(follow, [image], 6).text

        _set(driver, "max-tokens", 3000)
        _ask(driver, "Now tell me a very long story.")
        _wait(lambda: len(_answers(driver)) == 3
              and _answers(driver)[2].find_element("css selector", ".text").text)  # fmt: skip
        _by_id(driver, "stop").click()
        _wait(lambda: _answers(driver)[2].get_attribute("data-done") == "true")
        _wait(lambda: httpx.get(f"{base}/health").json()["in_flight"] == 0)
        assert _by_id(driver, "send").is_displayed()

        broken = tmp_path / "broken.png"
        broken.write_bytes(b"this is not a png")
        _attach(driver, broken)
        _wait(lambda: len(driver.find_elements("css selector", "#pending img")) == 1)
        _ask(driver, "What is this?")
        _wait(lambda: _by_id(driver, "error").is_displayed())
        error = _by_id(driver, "error").text
        assert error == "image 2 (bytes) cannot be read: not an image format Pillow knows"
        assert len(_answers(driver)) == 3  # no blank answer was left behind

        _by_id(driver, "new").click()
        assert _answers(driver) == []


def test_chat_page_asks_for_the_api_key_once(tmp_path):
    with live_server(api_key="sesame") as base, browser(tmp_path) as driver:
        driver.get(base)
        _wait(lambda: _by_id(driver, "key-form").is_displayed())
        _set(driver, "api-key", "sesame")
        _by_id(driver, "use-key").click()
        _wait(lambda: _by_id(driver, "model").text == "tiny")
        _by_id(driver, "toggle-settings").click()
        _set(driver, "max-tokens", 4)
        _ask(driver, "Hello!")
        assert _wait_answer(driver, 1)
        driver.refresh()  # the key is kept for the session
        _wait(lambda: _by_id(driver, "model").text == "tiny")
        assert not _by_id(driver, "key-form").is_displayed()


def test_the_page_loads_nothing_from_elsewhere():
    page = (ROOT / "phi3v_mlx" / "static" / "chat.html").read_text()
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "innerHTML" not in page
    with live_server() as base:
        response = httpx.get(base)
    assert response.status_code == 200 and "phi3v-mlx chat" in response.text
    assert "default-src 'none'" in response.headers["content-security-policy"]
