"""End to end in a real browser: `streamlit run app.py`, every page, a run started from the form.

Runs the dashboard from a temporary copy of the app (so the repository's checkpoints/ and settings
stay untouched), drives Debian's Chromium through Playwright, trains one tiny run from the Train
page's form and checks the Compare page draws its curves and confusion matrix. Screenshots of each
page land in the test's tmp folder and in /tmp/retino_shots/.

Skipped without /usr/bin/chromium (or Playwright), unless RETINO_REQUIRE_BROWSER=1.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SHOTS = Path("/tmp/retino_shots")
TRAIN_TIMEOUT_S = 180


def _playwright_or_skip():
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing"
    try:
        import playwright.sync_api as sync_api
    except ImportError:
        reason, sync_api = "playwright is not installed", None
    if reason:
        if os.environ.get("RETINO_REQUIRE_BROWSER") == "1":
            pytest.fail(f"RETINO_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return sync_api


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout:.0f} s")


def _shoot(page, name: str, folder: Path) -> None:
    """A screenshot of the whole page: Streamlit scrolls inside its own containers, so grow the viewport."""
    scrollers = "[data-testid=stMain], [data-testid=stMainBlockContainer], [data-testid=stSidebarContent]"
    height = page.evaluate(f"Math.max(...[...document.querySelectorAll('{scrollers}')].map(e => e.scrollHeight), 900)")
    page.set_viewport_size({"width": 1400, "height": min(int(height) + 60, 8000)})
    page.wait_for_timeout(1500)  # plotly redraws at the new size
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(exist_ok=True)
    shutil.copy(path, SHOTS / path.name)
    page.set_viewport_size({"width": 1400, "height": 900})


def _settled(page, timeout: float = 30_000) -> None:
    """Wait until the script run has finished (no running indicator) and no exception is shown."""
    page.wait_for_selector("[data-testid=stMain]", timeout=timeout)
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidgetRunningIcon]')"
                           " && !document.querySelector('[data-testid=stSkeleton]')", timeout=timeout)
    page.wait_for_timeout(500)
    errors = page.locator("[data-testid=stException]")
    assert errors.count() == 0, errors.first.inner_text()


def _open(page, base: str, path: str, marker: str) -> None:
    page.goto(f"{base}/{path}")
    page.get_by_text(marker, exact=False).first.wait_for(timeout=60_000)
    _settled(page)


def _nav(page, title: str) -> None:
    """Click a page in the sidebar navigation, as a user does."""
    page.get_by_test_id("stSidebarNavItems").get_by_role("link", name=title, exact=True).click()


def _set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")  # commit without Enter (Enter would submit the form)


@pytest.mark.slow
def test_dashboard_end_to_end(tmp_path, tiny_data):
    pw = _playwright_or_skip()
    work = tmp_path / "app"
    work.mkdir()
    for name in ("app.py", "pages", "retino", ".streamlit"):
        src = REPO / name
        (shutil.copytree(src, work / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, work / name))
    runs_dir, shots = tmp_path / "checkpoints", tmp_path / "shots"
    shots.mkdir()
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"data": str(tiny_data)}))
    env = {**os.environ, "RETINO_RUNS": str(runs_dir), "RETINO_SETTINGS": str(settings),
           "RETINO_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"],
                            cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(base, proc)
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})

            _open(page, base, "", "Samples per grade")
            assert page.locator(".js-plotly-plot").count() == 1  # the grade distribution
            assert page.get_by_text("Always predicting grade 0").count() == 1
            assert page.locator("[data-testid=stImage]").count() >= 10
            _shoot(page, "1-data", shots)

            _nav(page, "Compare")
            page.get_by_text("No runs yet").wait_for(timeout=30_000)
            _settled(page)

            _nav(page, "Train")
            page.get_by_text("Active runs (0)").wait_for(timeout=30_000)
            _settled(page)
            _set_number(page, "epochs", 3)
            _set_number(page, "image size", 64)
            _set_number(page, "batch size", 16)
            page.get_by_text("Advanced", exact=True).click()
            _set_number(page, "workers", 0)
            page.get_by_role("button", name="Start training").click()
            page.get_by_text("Started").first.wait_for(timeout=30_000)

            deadline, status, shot_live = time.time() + TRAIN_TIMEOUT_S, {}, False
            while time.time() < deadline:
                folders = [d for d in runs_dir.iterdir() if (d / "status.json").exists()] if runs_dir.exists() else []
                if folders:
                    try:
                        status = json.loads((folders[0] / "status.json").read_text())
                    except ValueError:
                        pass  # replaced atomically, but read it again to be safe
                if status.get("state") == "running" and status.get("epoch", 0) >= 2 and not shot_live:
                    # epoch 1 has ended (its val QWK is a point) and two more are to come: the live view
                    # draws accuracy, loss, QWK and the per-step loss while the run is still going
                    shot_live = True
                    page.get_by_text("images/s").first.wait_for(timeout=20_000)
                    live_qwk = page.locator(".js-plotly-plot text", has_text="QWK")
                    live_qwk.first.wait_for(timeout=20_000)
                    assert page.locator(".js-plotly-plot text", has_text="train loss per step").count() >= 1
                    _shoot(page, "2-train-live", shots)
                if status.get("state") in ("completed", "failed", "stopped"):
                    break
                time.sleep(1)
            assert status.get("state") == "completed", f"run ended as {status}; see {folders[0] / 'train.log'}"
            assert shot_live, "the live view was never seen while the run trained"
            page.get_by_text("Active runs (0)").wait_for(timeout=15_000)  # the fragment polls every 2 s
            page.get_by_text("completed").first.wait_for(timeout=15_000)
            _settled(page)
            _shoot(page, "3-train-done", shots)

            _nav(page, "Compare")
            page.get_by_text("Confusion matrices").wait_for(timeout=30_000)
            _settled(page)
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 5", timeout=30_000)
            assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 2  # train and test accuracy
            assert page.locator(".js-plotly-plot .heatmaplayer, .js-plotly-plot image").count() >= 1
            _shoot(page, "4-compare", shots)

            _nav(page, "Predict")
            _settled(page)
            photo = sorted((Path(tiny_data) / "images").glob("*.jpeg"))[0]
            page.locator("input[type=file]").first.set_input_files(str(photo))
            page.get_by_text("Grade ", exact=False).first.wait_for(timeout=60_000)
            page.get_by_text("What the model saw", exact=False).first.wait_for(timeout=30_000)
            _settled(page)
            overlay = page.locator("[data-testid=stImage] img, [data-testid=stImageContainer] img")
            assert overlay.count() >= 3  # the photograph, what the model saw, the Grad-CAM overlay
            assert page.get_by_text("gradcam", exact=False).count() >= 1
            # issue 10: the referral line at the run's operating point (or the default rule), calibrated
            page.get_by_text("Referable", exact=False).first.wait_for(timeout=30_000)
            # issue 11: the quality gate's verdict beside the grade (a 64 px photo is too small to grade)
            page.get_by_text("too small to grade", exact=False).first.wait_for(timeout=30_000)
            _shoot(page, "5-predict", shots)

            # issue 14: the lab-report preset names its runs <name>-<arch>-<scratch|pretrained>; without
            # the ImageNet weights it offers the scratch runs only (the default choice)
            _nav(page, "Train")
            page.get_by_text("Active runs (0)").wait_for(timeout=30_000)
            page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").filter(has_text="Preset").click()
            page.get_by_role("option", name="Lab report: ResNet18/50 x scratch/pretrained").click()
            page.get_by_text("A run name becomes", exact=False).wait_for(timeout=30_000)
            _settled(page)
            name_box = page.get_by_label("name", exact=True)
            name_box.fill("lab")
            name_box.press("Tab")
            _set_number(page, "epochs", 1)
            _set_number(page, "image size", 64)
            page.get_by_role("button", name="Start 2 of 4 runs").click()  # the pretrained two held back
            page.get_by_text("Started").first.wait_for(timeout=30_000)
            names = {d.name.split("-", 2)[-1] for d in runs_dir.iterdir() if (d / "config.json").exists()}
            assert {"lab-resnet18-scratch", "lab-resnet50-scratch"} <= names, names
            assert not any("pretrained" in n for n in names)  # the weights are not on this machine
            _shoot(page, "6-preset", shots)
            browser.close()
    finally:
        from retino.dashboard import jobs
        from retino import runs
        for run in runs.list_runs(runs_dir):  # never leave a trainer behind a failed test
            if run.state in runs.ACTIVE:
                jobs.stop(run.path)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
