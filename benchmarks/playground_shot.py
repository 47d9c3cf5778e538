"""The playground page on the real pair, as a person sees it: headless Chromium (Debian) opens
`make run`'s page, sends a prompt with "Compare with target alone", and saves a screenshot and
what the page showed.

    python -m benchmarks.playground_shot --out benchmarks/results/playground_cpu.png

Needs Debian's chromium and chromium-driver (`make install-tools`) and selenium (dev extra).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.bench_report import save_json
from specwire.local_pair import local_pair

PROMPT = "Write a Python function that returns the n-th Fibonacci number iteratively."


def chromium(width: int = 1400, height: int = 1000):  # noqa: ANN201 - selenium's WebDriver
    """Debian's headless Chromium under Selenium, driven through Debian's chromedriver."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "chromedriver")
    return webdriver.Chrome(service=service, options=options)


def main(argv: list[str] | None = None) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/playground_cpu.png"))
    args = parser.parse_args(argv)
    with local_pair(http=True) as pair:
        browser = chromium(1400, 1100)
        try:
            browser.get(f"http://127.0.0.1:{pair.http_port}/")
            wait = WebDriverWait(browser, 1800)
            wait.until(lambda b: b.execute_script("return document.body.dataset.ready === '1'"))
            for name, value in (("prompt", PROMPT), ("max_tokens", args.max_tokens)):
                field = browser.find_element(By.ID, name)
                field.clear()
                field.send_keys(str(value))
            start = time.perf_counter()
            browser.find_element(By.ID, "compare").click()
            verdict = browser.find_element(By.CSS_SELECTOR, "#alone .verdict")
            wait.until(lambda b: verdict.text and b.find_element(By.ID, "stop").get_attribute("disabled"))
            spans = browser.find_elements(By.CSS_SELECTOR, "#speculative .text .tok")
            mid = spans[len(spans) // 3]  # show the hover card on a token, as a person would
            from selenium.webdriver import ActionChains

            ActionChains(browser).move_to_element(mid).perform()
            time.sleep(0.3)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
            shown = {
                "command": "python -m benchmarks.playground_shot " + " ".join(argv or []),
                "prompt": PROMPT,
                "max_tokens": args.max_tokens,
                "speculative": browser.find_element(By.CSS_SELECTOR, "#speculative .stats").text,
                "target_alone": browser.find_element(By.CSS_SELECTOR, "#alone .stats").text,
                "verdict": verdict.text,
                "error": browser.find_element(By.ID, "error").text,
                "seconds": round(time.perf_counter() - start, 1),
            }
        finally:
            browser.quit()
    print(json.dumps(shown, indent=2))
    save_json(args.out.with_suffix(".json"), shown)
    return shown


if __name__ == "__main__":
    main()
