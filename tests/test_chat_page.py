"""The chat page at / (dllama_mpi/serving/static/): its files as the app serves them, and the page itself in a real
headless Chromium against a served model: the API key asked for, a streamed answer, Stop, a second turn, a reload.

The browser is Debian's `chromium`, driven by selenium through Debian's `chromium-driver` (the same build as the
browser: WebDriver's protocol is matched to it by the distribution). .ci/run installs both and sets
DLLAMA_REQUIRE_BROWSER=1, so there a missing browser fails the browser test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from test_api import FakeBackend, fake_prompt_ids
from test_serve import Server

from dllama_mpi.serving import api

KEY = "sk-page"
AUTH = {"Authorization": f"Bearer {KEY}"}
PHONE = (390, 844)  # a phone's CSS pixels: the page must fit its width
JS_TYPES = {"text/javascript", "application/javascript"}  # both are JavaScript to a browser; Python's mimetypes picks


def test_the_page_and_its_files_are_served_with_their_types_without_the_key_while_loading():
    backend = FakeBackend()
    backend.ready.clear()  # loading: the /v1 endpoints answer 503, the page must not
    server = api.Server(api.make_app(backend, api_key=KEY), "127.0.0.1", 0)
    server.start()
    try:
        with httpx2.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http:
            page = http.get("/")
            assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
            assert page.headers["content-security-policy"] == api._PAGE_HEADERS["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
            assert sorted(assets) == ["static/chat.css", "static/chat.js"]
            types = {a: http.get("/" + a).headers["content-type"].split(";")[0] for a in assets}
            assert types["static/chat.css"] == "text/css" and types["static/chat.js"] in JS_TYPES, types
            assert http.get("/static/chat.js").headers["x-content-type-options"] == "nosniff"
            assert http.get("/static/chat.js").text == (api.STATIC / "chat.js").read_text()
            missing = http.get("/static/nothing.js")
            assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"
            assert http.get("/static/%2E%2E/api.py").status_code == 404  # the open path leads nowhere else
            assert http.get("/v1/models").status_code == 401  # the key still guards the API
            assert http.get("/v1/models", headers=AUTH).status_code == 503  # and loading refuses it
    finally:
        server.stop()
    text = backend.metrics.render()[0].decode()
    counted = {(s.labels["endpoint"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "dllama_requests_total"}
    assert counted[("/", "200")] == 1 and counted[("/static", "200")] == 4 and counted[("/static", "404")] == 2


# ---------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        problem = "Debian's chromium and chromium-driver are not installed"
        if os.environ.get("DLLAMA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DLLAMA_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(f"{problem} (`apt-get install chromium chromium-driver`)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    options.add_argument("--headless=new")
    options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root, as CI runs
    # a phone's screen (a window is at least 500 pixels wide)
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": PHONE[0], "height": PHONE[1]}})
    session = webdriver.Chrome(options=options, service=Service(driver))
    session.set_page_load_timeout(30)
    session.set_script_timeout(30)
    yield session
    session.quit()


def metrics(server: Server) -> dict[str, float]:
    """The server's unlabelled metrics (Server.metrics sends no API key)."""
    text = httpx2.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def wait(driver, what, message: str, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(what, message)


def bubbles(driver) -> list[tuple[str, str, str]]:
    """(role, text, what is shown under it) of each message shown, read in one go."""
    return [tuple(b) for b in driver.execute_script(
        "return [...document.querySelectorAll('#log .msg')].map(m => [m.classList[1],"
        " m.querySelector('.text').textContent, m.querySelector('.meta').textContent])")]


def answer_text(driver) -> str:
    shown = bubbles(driver)
    return shown[-1][1] if shown and shown[-1][0] == "assistant" else ""


def ready(driver) -> bool:
    return driver.find_element(By.ID, "send").is_enabled() and not driver.find_element(By.ID, "stop").is_enabled()


def set_field(driver, field: str, value: str) -> None:
    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


@pytest.mark.serve
def test_the_page_waits_for_the_model_and_shows_errors_readably(browser, monkeypatch):
    """Against the fake backend (no MPI): "loading" until the model is ready, then an error answer's message, with the
    question given back to the input box."""
    monkeypatch.setattr("dllama_mpi.serving.templates.prompt_ids", fake_prompt_ids)
    backend = FakeBackend()
    backend.ready.clear()
    server = api.Server(api.make_app(backend), "127.0.0.1", 0)
    server.start()
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        model = browser.find_element(By.ID, "model")
        wait(browser, lambda d: model.text == "the model is loading…", "the page does not say the model is loading", 10)
        assert not browser.find_element(By.ID, "send").is_enabled()
        backend.ready.set()
        wait(browser, lambda d: model.text == "model: fake-model" and ready(d), "the page did not connect once loaded", 10)
        question = "x" * backend.max_seq_len  # longer than the fake's context
        browser.find_element(By.ID, "message").send_keys(question, Keys.ENTER)
        error = browser.find_element(By.ID, "error")
        wait(browser, lambda d: error.is_displayed() and ready(d), "no error was shown", 10)
        assert re.fullmatch(r"the prompt is at least \d+ tokens \(\d+ bytes\) but the context holds 64; shorten the "
                            r"conversation", error.text), error.text
        assert bubbles(browser) == [] and browser.find_element(By.ID, "message").get_attribute("value") == question
        # markup in a message is text: shown as typed, never run
        html = "<img src=x onerror=window.ran=1><b>bold</b>"
        set_field(browser, "message", html)
        browser.find_element(By.ID, "send").click()
        wait(browser, lambda d: len(bubbles(d)) == 2 and ready(d), "the fake answer did not end", 10)
        assert bubbles(browser)[0][:2] == ("user", html)
        assert browser.execute_script("return [document.querySelectorAll('#log img, #log b').length, window.ran]") == [0, None]
    finally:
        server.stop()


@pytest.mark.serve
def test_a_conversation_in_the_browser_streams_stops_and_goes_on(browser, llama3_chat):
    server = Server(2, llama3_chat, "--slots", "1", "--api-key", KEY)
    try:
        browser.get(server.url + "/")
        # the server has a key: the page says so and opens its field
        error = browser.find_element(By.ID, "error")
        wait(browser, lambda d: error.is_displayed() and "API key" in error.text, "the page did not ask for the API key")
        assert browser.find_element(By.ID, "api-key") == browser.switch_to.active_element
        browser.find_element(By.ID, "api-key").send_keys(KEY)
        set_field(browser, "temperature", "0")  # (leaving the key's field connects with it)
        set_field(browser, "max-tokens", "400")  # the answer runs for seconds: time to watch it and stop it
        model = browser.find_element(By.ID, "model")
        wait(browser, lambda d: model.text == "model: tiny-llama3-chat", "the model's name is not shown")
        assert not error.is_displayed() and ready(browser)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
        # what the page sends, recorded on its way to fetch
        browser.execute_script("window.sent = []; const f = window.fetch;"
                               "window.fetch = (url, o) => { if (o?.body) sent.push(JSON.parse(o.body)); return f(url, o); }")
        before = metrics(server)

        # the job runs only while the test lets its follower rank run (SIGSTOP holds rank 0 inside a step), so the
        # answer is still going when Stop is pressed, however fast the machine
        follower = int(server.pids()["1"])
        browser.find_element(By.ID, "message").send_keys("Hello there!", Keys.ENTER)
        try:
            seen = [wait(browser, answer_text, "no answer text arrived")]
            os.kill(follower, signal.SIGSTOP)
            while len(seen) < 3:  # the bubble grows as tokens arrive: each observation extends the one before
                os.kill(follower, signal.SIGCONT)
                seen.append(wait(browser, lambda d: (t := answer_text(d)) != seen[-1] and t, "the answer stopped growing"))
                os.kill(follower, signal.SIGSTOP)
                assert seen[-1].startswith(seen[-2])
            browser.find_element(By.ID, "stop").click()
            wait(browser, ready, "the page is not ready again after Stop", timeout=10)
        finally:
            os.kill(follower, signal.SIGCONT)
        stopped = bubbles(browser)
        assert stopped[0] == ("user", "Hello there!", "") and stopped[1][0] == "assistant" and len(stopped) == 2
        assert stopped[1][2] == "stopped" and stopped[1][1].startswith(seen[-1])
        deadline = time.monotonic() + 60  # a hang catcher: the server notices within 0.1 s, frees the slot a step later
        while (after := metrics(server))["dllama_busy_slots"] != 0:
            assert time.monotonic() < deadline, "the slot of the stopped answer is still busy"
            time.sleep(0.05)
        assert after["dllama_cancelled_requests_total"] == before["dllama_cancelled_requests_total"] + 1
        assert after["dllama_generated_tokens_total"] - before["dllama_generated_tokens_total"] < 400
        time.sleep(0.3)
        assert bubbles(browser) == stopped, "the answer grew after Stop"

        set_field(browser, "max-tokens", "8")
        set_field(browser, "system", "Be brief.")
        set_field(browser, "message", "And then?")
        browser.find_element(By.ID, "send").click()
        wait(browser, lambda d: len(bubbles(d)) == 4 and ready(d), "the second answer did not end")
        shown = bubbles(browser)
        assert shown[:2] == stopped and shown[2] == ("user", "And then?", "") and shown[3][0] == "assistant"
        assert shown[3][1], "the second answer is empty"
        assert re.fullmatch(r"8 tokens · \d+\.\d tokens/s · first token \d+\.\d\d s · cut at max tokens or the end of "
                            r"the context", shown[3][2]), shown[3][2]
        first, second = browser.execute_script("return window.sent")
        assert first == {"messages": [{"role": "user", "content": "Hello there!"}], "stream": True,
                         "stream_options": {"include_usage": True}, "temperature": 0, "max_tokens": 400}
        assert second["messages"] == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hello there!"},
                                      {"role": "assistant", "content": stopped[1][1]},
                                      {"role": "user", "content": "And then?"}] and second["max_tokens"] == 8

        browser.refresh()  # the conversation and the settings are kept
        wait(browser, lambda d: ready(d) and bubbles(d) == shown, "a reload lost the conversation")
        assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "8"
        browser.find_element(By.ID, "new-chat").click()
        assert bubbles(browser) == []
        browser.refresh()
        wait(browser, ready, "the page is not ready after a reload")
        assert bubbles(browser) == []
    finally:
        assert server.stop() == 0, "".join(server.stderr)
