"""The web console driven by a real headless Chromium (Debian's chromium and chromium-driver, through Selenium)
against the real stack (`isl serve`, an `isl worker`, Redis): what a radiologist does, click by click."""
import os
import shutil
import time
from pathlib import Path

import pytest
from kit import KEYS

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.browser


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(5)  # a click that loads a page may return before the page is there
    try:
        yield driver
    finally:
        driver.quit()


def _wait(check, timeout=120.0, what="the page"):
    from selenium.common.exceptions import WebDriverException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if value := check():
                return value
        except WebDriverException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _shot(browser, name: str) -> None:
    """With ISL_CONSOLE_SCREENSHOTS=FOLDER, a screenshot of the page as FOLDER/NAME.png (the README shows them)."""
    if folder := os.environ.get("ISL_CONSOLE_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


UNLABELLED = """return Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea, progress'))
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.outerHTML)"""


FIRST_STOP = """const first = document.querySelector('a[href], button, input:not([type=hidden]), select, textarea');
  first.focus(); return [first.textContent, first.getBoundingClientRect().left]"""


def _accessible(browser) -> None:
    """Every control of the page has a label, and the keyboard's first stop is the skip link to the content, shown
    when it has the focus."""
    assert browser.execute_script(UNLABELLED) == [], browser.current_url
    text, left = browser.execute_script(FIRST_STOP)
    assert text == "Skip to the content" and left >= 0, (text, left)


def _sign_in(browser, base, key):
    from selenium.webdriver.common.by import By

    browser.get(base + "/console/jobs")  # signed out: sent to the sign-in page, and back after it
    assert "/console/sign-in" in browser.current_url
    browser.find_element(By.ID, "key").send_keys(key)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()


def test_a_radiologist_signs_in_uploads_a_real_scan_watches_it_and_corrects_its_result(stack, hippocampus,
                                                                                        browser, tmp_path):
    from selenium.webdriver.common.by import By

    base = stack.url
    _sign_in(browser, base, "a wrong key")
    alert = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "[role=alert]"), 20, "the refusal")[0]
    assert "That API key is not valid" in alert.text
    _shot(browser, "sign-in")
    _accessible(browser)
    _sign_in(browser, base, KEYS["alpha"])
    _wait(lambda: browser.current_url.endswith("/console/jobs"), 20, "the job list")
    assert "tenant alpha" in browser.find_element(By.CLASS_NAME, "who").text

    scan = sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[0]
    browser.find_element(By.ID, "files").send_keys(str(scan))
    browser.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    _wait(lambda: "/console/jobs/" in browser.current_url, 60, "the job page after the upload")
    job_id = browser.current_url.rsplit("/", 1)[1]
    # the page follows the job by server-sent events and reloads when it ends
    _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "img#img-axial"), 300, "the finished job's slices")
    assert "succeeded" in browser.find_element(By.CSS_SELECTOR, "[data-field=state]").text
    _shot(browser, "job")
    _accessible(browser)

    image = browser.find_element(By.ID, "img-axial")
    first = image.get_attribute("src")
    assert _wait(lambda: browser.execute_script("return arguments[0].naturalWidth", image), 10, "the slice image")
    slider = browser.find_element(By.ID, "slider-axial")
    slider.send_keys("\ue012" * 3)  # arrow left, three slices down
    assert image.get_attribute("src") != first and "preview/axial_" in image.get_attribute("src")
    assert browser.find_element(By.ID, "at-axial").text.endswith(f"/ {slider.get_attribute('data-of')}")

    browser.find_element(By.LINK_TEXT, "Refined mask (NIfTI)").click()
    downloads = tmp_path / "downloads"
    mask = _wait(lambda: [p for p in downloads.glob("*.nii.gz")], 30, "the downloaded mask")[0]
    assert mask.read_bytes()[:2] == b"\x1f\x8b"

    browser.find_element(By.ID, "correction").send_keys(str(mask))
    browser.find_element(By.ID, "note").send_keys("checked in the browser")
    browser.find_element(By.XPATH, "//button[text()='Send the correction']").click()
    _wait(lambda: "Your correction was kept." in browser.page_source, 120, "the kept correction")
    row = browser.find_element(By.XPATH, "//h2[.='Corrections']/following-sibling::table[1]//tbody/tr[1]")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    assert cells[2] == "0" and "1.000" in cells[3] and cells[4] == "checked in the browser", cells  # its own mask
    browser.get(base + "/console/jobs")
    _shot(browser, "jobs")
    _accessible(browser)
    # the model's agreement report now counts this correction, with its Bland-Altman plot
    browser.find_element(By.LINK_TEXT, "Models").click()
    browser.find_element(By.LINK_TEXT, "tiny").click()
    rows = browser.find_elements(By.XPATH, "//h2[starts-with(., 'Agreement')]/following-sibling::table[1]//tbody/tr")
    assert rows and rows[-1].find_elements(By.TAG_NAME, "td")[1].text == "1"
    plot = browser.find_element(By.CSS_SELECTOR, "img[alt^='Bland-Altman']")
    assert _wait(lambda: browser.execute_script("return arguments[0].naturalWidth", plot), 20, "the Bland-Altman plot")
    _shot(browser, "model")
    _accessible(browser)
    # the operations page: the stack's worker, alive, on its device
    browser.find_element(By.LINK_TEXT, "Operations").click()
    worker = browser.find_element(By.XPATH, "//h2[.='Workers']/following-sibling::table[1]//tbody/tr[1]")
    assert worker.find_elements(By.TAG_NAME, "td")[2].text.startswith("cpu (")
    _shot(browser, "operations")
    _accessible(browser)

    # a post without the session's CSRF token (as another site's page would send it) is refused
    status = browser.execute_script(
        "const f = new FormData(); return fetch('/console/sign-out', {method: 'POST', body: f})"
        ".then(r => r.status)")
    assert status == 403
    # another tenant cannot reach this job by its URL
    browser.delete_all_cookies()
    _sign_in(browser, base, KEYS["beta"])
    _wait(lambda: browser.current_url.endswith("/console/jobs"), 20, "beta's job list")
    assert job_id not in browser.page_source
    browser.get(f"{base}/console/jobs/{job_id}")
    assert "Not found" in browser.find_element(By.TAG_NAME, "h1").text
