"""The playground page in a real browser: Debian's headless Chromium driven by Selenium (tiny models).

Screenshots go to test-artifacts/ (override with SPECWIRE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from benchmarks.playground_shot import chromium  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (make install-tools installs them)",
)
ARTIFACTS = Path(os.environ.get("SPECWIRE_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
COLOURS = {  # background of each token kind, as the stylesheet sets it
    "accepted": "rgba(201, 242, 207, 1)",
    "recovered": "rgba(255, 208, 194, 1)",
    "bonus": "rgba(207, 224, 255, 1)",
    "target": "rgba(231, 232, 236, 1)",
}


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def open_page(browser, pair) -> WebDriverWait:
    browser.get(f"http://127.0.0.1:{pair.draft.http_port}/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.execute_script("return document.body.dataset.ready === '1'"))
    return wait


def fill(browser, **fields: object) -> None:
    for name, value in fields.items():
        element = browser.find_element(By.ID, name)
        element.clear()
        element.send_keys(str(value))


def idle(browser) -> bool:
    return browser.find_element(By.ID, "stop").get_attribute("disabled") is not None


def error_text(browser) -> str:
    box = browser.find_element(By.ID, "error")
    return box.text if box.is_displayed() else ""


def test_page_streams_colours_compares_and_stops(tiny, pair_factory, browser):
    pair = pair_factory(tiny.draft_noisy)
    wait = open_page(browser, pair)
    assert "model:" in browser.find_element(By.ID, "model").text
    fill(browser, prompt="def add(a, b):", max_tokens=60, k=3)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#speculative .tok") and idle(b))
    assert error_text(browser) == ""
    spans = browser.find_elements(By.CSS_SELECTOR, "#speculative .text .tok")
    kinds = {span.get_attribute("data-source") for span in spans}
    assert {"accepted", "recovered", "bonus", "target"} <= kinds, kinds
    for kind, colour in COLOURS.items():
        span = next(s for s in spans if s.get_attribute("data-source") == kind)
        assert span.value_of_css_property("background-color") == colour, kind
    stats = browser.find_element(By.CSS_SELECTOR, "#speculative .stats").text
    assert "tok/s" in stats and "mean acceptance length" in stats
    assert browser.find_elements(By.CSS_SELECTOR, "#speculative .strip .round")
    assert browser.find_elements(By.CSS_SELECTOR, "#speculative .positions .position")
    # hovering a corrected token shows its round, what was tried and the target's logprob
    corrected = next(s for s in spans if s.get_attribute("data-source") == "recovered")
    webdriver.ActionChains(browser).move_to_element(corrected).perform()
    tip = browser.find_element(By.ID, "tip")
    wait.until(lambda b: tip.is_displayed())
    assert "round" in tip.text and "tried:" in tip.text and "target logprob" in tip.text

    browser.find_element(By.ID, "compare").click()
    verdict = browser.find_element(By.CSS_SELECTOR, "#alone .verdict")
    wait.until(lambda b: verdict.text and idle(b))
    assert verdict.text.startswith("identical text"), verdict.text
    alone_kinds = {s.get_attribute("data-source") for s in browser.find_elements(By.CSS_SELECTOR, "#alone .tok")}
    assert alone_kinds == {"target"}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "playground.png"))

    # Stop mid-stream: the page says so and the target frees the session (rounds slowed down, so
    # the tiny model cannot finish first)
    original = pair.target.node.verify

    def slow_verify(*args, **kwargs):
        time.sleep(0.2)
        return original(*args, **kwargs)

    pair.target.node.verify = slow_verify
    fill(browser, max_tokens=1500, k=1)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#speculative .tok")) > 5)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda b: idle(b) and error_text(b) == "stopped")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#speculative .tok")) < 1500
    deadline = time.monotonic() + 15
    while len(pair.target.node.sessions) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pair.target.node.sessions) == 0
    pair.target.node.verify = original

    # an error from the node is shown as its message
    fill(browser, max_tokens=8, temperature=0.5)
    browser.find_element(By.ID, "strategy").send_keys("deterministic")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: idle(b) and error_text(b))
    assert error_text(browser).startswith("HTTP 400") and "needs temperature 0" in error_text(browser)
    browser.save_screenshot(str(ARTIFACTS / "playground-error.png"))


def test_page_with_api_keys(tiny, pair_factory, browser, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("page-key\n")
    pair = pair_factory(tiny.draft_noisy, api_keys_file=keys)
    wait = open_page(browser, pair)
    wait.until(lambda b: "API key" in b.find_element(By.ID, "model").text)
    fill(browser, prompt="def add(a, b):", max_tokens=8)
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: idle(b) and error_text(b))
    assert error_text(browser).startswith("HTTP 401") and "needs an API key" in error_text(browser)
    fill(browser, api_key="page-key")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda b: idle(b) and b.find_elements(By.CSS_SELECTOR, "#speculative .tok"))
    assert error_text(browser) == ""


OUTSIDE_THE_CARD = """
const card = document.querySelector('#speculative').getBoundingClientRect();
return [...document.querySelectorAll('#speculative .positions .position, #speculative .positions .bar')]
  .filter((e) => { const r = e.getBoundingClientRect(); return r.left < card.left || r.right > card.right; })
  .length;
"""


@pytest.mark.parametrize("k", [16, 32])
def test_acceptance_by_position_stays_inside_its_card(tiny, pair_factory, browser, k):
    """At 1400 px with both panels shown, K draft positions (16, the default; 32, the most) keep
    every bar of the chart inside the speculative card."""
    pair = pair_factory(tiny.draft_noisy, min_chain_probability=0)  # every chain is K long
    wait = open_page(browser, pair)
    fill(browser, prompt="Natalia sold clips", max_tokens=3 * k, k=k)
    browser.find_element(By.ID, "compare").click()
    verdict = browser.find_element(By.CSS_SELECTOR, "#alone .verdict")
    wait.until(lambda b: verdict.text and idle(b))
    assert error_text(browser) == ""
    assert len(browser.find_elements(By.CSS_SELECTOR, "#speculative .positions .position")) == k
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"playground-k{k}.png"))
    assert browser.execute_script(OUTSIDE_THE_CARD) == 0
