"""The HTML report: one self-contained file (plotly inlined once, photos as data URIs) that renders
every chart in Chromium with the network cut off; refusals in one line with nothing written."""
import re

import pytest

from conftest import TINY_TRAIN, run_cli
from test_browser import CHROMIUM, CHROMIUM_ARGS, _playwright_or_skip


@pytest.fixture(scope="module")
def two_runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report-runs")
    made = []
    for seed in (0, 1):
        run = root / f"run{seed}"
        r = run_cli("train", "--data", tiny_data, "--run-dir", run, "--seed", seed, *TINY_TRAIN)
        assert r.returncode == 0, r.stderr
        made.append(run)
    return made


def _figures(text: str) -> int:
    return text.count('class="plotly-graph-div"')


@pytest.mark.slow
def test_report_of_two_runs_is_one_self_contained_file(two_runs, tmp_path):
    out = tmp_path / "report.html"
    r = run_cli("report", *two_runs, "--out", out, "--worst", 2)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert len(re.findall(r"\* plotly\.js v\d", text)) == 1  # the library inlined once, not per figure
    markup = re.sub(r"<script.*?</script>", "", text, flags=re.S)  # plotly's own source holds URL strings
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", markup)  # nothing to fetch (Chromium checks it too)
    # data set, test metrics with intervals, B vs A, ROC + reliability, 3 curves, confusion
    assert _figures(text) == 7
    for heading in ("Data set: grades per split", "On the test split", "B vs A: B = ", "Curves",
                    "Confusion matrices", "config", "most wrong, with Grad-CAM"):
        assert heading in text, heading
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}.\d\.\d{3}\]", text)  # a value with its interval
    photos = re.findall(r'<img alt="Grad-CAM of [^"]+" src="([^"]+)"', text)
    assert 1 <= len(photos) <= 4 and all(p.startswith("data:image/png;base64,") for p in photos)


@pytest.mark.slow
def test_report_renders_every_chart_offline_in_chromium(two_runs, tmp_path):
    sync_api = _playwright_or_skip()
    out = tmp_path / "report.html"
    r = run_cli("report", *two_runs, "--out", out, "--worst", 1)
    assert r.returncode == 0, r.stderr
    expected = _figures(out.read_text())
    fetched = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})

            def cut(route):
                if route.request.url.startswith("file:"):
                    route.continue_()
                else:  # the network is off: anything the report would fetch fails, and is counted
                    fetched.append(route.request.url)
                    route.abort()

            page.route("**/*", cut)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(out.as_uri())
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}",
                                   timeout=60_000)
            drawn = page.evaluate("[...document.querySelectorAll('.js-plotly-plot')]"
                                  ".filter(d => d.querySelector('svg.main-svg')).length")
            images = page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)")
        finally:
            browser.close()
    assert drawn == expected == 7
    assert images and all(images)
    assert fetched == [] and errors == []


@pytest.mark.slow
def test_report_of_one_run_has_no_b_vs_a(two_runs, tmp_path):
    out = tmp_path / "one.html"
    r = run_cli("report", two_runs[0], "--out", out, "--worst", 0)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "B vs A" not in text and "<img" not in text and _figures(text) == 7


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = tmp_path / "report.html"
    (tmp_path / "empty").mkdir()
    r = run_cli("report", tmp_path / "empty", "--out", out)
    assert r.returncode == 2 and "not a Retino run folder" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
