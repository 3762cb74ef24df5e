"""The review page in a real headless Chromium (Selenium): token, upload, verdicts, scores, nearest thumbnails.

Skipped only when Chromium is absent and the environment variable CI is unset; under CI it must run
(.ci/run installs chromium and chromium-driver). Saves the screenshot the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from conftest import make_image  # noqa: E402
from serving import CLEAN_EXIT, Server, fit_model  # noqa: E402

CHROMEDRIVER = "/usr/bin/chromedriver"
README_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "serve-page.png"
# The test always takes the screenshot (a real render of the page); it replaces the README's copy only when
# asked (DN2_UPDATE_SCREENSHOT=1), so running the tests leaves the working tree clean.
TOKEN = "page-test-token-0123456789"

if not (shutil.which("chromium") and os.path.exists(CHROMEDRIVER)) and not os.environ.get("CI"):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1200,1500"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_scores_dropped_images_and_shows_verdicts_scores_and_nearest_thumbnails(browser, tmp_path):
    model = fit_model(tmp_path)
    (tmp_path / "token").write_text(TOKEN + "\n")
    uploads = []
    for name, seed, kind in [("part-0193.png", 201, "blob"), ("part-0194.png", 105, "stripes"), ("part-0195.png", 106, "stripes")]:
        make_image(kind, seed, 96).save(tmp_path / name)  # the training images' size and (lossless) format
        uploads.append(str(tmp_path / name))
    (tmp_path / "notes.jpg").write_bytes(b"not an image at all")
    uploads.append(str(tmp_path / "notes.jpg"))
    server = Server(model, "--token-file", str(tmp_path / "token"))
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        token = wait.until(EC.visibility_of_element_located((By.ID, "token")))  # the server asked for one
        assert "needs an access token" in browser.find_element(By.ID, "status").text
        token.send_keys(TOKEN)
        browser.find_element(By.ID, "token-use").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "Ready"))
        assert "parts" in browser.find_element(By.ID, "model").text

        browser.find_element(By.ID, "files").send_keys("\n".join(uploads))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.card")) == 4)
        cards = browser.find_elements(By.CSS_SELECTOR, "article.card")
        verdicts = [c.get_attribute("data-verdict") for c in cards]
        assert verdicts == ["anomaly", "normal", "normal", "error"]  # most anomalous first, unscored last
        first = cards[0]
        assert first.find_element(By.CSS_SELECTOR, ".badge").text.lower() == "anomaly"
        assert "part-0193.png" in first.text
        score = float(first.find_element(By.CSS_SELECTOR, ".score").text)
        threshold = float(re.search(r"threshold ([0-9.]+)", first.text).group(1))
        assert score > threshold
        meter = first.find_element(By.CSS_SELECTOR, "[role=meter]")
        assert float(meter.get_attribute("aria-valuenow")) == pytest.approx(score, rel=1e-2)
        assert "not an image" in cards[3].text

        # the nearest normals' thumbnails are fetched with the token and drawn
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.card .nearest img")) == 9)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('.nearest img')].every(i => i.complete && i.naturalWidth > 0)"))
        assert browser.execute_script("return document.querySelector('.query img').naturalWidth") > 0
        assert "Nearest normal images" in first.text and "distance" in first.text

        # keyboard: the filter buttons are reachable and work
        browser.find_element(By.XPATH, "//button[text()='Anomalies']").click()
        assert [c.is_displayed() for c in browser.find_elements(By.CSS_SELECTOR, "article.card")] == [True, False, False, False]
        browser.find_element(By.XPATH, "//button[text()='All']").click()
        browser.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        png = browser.get_screenshot_as_png()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000  # a real, non-blank render
        if os.environ.get("DN2_UPDATE_SCREENSHOT"):
            _save_screenshot(png)
    finally:
        assert server.stop() in CLEAN_EXIT
    assert "Traceback" not in server.log.read_text()


def _save_screenshot(png: bytes) -> None:
    """The README's screenshot, kept small (a 256-colour PNG); written atomically."""
    import io

    from PIL import Image

    from dn2.outputs import atomic_path

    README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    with atomic_path(README_SCREENSHOT, force=True, what="screenshot") as tmp:
        image.save(tmp, format="PNG", optimize=True)
