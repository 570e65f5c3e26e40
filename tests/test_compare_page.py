"""The Compare page's evaluation panels under AppTest, on two real tiny runs that differ only in seed.

Issue 10 "Where the user sees it": test figures with intervals, the best run per column marked, B vs
A with its sentence, ROC curves with each run's operating point, reliability diagrams, the most-wrong
photos with Grad-CAM; a warning (never a traceback) for runs evaluated on other images, and an older
run evaluated once on request. Seed 0 is the session's shared classify run; seed 1 trains once per module.
"""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import CLASSIFY_FLAGS, REPO, TINY_TRAIN, run_cli
from retino import paths
from retino.evaluation import evaluate, report
from retino import runs
from retino.dashboard import settings
from retino.evaluation.stats import format_interval
from retino import fileio
from retino.evaluation import results


@pytest.fixture(scope="module")
def two_runs(trained_classify, tiny_data, tmp_path_factory) -> list[Path]:
    """The session's classify run (seed 0) and the same run trained with seed 1."""
    base = tmp_path_factory.mktemp("compare-page")
    seed1 = base / "runs" / "20260102-000000-seed1"
    # the shared image cache is already built by the seed-0 run, so this run only reads it
    env = {"RETINO_RUNS": str(seed1.parent), "RETINO_CACHE": str(tmp_path_factory.getbasetemp() / "image-cache")}
    r = run_cli("train", "--data", tiny_data, *CLASSIFY_FLAGS, "--seed", 1, "--run-dir", seed1, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    return [trained_classify, seed1]


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def add(run: Path, name: str, age: float) -> Path:
    """A copy of a run in this test's runs folder, made ``age`` seconds ago (the page lists newest first).

    Files are hard-linked: replace them, never write into them.
    """
    dst = paths.runs_root() / name
    shutil.copytree(run, dst, copy_function=_link_or_copy)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").unlink()
    fileio.write_json(dst / "config.json", {**config, "created": time.time() - age})
    return dst


def open_compare(*selected) -> AppTest:
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.session_state["compare.selected"] = list(selected)
    at.run()
    at.switch_page("pages/compare.py").run()
    assert not at.exception, at.exception
    return at


def figure(at, key) -> dict:
    """The plotly figure the page drew under ``key``, as JSON."""
    charts = [c for c in at.get("plotly_chart") if key in c.proto.id]
    assert len(charts) == 1, [c.proto.id for c in at.get("plotly_chart")]
    return json.loads(charts[0].proto.spec)


def all_text(at) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "warning", "info", "error")
                     for e in getattr(at, kind))


@pytest.fixture
def data_in_use(tiny_data):
    settings.use_dataset(str(tiny_data))
    return tiny_data


def test_compare_shows_intervals_b_vs_a_roc_reliability_and_the_worst_photos(two_runs, data_in_use):
    a, b = add(two_runs[0], "seed0", age=20), add(two_runs[1], "seed1", age=10)
    at = open_compare("seed0", "seed1")
    table = at.table[0].value.set_index("run")
    reports = {path.name: json.loads((path / "test.json").read_text()) for path in (a, b)}
    fingerprint = json.loads((a / "config.json").read_text())["data_fingerprint"]
    for run_id, rep in reports.items():
        row = table.loc[table.index.str.endswith(f"[{run_id}]")].iloc[0]
        assert row["QWK"].removesuffix(results.BEST_MARK) == format_interval(rep["metrics"]["qwk"])
        assert row["sensitivity"].removesuffix(results.BEST_MARK) == format_interval(rep["metrics"]["sensitivity"])
        assert row["test images"] == str(rep["n_images"]) and row["selected on"] == "val"
        assert row["data set"] == f"{data_in_use.name} · {fingerprint[:8]}"
    acc = {i: rep["metrics"]["accuracy"]["value"] for i, rep in reports.items()}
    if acc["seed0"] != acc["seed1"]:  # the higher accuracy carries the mark, the other not
        marked = [i for i in acc if table.loc[table.index.str.endswith(f"[{i}]"), "accuracy"].iloc[0].endswith("★")]
        assert marked == [max(acc, key=acc.get)]
    assert not any("Not evaluated on the same" in w.value for w in at.warning)

    # B vs A: A is the older run (seed0), B the newer; the sentence is compare_runs' verdict
    result = evaluate.compare_runs(a, b)
    sentence = [m.value for m in at.markdown if str(m.value).startswith("QWK, B − A")]
    assert sentence == [results.versus_sentence(result)]
    verdict = result["verdict"]["qwk"]
    assert verdict[0].upper() + verdict[1:] in sentence[0]
    assert at.table[1].value["metric"].tolist()[:4] == ["QWK", "accuracy", "macro-F1", "ref. AUC"]

    # ROC: each run's operating point at its test report's (1 - specificity, sensitivity)
    roc = figure(at, "results.roc")
    points = [t for t in roc["data"] if t.get("mode") == "markers"]
    assert len(points) == 2
    for t in points:
        rep = reports["seed0" if "[seed0]" in t["name"] else "seed1"]
        assert t["x"][0] == pytest.approx(1 - rep["metrics"]["specificity"]["value"])
        assert t["y"][0] == pytest.approx(rep["metrics"]["sensitivity"]["value"])
    titles = [a["text"] for a in figure(at, "results.reliability")["layout"]["annotations"]]
    assert sorted(float(t.split("ECE ")[1].split(" ")[0]) for t in titles) == pytest.approx(
        sorted(round(rep["calibration"]["ece"], 3) for rep in reports.values()))
    qwk_curves = figure(at, "compare.qwk")
    assert {t["name"].rsplit(" · ", 1)[1] for t in qwk_curves["data"]} == {"val", "test"}

    # the most-wrong photos, with their Grad-CAM only once asked for
    assert not at.get("image")
    table_b = report.read_predictions(b)
    expected = len(results.worst_predictions(table_b))
    at.selectbox(key="compare.gallery_run").set_value("seed1").run()
    at.toggle(key="compare.gallery").set_value(True).run()
    assert not at.exception, at.exception
    assert 0 < expected <= 8 and len(at.get("image")) == expected
    assert "cells a side" in all_text(at)


def test_runs_on_other_test_images_get_a_warning_not_an_exception(two_runs, data_in_use):
    add(two_runs[0], "seed0", age=20)
    other = add(two_runs[1], "other-data", age=10)
    table = report.read_predictions(other)
    test = table[table["split"] == "test"]
    table = table.drop(test.index[:2])  # two test photos fewer ...
    table.loc[test.index[2], "image"] = "elsewhere_left"  # ... and one the other run never saw
    for name in ("predictions.csv", "test.json"):
        (other / name).unlink()  # hard-linked to the trained run: replace, never write into
    fileio.write_atomic(other / "predictions.csv", table.to_csv(index=False).encode())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").unlink()
    fileio.write_json(other / "config.json", {**config, "data_fingerprint": "0123456789abcdef"})

    at = open_compare("seed0", "other-data")
    warnings = " ".join(w.value for w in at.warning).replace("\\", "")  # run names are escaped markdown: the text shown
    n = int((test["split"] == "test").sum())
    assert "Not evaluated on the same test images" in warnings
    assert f"[other-data]: {n - 2} images;" in warnings and f"[seed0]: {n} images, {n - 3} in common" in warnings
    assert "A and B cannot be compared: the runs were not evaluated on the same images" in warnings
    assert "differ in data (labels' fingerprint)" in warnings and "0123456789abcdef" in warnings
    assert not [m for m in at.markdown if str(m.value).startswith("QWK, B − A")]
    assert at.table[0].value["test images"].tolist() == [str(n - 2), str(n)]  # newest first
    assert "data fingerprint" in at.dataframe[-1].value.index  # the settings diff says it too


def test_an_older_run_is_evaluated_once_on_request(two_runs, data_in_use):
    old = add(two_runs[0], "older", age=10)
    rows = runs.read_metrics(old)
    for name in ("predictions.csv", "test.json", "evaluation.json", "metrics.jsonl"):
        (old / name).unlink()
    for row in rows:  # a run from before the val split: test metrics only
        runs.append_metrics(old, {k: v for k, v in row.items() if not k.startswith("val_")})
    at = open_compare("older")
    row = at.table[0].value.iloc[0]
    assert row["QWK"] == "not evaluated" and row["selected on"] == "chosen on test (older run)"
    at.button(key="compare.evaluate.older").click().run()
    assert not at.exception, at.exception
    assert (old / "predictions.csv").exists()
    row = at.table[0].value.iloc[0]
    rep = evaluate.evaluate_run(old)
    assert row["QWK"] == format_interval(rep["metrics"]["qwk"]) and rep["selected_on"] == "test"
    assert row["selected on"] == "chosen on test (older run)" and row["test images"] == str(rep["n_images"])
    assert not at.get("button") or not any(b.key == "compare.evaluate.older" for b in at.button)
