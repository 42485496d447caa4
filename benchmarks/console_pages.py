"""The web console on a real model, as a radiology group would see it: screenshots of each page and the server time
of each page with 50 jobs listed. Prints JSON (and writes it with --json).

    python -m benchmarks.console_pages --dataset ../shared/data/hippocampus --model hippocampus_few \
        --screenshots docs/console --json benchmarks/results/console_pages.json

Everything runs as real processes (worker/localstack.py: redis-server, `isl serve`, one `isl worker` on the
committed bundle of --model in models/), and a real headless Chromium (Debian's chromium and chromium-driver,
through Selenium) drives the console. The first test case of the bundle's held-out split is uploaded from the
browser; the rest of the 50 jobs through the API. Its reference label is sent back as the radiologist's correction,
and so are those of the next cases up to --corrections in all, so that the model page's agreement report has cases
to show (a reference the service refuses as a correction is skipped, and its reason kept in the JSON). Then
every page is fetched --repeats times over HTTP with the browser's session and its Server-Timing header read (the
server's own time: session, records, rendering); the wall time seen by the client is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.common import ROOT, add_options, emit, stamped
from jobstore.records import JobState

KEYS = {"radiology": "radiology-demo-key", "other": "other-demo-key"}


def wait(check, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if value := check():
                return value
        except Exception:  # noqa: BLE001 - the page is still loading
            pass
        time.sleep(0.25)
    raise TimeoutError(f"timed out waiting for {what}")


def browser(downloads: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads)})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def shot(driver, folder: Path | None, name: str) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        driver.set_window_size(1400, 1000)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1400, min(max(height, 600), 2400))  # the whole page, up to a long one's top
        driver.save_screenshot(str(folder / f"{name}.png"))
        driver.set_window_size(1400, 1000)


def server_ms(r: httpx.Response) -> float:
    return float(r.headers["server-timing"].split("dur=")[1])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, required=True, help="the model's dataset (its held-out cases are used)")
    p.add_argument("--model", default="hippocampus_few", help="a bundle in models/")
    p.add_argument("--jobs", type=int, default=50)
    p.add_argument("--corrections", type=int, default=10, help="cases sent back corrected, the browser's included")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    p.add_argument("--screenshots", type=Path, help="folder for one PNG per page")
    add_options(p, json=None)
    args = p.parse_args(argv)
    args.dataset = args.dataset.resolve()
    return args


def scans(args: argparse.Namespace) -> list[Path]:
    """The --jobs scans to upload: the bundle's held-out cases first, then the dataset's unlabelled scans."""
    meta = json.loads((ROOT / "models" / args.model / "bundle.json").read_text())
    images = [args.dataset / "imagesTr" / f"{c}.nii.gz" for c in meta["holdout_cases"]]
    images += sorted((args.dataset / "imagesTs").glob("*.nii.gz"))  # unlabelled scans, to reach --jobs
    images = images[:args.jobs]
    if len(images) < args.jobs:
        raise SystemExit(f"{args.dataset} has {len(images)} held-out or unlabelled scans; {args.jobs} needed")
    return images


def upload(driver, url: str, api: httpx.Client, images: list[Path], folder: Path | None) -> tuple[list[str], float]:
    """Sign in, upload the first scan from the browser and the rest through the API (as a hospital script): the
    job ids, and the seconds from the browser's upload to its job's slices on the page."""
    from selenium.webdriver.common.by import By

    driver.get(url + "/console/jobs")
    shot(driver, folder, "sign-in")
    driver.find_element(By.ID, "key").send_keys(KEYS["radiology"])
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait(lambda: driver.current_url.endswith("/console/jobs"), 30, "the job list")
    driver.find_element(By.ID, "files").send_keys(str(images[0]))
    t_upload = time.monotonic()
    driver.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    wait(lambda: "/console/jobs/" in driver.current_url, 60, "the job page")
    ids = [driver.current_url.rsplit("/", 1)[1]]
    for path in images[1:]:
        r = api.post("/v1/jobs", files={"files": (path.name, path.read_bytes())})
        r.raise_for_status()
        ids.append(r.json()["id"])
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, "img#img-axial"), 600, "the first job's slices")
    return ids, time.monotonic() - t_upload


def correct_in_browser(driver, label: Path, folder: Path | None) -> None:
    """The radiologist's correction of the job on the page: the case's reference label."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "correction").send_keys(str(label))
    driver.find_element(By.ID, "note").send_keys("reference contour")
    driver.find_element(By.XPATH, "//button[text()='Send the correction']").click()
    wait(lambda: "Your correction was kept." in driver.page_source, 120, "the kept correction")
    shot(driver, folder, "job")


def send_corrections(api: httpx.Client, ids: list[str], images: list[Path], args) -> tuple[int, dict]:
    """The next cases' reference labels through the API, up to --corrections with the browser's: how many were
    kept, and why the service refused the others."""
    sent, refused = 1, {}
    for job_id, path in list(zip(ids, images))[1:]:
        label = args.dataset / "labelsTr" / path.name
        if sent >= args.corrections or not label.is_file():
            break
        with open(label, "rb") as fh:
            r = api.post(f"/v1/jobs/{job_id}/correction", files={"file": (path.name, fh)},
                         data={"note": "reference contour"})
        if r.status_code == 422:  # a reference the service will not take as a correction: why, kept
            refused[path.name] = r.json()["detail"]
            continue
        r.raise_for_status()
        sent += 1
    return sent, refused


def browse(stack, images: list[Path], args, downloads: Path) -> dict:
    """The browser's session: upload, correct, wait for every job, correct more, screenshot each page; what it saw
    and the session's cookies."""
    api = httpx.Client(base_url=stack.url, headers={"X-API-Key": KEYS["radiology"]}, timeout=120)
    driver = browser(downloads)
    try:
        ids, first_s = upload(driver, stack.url, api, images, args.screenshots)
        correct_in_browser(driver, args.dataset / "labelsTr" / images[0].name, args.screenshots)
        states = wait(lambda: (s := [api.get(f"/v1/jobs/{i}").json() for i in ids]) and all(
            JobState(j["state"]).final for j in s) and s, 60 * args.jobs, "every job")
        sent, refused = send_corrections(api, ids, images, args)
        for name, path in (("jobs", "/console/jobs"), ("model", f"/console/models/{args.model}"),
                           ("operations", "/console/operations")):
            driver.get(stack.url + path)
            shot(driver, args.screenshots, name)
        cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    finally:
        driver.quit()
    return {"ids": ids, "first_s": first_s, "failed": [j for j in states if j["state"] != "succeeded"],
            "sent": sent, "refused": refused, "cookies": cookies}


def time_pages(url: str, cookies: dict, pages: dict[str, str], repeats: int) -> tuple[dict, int]:
    """Per page, the server's time (Server-Timing) and the client's over `repeats` fetches after one warm-up; and
    how many jobs the job list shows."""
    timing = {}
    with httpx.Client(base_url=url, cookies=cookies, timeout=30) as c:
        for name, path in pages.items():
            c.get(path).raise_for_status()
            server, wall = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                r = c.get(path)
                wall.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                server.append(server_ms(r))
            timing[name] = {"server_ms_median": round(float(np.median(server)), 1),
                            "server_ms_max": round(max(server), 1),
                            "client_ms_median": round(float(np.median(wall)), 1)}
        listed = c.get("/console/jobs").text.count('<tr id="job-')
    return timing, listed


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from worker.localstack import LocalStack

    images = scans(args)
    with tempfile.TemporaryDirectory(prefix="isl-console-") as tmp:
        tmp = Path(tmp)
        with LocalStack(tmp / "stack", ROOT / "models", args.model, args.dataset, KEYS, threads_per_worker=args.threads,
                        extra_env={"ISL_CONSOLE_OPERATORS": "radiology"}) as stack:
            seen = browse(stack, images, args, tmp / "downloads")
            first = seen["ids"][0]
            pages = {"jobs": "/console/jobs", "job": f"/console/jobs/{first}", "models": "/console/models",
                     "model": f"/console/models/{args.model}", "operations": "/console/operations"}
            timing, listed = time_pages(stack.url, seen["cookies"], pages, args.repeats)
    out = stamped({"model": args.model, "jobs": len(seen["ids"]), "jobs_listed_on_the_page": listed,
                   "failed_jobs": [j["error"] for j in seen["failed"]], "corrections": seen["sent"],
                   "corrections_refused": seen["refused"], "first_job_upload_to_slices_s": round(seen["first_s"], 1),
                   "repeats": args.repeats, "pages": timing, "budget_ms": 300,
                   "within_budget": all(t["server_ms_max"] < 300 for t in timing.values()),
                   "worker_threads": args.threads})
    emit(out, args.json)
    return out


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: the stack and the browser are stopped still
    main()
