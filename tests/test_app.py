"""Every dashboard page under streamlit.testing's AppTest: empty, with runs, with a failed run, bad data.

Run folders come from one real tiny training run per session, copied; pages are reached through the
router (app.py) the way a user reaches them. Processes are never started here: launch, stop and
resume are replaced by recorders (the browser test starts a real one).
"""
import json
import re
import os
import shutil
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, TINY_TRAIN, run_cli
from retino import paths
from retino.dashboard import jobs, settings
from retino import runs
from retino.config import TrainConfig
from retino.data import read_dataset, stats
from retino import fileio

PAGES = ["pages/data.py", "pages/train.py", "pages/compare.py", "pages/predict.py", "pages/screen.py"]


@pytest.fixture(scope="session")
def trained_run(trained_classify) -> Path:
    """The session's finished 2-epoch run on the tiny set; tests copy it into their own runs folder."""
    return trained_classify


@pytest.fixture
def runs_dir() -> Path:
    path = paths.runs_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def data_in_use(tiny_data):
    settings.use_dataset(str(tiny_data))
    return tiny_data


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def add_run(trained_run, runs_dir, name, *, created=None, **status) -> Path:
    """A copy of the trained run under a new folder name; ``status`` fields overwrite status.json."""
    dst = runs_dir / name
    # checkpoints hard-linked, not copied: Retino replaces files by rename, never writes into one, and
    # fifty copies of a ResNet18 checkpoint would fill a CI disk
    shutil.copytree(trained_run, dst, copy_function=_link_or_copy)
    if created is not None:
        config = json.loads((dst / "config.json").read_text())
        fileio.write_json(dst / "config.json", {**config, "created": created})
    if status:
        runs.write_status(dst, **status)
    return dst


def app(page=None, **state) -> AppTest:
    """The app through its router, switched to ``page``; ``state`` preset in session_state."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page:
        at.switch_page(page).run()
    assert not at.exception, at.exception
    return at


def texts(at) -> str:
    parts = [e.value for kind in ("markdown", "caption", "info", "warning", "error", "success", "title", "subheader")
             for e in getattr(at, kind)]
    parts += [e.value for kind in ("markdown", "caption", "error", "warning", "page_link")
              for e in getattr(at.sidebar, kind)]
    return "\n".join(str(p) for p in parts)


# ----------------------------------------------------------------------------- every page, every state

@pytest.mark.parametrize("page", PAGES)
def test_page_renders_with_no_runs(page, data_in_use, runs_dir):
    at = app(page)
    assert "No run training" in texts(at)
    if page == "pages/compare.py":
        assert "No runs yet" in texts(at)


@pytest.mark.parametrize("page", PAGES)
def test_page_renders_with_completed_and_failed_runs(page, data_in_use, runs_dir, trained_run):
    add_run(trained_run, runs_dir, "a-done", created=time.time() - 30)
    add_run(trained_run, runs_dir, "b-done", created=time.time() - 20)
    add_run(trained_run, runs_dir, "c-failed", created=time.time() - 10, state="failed",
            error="RuntimeError: CUDA out of memory at batch size 32")
    at = app(page)
    if page == "pages/train.py":
        assert any("CUDA out of memory" in e.value for e in at.error)
        assert "Recent runs" in texts(at)
        # out of memory at this batch size: the same settings would fail again, so no Resume
        assert not any(b.label == "Resume" for b in at.button)
        assert "Resuming would fail the same way" in texts(at)
        links = [link.proto.label for link in at.get("page_link")]
        assert "Compare runs (2 completed)" in links  # the failed run is not counted
    if page == "pages/compare.py":
        assert len(at.get("plotly_chart")) == 7  # ROC, reliability, 4 curve charts, the confusion matrices
        best = at.dataframe[1].value
        # newest first, all selected; same settings, so the folder name tells them apart
        # the failed run's figures are its best epoch so far: marked provisional
        assert list(best["run"]) == ["resnet18-scratch-classify-64px [c-failed] (provisional)",
                                     "resnet18-scratch-classify-64px [b-done]", "resnet18-scratch-classify-64px [a-done]"]
        assert list(at.dataframe[0].value["id"]) == ["c-failed", "b-done", "a-done"]  # the run id is shown
        assert {"qwk", "ref_auc", "sens_at_90spec", "majority_acc"} <= set(best.columns)
        assert at.get("download_button")


@pytest.mark.parametrize("page", PAGES)
def test_bad_data_path_shows_the_dataset_error(page, runs_dir, tmp_path):
    paths.settings_path().write_text(json.dumps({"data": str(tmp_path / "gone")}))
    at = app(page)
    assert any("no such folder" in e.value for e in at.sidebar.error)
    if page == "pages/data.py":
        assert any("no such folder" in e.value for e in at.main.error)


def test_data_page_shows_the_summary(data_in_use, runs_dir):
    at = app()
    text = texts(at)
    splits = stats(read_dataset(data_in_use))["splits"]
    assert set(splits) == {"train", "val", "test"}
    for split, s in splits.items():  # the accuracy floor of always answering each split's majority grade
        assert f"**{100 * s['majority_acc']:.1f}%** on {split}" in text
    assert "Every image's header and end marker read cleanly" in text
    weights = at.dataframe[0].value
    assert list(weights.index) == ["none", "lab", "inverse"]
    assert len(at.get("plotly_chart")) == 1 and len(at.image) >= 10  # originals + preprocessed, every grade
    assert at.toggle(key="data.bg").value is TrainConfig().ben_graham  # what a default run sees


def test_data_page_lists_unreadable_files(tmp_path, runs_dir, tiny_data):
    data = tmp_path / "copy"
    shutil.copytree(tiny_data, data)
    victim = sorted((data / "images").glob("*.jpeg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: no end marker
    settings.use_dataset(str(data))
    at = app()
    problems = at.dataframe[-1].value
    assert victim.name in problems["error"][0] and "truncated" in problems["error"][0].lower()
    assert not any(victim.name in (i.proto.imgs[0].caption if i.proto.imgs else "") for i in at.image)


# ----------------------------------------------------------------------------- the data-set switch

def test_switching_data_set_persists_and_refuses_a_bad_folder(tiny_data, runs_dir, tmp_path):
    at = app()
    at.sidebar.text_input(key="app.data_path").input(str(tmp_path / "nowhere"))
    at.sidebar.button(key="app.use_data").click().run()
    assert any("no such folder" in e.value for e in at.sidebar.error)
    assert "nowhere" not in str(settings.data_path())  # a bad folder is never saved
    at.sidebar.text_input(key="app.data_path").input(str(tiny_data))
    at.sidebar.button(key="app.use_data").click().run()
    assert not at.exception
    assert settings.data_path() == tiny_data.resolve()
    assert app().sidebar.markdown[0].value.startswith(f"**{tiny_data.name}**")  # a fresh session reads it back


# ----------------------------------------------------------------------------- train

@pytest.fixture
def launched(monkeypatch):
    calls = []

    def fake_launch(cfg, root=None):
        calls.append(cfg)
        path = runs.create_run_dir(None, cfg.display_name())
        fileio.write_json(path / "config.json", {"train": cfg.to_dict(), "created": time.time()})
        runs.write_status(path, state="failed", error="not really started")
        return path
    monkeypatch.setattr(jobs, "launch", fake_launch)
    return calls


def test_train_form_bad_value_shows_config_error_and_starts_nothing(data_in_use, runs_dir, launched):
    at = app("pages/train.py")
    at.number_input(key="cfg.epochs").set_value(0)
    at.button(key="train.start").click().run()
    assert any("epochs must be at least 1" in e.value for e in at.error)
    assert launched == [] and not any(runs_dir.iterdir())


def test_train_form_starts_a_run_with_the_form_values(data_in_use, runs_dir, launched):
    at = app("pages/train.py")
    at.number_input(key="cfg.epochs").set_value(1)
    at.number_input(key="cfg.image_size").set_value(64)
    at.selectbox(key="cfg.optimizer").set_value("sgd")
    at.button(key="train.start").click().run()
    assert not at.exception
    (cfg,) = launched
    assert (cfg.epochs, cfg.image_size, cfg.optimizer, cfg.arch) == (1, 64, "sgd", "resnet18")
    assert Path(cfg.data) == data_in_use.resolve()
    assert any("Started" in s.value for s in at.success)


@pytest.fixture
def weights_on_disk(monkeypatch):
    """Which architectures' ImageNet weights the hub cache holds: set ``.have`` (default: both)."""
    class Hub:
        have = {"resnet18", "resnet50"}
    fake = lambda arch: (arch in Hub.have, f"/hub/checkpoints/{arch}.pth")  # noqa: E731
    monkeypatch.setattr("retino.models.weights_available", fake)
    monkeypatch.setattr("retino.dashboard.plan.weights_available", fake)
    return Hub


def test_lab_preset_queues_four_named_runs_with_the_lab_settings(data_in_use, runs_dir, launched, weights_on_disk):
    at = app("pages/train.py")
    at.sidebar.selectbox(key="train.preset").select("lab-report").run()
    assert at.number_input(key="cfg.image_size").value == 512
    at.text_input(key="cfg.name").input("lab")
    at.button(key="train.start").click().run()
    assert not at.exception
    assert [(c.arch, c.pretrained) for c in launched] == [("resnet18", False), ("resnet18", True),
                                                          ("resnet50", False), ("resnet50", True)]
    assert [c.name for c in launched] == ["lab-resnet18-scratch", "lab-resnet18-pretrained",
                                          "lab-resnet50-scratch", "lab-resnet50-pretrained"]
    for c in launched:
        assert (c.image_size, c.optimizer, c.lr, c.momentum, c.weight_decay) == (512, "sgd", 1e-3, 0.9, 5e-4)
        assert (c.loss, c.class_weights, c.epochs, c.batch_size) == ("ce", "lab", 10, 8)


def test_lab_preset_without_weights_says_so_before_starting(data_in_use, runs_dir, launched, weights_on_disk):
    weights_on_disk.have = {"resnet18"}
    at = app("pages/train.py")
    at.sidebar.selectbox(key="train.preset").select("lab-report").run()
    warning = " ".join(w.value for w in at.sidebar.warning)
    assert "resnet50" in warning and "/hub/checkpoints/resnet50.pth" in warning and "resnet18," not in warning
    assert launched == []  # said before anything starts
    at.sidebar.radio(key="train.without_weights").set_value("none").run()
    at.button(key="train.start").click().run()
    assert launched == [] and any("Nothing started" in e.value and "resnet50.pth" in e.value for e in at.sidebar.error)
    at.sidebar.radio(key="train.without_weights").set_value("scratch").run()
    at.button(key="train.start").click().run()
    assert [(c.arch, c.pretrained) for c in launched] == [("resnet18", False), ("resnet18", True), ("resnet50", False)]


@pytest.fixture
def probe(monkeypatch):
    """This machine's training rates as the Train page's probe would time them, fixed so the estimate can be
    checked to the second; the probe itself is timed for real in test_dashboard.py. Records its calls."""
    import streamlit as st
    from retino.dashboard import plan

    rates = {"resnet18": 7.0, "resnet50": 2.0}
    calls = []

    def timed(arch, image_size):
        calls.append((arch, image_size))
        if arch not in rates:
            raise RuntimeError("the probe could not build the model")
        return rates[arch] * (plan.PROBE_SIZE / image_size) ** 2

    st.cache_data.clear()   # a rate cached by an earlier test would hide the calls
    monkeypatch.setattr(plan, "probe_images_per_s", timed)
    timed.rates, timed.calls = rates, calls
    yield timed
    st.cache_data.clear()


def test_form_says_how_long_the_runs_take_on_a_cpu(data_in_use, runs_dir, launched, weights_on_disk, probe):
    from retino.dashboard import plan
    at = app("pages/train.py")
    at.sidebar.selectbox(key="train.preset").select("lab-report").run()
    at.selectbox(key="cfg.device").set_value("cpu")
    at.button(key="train.start").click().run()  # the form's values are submitted; the note is drawn again
    sizes = read_dataset(data_in_use).describe()["sizes"]  # train, val, test
    n_train, n_eval = sizes["train"], sizes["val"] + sizes["test"]
    # 10 epochs at 512 px, at the rates this machine was timed at just now (no finished run here yet)
    rate = {a: r * (plan.PROBE_SIZE / 512) ** 2 for a, r in probe.rates.items()}
    per_epoch = {a: n_train / r + n_eval / (plan.EVAL_SPEEDUP * r) for a, r in rate.items()}
    expected = plan.duration_text(2 * 10 * (per_epoch["resnet18"] + per_epoch["resnet50"]))
    note = next(c.value for c in at.sidebar.caption if c.value.startswith("On this CPU"))
    assert f"On this CPU: {expected} for 4 runs" in note and "timed on this machine just now" in note, note
    assert "BENCHMARKS.md" not in note and {("resnet18", 512), ("resnet50", 512)} <= set(probe.calls)


def test_item3_estimate_falls_back_to_the_reference_cpu_when_the_probe_fails(data_in_use, runs_dir, launched,
                                                                             weights_on_disk, probe):
    from retino.dashboard import plan
    del probe.rates["resnet50"]
    at = app("pages/train.py")
    at.sidebar.selectbox(key="train.preset").select("lab-report").run()
    at.selectbox(key="cfg.device").set_value("cpu")
    at.button(key="train.start").click().run()
    assert not at.exception
    note = next(c.value for c in at.sidebar.caption if c.value.startswith("On this CPU"))
    sizes = read_dataset(data_in_use).describe()["sizes"]
    n_train, n_eval = sizes["train"], sizes["val"] + sizes["test"]
    r18 = probe.rates["resnet18"] * (plan.PROBE_SIZE / 512) ** 2
    per_epoch = {a: n_train / r + n_eval / (plan.EVAL_SPEEDUP * r) for a, r in (("resnet18", r18), ("resnet50", 1.3))}
    expected = plan.duration_text(2 * 10 * (per_epoch["resnet18"] + per_epoch["resnet50"]))
    assert f"On this CPU: {expected} for 4 runs" in note, note
    assert "resnet18 timed on this machine" in note and "BENCHMARKS.md" in note


def test_train_page_shows_whether_weights_are_offline(data_in_use, runs_dir, monkeypatch):
    monkeypatch.setattr("retino.models.weights_available", lambda arch: (arch == "resnet18", f"/hub/{arch}.pth"))
    at = app("pages/train.py")
    note = next(c.value for c in at.sidebar.caption if "ImageNet weights" in c.value)
    assert "resnet18: available offline" in note and "/hub/resnet50.pth" in note


def test_active_run_shows_progress_and_can_be_stopped(data_in_use, runs_dir, trained_run, monkeypatch):
    live = add_run(trained_run, runs_dir, "live", state="running", pid=os.getpid(), epoch=2, step=1, steps=3,
                   epochs=4, images_per_s=123.4, eta_s=75, train_loss=0.5,
                   step_log=[{"step": 1, "loss": 0.9, "lr": 1e-3}, {"step": 2, "loss": 0.7, "lr": 5e-4}])
    stopped = []
    monkeypatch.setattr(jobs, "stop", lambda path: stopped.append(Path(path)) or True)
    at = app("pages/train.py")
    assert "Active runs (1)" in texts(at)
    bar = at.get("progress")[0]
    assert "epoch 2/4" in bar.proto.text and "step 1/3" in bar.proto.text
    assert bar.proto.value == 33  # (1 + 1/3) of 4 epochs
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["images/s"] == "123" and metrics["ETA"] == "1:15" and "val QWK" in metrics
    (chart,) = at.get("plotly_chart")  # its curves so far
    fig = json.loads(chart.proto.spec)
    titles = [a["text"] for a in fig["layout"]["annotations"]]
    assert titles == ["accuracy", "loss", "QWK", "train loss per step"]
    qwk = [t for t in fig["data"] if t.get("xaxis") == "x3"]
    assert [t["name"] for t in qwk] == ["val", "test"] and len(qwk[0]["y"]) == 2  # QWK of both epochs
    steps = [t for t in fig["data"] if t["name"] in ("step loss", "learning rate")]
    assert [t["y"] for t in steps] == [[0.9, 0.7], [1e-3, 5e-4]]
    at.button(key="stop-live").click().run()
    assert stopped == [live]
    assert "1 run training" in texts(at)


@pytest.mark.parametrize("started, text", [(None, "starting: loading the data and the model"),
                                            (1.7e9, "queued: waiting for the device")])
def test_a_starting_run_is_not_called_queued(data_in_use, runs_dir, trained_run, started, text):
    """Until its process has started and found the device taken, a new run is "starting", not "queued"."""
    add_run(trained_run, runs_dir, "new", state="queued", pid=os.getpid(), started=started, epoch=0, step=0)
    bar = app("pages/train.py").get("progress")[0]
    assert bar.proto.text.startswith(text) and bar.proto.value == 0


def test_failed_run_offers_resume_only_where_it_can_help(data_in_use, runs_dir, trained_run):
    add_run(trained_run, runs_dir, "full-disk", state="failed", error="OSError: [Errno 28] No space left on device")
    add_run(trained_run, runs_dir, "no-weights", state="failed", error="ImageNet weights for resnet50 are not "
            "available offline.", error_type="WeightsUnavailable")
    at = app("pages/train.py")
    assert [b.key for b in at.button if b.label == "Resume"] == ["resume-full-disk"]


def test_interrupted_run_can_be_resumed(data_in_use, runs_dir, trained_run, monkeypatch):
    dead = add_run(trained_run, runs_dir, "dead", state="running", pid=2**22 + 12345)  # no such process
    resumed = []
    monkeypatch.setattr(jobs, "resume", lambda path: resumed.append(Path(path)) or 1)
    at = app("pages/train.py")
    assert "interrupted" in texts(at) and "Active runs (0)" in texts(at)
    at.button(key="resume-dead").click().run()
    assert resumed == [dead]


# ----------------------------------------------------------------------------- compare

def test_compare_survives_broken_and_vanishing_run_folders(data_in_use, runs_dir, trained_run):
    add_run(trained_run, runs_dir, "whole")
    half = runs_dir / "half"
    half.mkdir()
    (half / "config.json").write_text('{"train": {"arch": "resnet18"')  # half-copied
    at = app("pages/compare.py", **{"compare.selected": ["whole", "half"]})
    warnings = " ".join(w.value for w in at.warning)
    assert "half" in warnings and "not valid JSON" in warnings
    shutil.rmtree(runs_dir / "whole")  # deleted while the page is open
    at.run()
    assert not at.exception


def test_compare_groups_seeds_and_diffs_configs(data_in_use, runs_dir, trained_run):
    for seed in (0, 1):
        path = add_run(trained_run, runs_dir, f"seed{seed}")
        config = json.loads((path / "config.json").read_text())
        config["train"]["seed"] = seed
        fileio.write_json(path / "config.json", config)
    at = app("pages/compare.py", **{"compare.selected": ["seed0", "seed1"]})
    groups = at.dataframe[2].value
    assert groups["n"].tolist() == [2] and "±" in groups["qwk"][0]
    diff = at.dataframe[3].value
    assert list(diff.index) == ["seed"]
    at.toggle(key="compare.diff_only").set_value(False).run()
    assert len(at.dataframe[3].value) > 20


def test_compare_renames_tags_and_deletes_with_confirmation(data_in_use, runs_dir, trained_run):
    path = add_run(trained_run, runs_dir, "victim")
    at = app("pages/compare.py", **{"compare.selected": ["victim"]})
    at.text_input(key="compare.name").input("renamed")
    at.text_input(key="compare.tags").input("lab, seed-0")
    at.button(key="compare.save").click().run()
    assert runs.read_meta(path) == {"name": "renamed", "tags": ["lab", "seed-0"]}
    assert at.dataframe[0].value["run"].tolist() == ["renamed"]
    at.button(key="compare.ask_delete").click().run()
    assert path.exists() and any("cannot be undone" in w.value for w in at.warning)
    at.button(key="compare.delete").click().run()
    assert not at.exception and not path.exists()
    assert "No runs yet" in texts(at)


def test_predict_starts_on_the_best_completed_run(data_in_use, runs_dir, trained_run):
    """Not the newest run: the completed one with the highest validation QWK (not test QWK)."""
    for name, qwk, age in (("old-best", 0.9, 30), ("newer-worse", 0.2, 20)):
        path = add_run(trained_run, runs_dir, name, created=time.time() - age)
        rows = runs.read_metrics(path)
        (path / "metrics.jsonl").unlink()  # hard-linked to the trained run: replace, never write into it
        for row in rows:
            share = row["epoch"] / len(rows)
            runs.append_metrics(path, {**row, "val_qwk": qwk * share, "test_qwk": (1 - qwk) * share})
    add_run(trained_run, runs_dir, "newest-stopped", created=time.time() - 10, state="stopped")
    picker = app("pages/predict.py").selectbox(key="predict.run")
    assert picker.value.id == "old-best"
    # newest first, each line naming the run, its state and the split of its QWK
    assert [o.split(" · ")[:2] for o in picker.options] == [
        [f"resnet18-scratch-classify-64px [{i}]", state] for i, state in
        (("newest-stopped", "stopped"), ("newer-worse", "completed"), ("old-best", "completed"))]
    assert picker.options[-1].endswith("val QWK 0.900")


# ----------------------------------------------------------------------------- issue 15: no bad folder breaks a page

@pytest.mark.parametrize("page", PAGES)
def test_one_bad_run_folder_breaks_no_page(page, data_in_use, runs_dir, trained_run):
    """``echo '[]' > meta.json`` (or status.json) in one run folder used to raise on all pages."""
    add_run(trained_run, runs_dir, "good", created=time.time() - 20)
    bad = add_run(trained_run, runs_dir, "bad", created=time.time() - 10)
    for name, text in (("meta.json", "[]"), ("status.json", "null")):
        (bad / name).unlink(missing_ok=True)  # add_run hard-links: never write through to the good run
        (bad / name).write_text(text)
    at = app(page)  # asserts no exception
    listed = {r.id: r for r in runs.list_runs(runs_dir)}
    assert listed["bad"].problems and not listed["good"].problems


@pytest.mark.parametrize("page", PAGES)
def test_a_data_set_that_breaks_while_in_use_keeps_the_sidebar(page, runs_dir, tiny_data, tmp_path):
    """A self-referencing symlink and a file name that is not UTF-8 in the data set in use."""
    data = tmp_path / "data"  # one folder per grade, as in the issue (``ln -s self.jpeg 0/self.jpeg``)
    for split in ("train", "test"):
        for line in (tiny_data / f"{split}.csv").read_text().splitlines()[1:]:
            image, grade = line.split(",")[:2]
            (data / grade).mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny_data / "images" / f"{image}.jpeg", data / grade / f"{image}.jpeg")
    (data / "0" / "self.jpeg").symlink_to("self.jpeg")
    with open(os.path.join(os.fsencode(data / "0"), b"bad\xff.jpeg"), "wb") as f:
        f.write(b"not an image")
    settings.use_dataset(str(data))
    at = app(page)  # asserts no exception
    assert "Switch data set" in [e.label for e in at.sidebar.expander]
    if page == "pages/data.py":
        assert any("self.jpeg" in df.value.to_csv() for df in at.dataframe)  # listed as a problem


# ----------------------------------------------------------------------------- what a new user trips over

def test_item1_compare_marks_a_running_run_and_never_scores_it_as_finished(data_in_use, runs_dir, trained_run):
    """A live run carrying an evaluation (as one written into it by hand would) is shown provisional, not compared."""
    add_run(trained_run, runs_dir, "done", created=1.0)
    live = add_run(trained_run, runs_dir, "live", created=2.0, state="running", pid=os.getpid(), epoch=1, step=3,
                   steps=4, epochs=6)
    config = json.loads((live / "config.json").read_text())
    config["train"]["seed"] = 1  # otherwise the same settings: a seed pair
    (live / "config.json").unlink()
    fileio.write_json(live / "config.json", config)
    before = {name: (live / name).stat().st_mtime_ns for name in ("test.json", "evaluation.json", "predictions.csv")}
    at = app("pages/compare.py", **{"compare.selected": ["done", "live"], "compare.a": "done", "compare.b": "live"})
    text = texts(at)
    assert "still training, epoch 1 of 6: provisional" in text
    assert "Not compared:" in text and "B vs A compares finished runs" in text
    assert not [b for b in at.button if b.key == "compare.evaluate.live"]
    assert "Left out of the seed averages, not finished:" in text and "(provisional)" in text
    results = at.table[0].value  # the test-results table: the live run has no test figures
    assert not any("(provisional)" in str(row) and "±" in " ".join(map(str, row)) for row in results.itertuples())
    assert {name: (live / name).stat().st_mtime_ns for name in before} == before  # nothing written into it


def test_item2_train_cards_name_the_split_of_every_figure(data_in_use, runs_dir, trained_run):
    add_run(trained_run, runs_dir, "done")
    add_run(trained_run, runs_dir, "live", state="running", pid=os.getpid(), epoch=2, step=1, steps=3, epochs=4)
    at = app("pages/train.py")
    text = texts(at)
    assert "(chosen on val): val QWK " in text and ", test QWK " in text and ", test accuracy " in text
    labels = [m.label for m in at.metric]
    assert "val accuracy" in labels and "val QWK" in labels and "test accuracy" not in labels


def test_item3_lab_preset_button_and_estimate_count_the_same_runs(data_in_use, runs_dir, launched, weights_on_disk,
                                                                  probe):
    weights_on_disk.have = {"resnet18"}
    at = app("pages/train.py")
    at.sidebar.selectbox(key="train.preset").select("lab-report").run()
    at.selectbox(key="cfg.device").set_value("cpu")
    at.button(key="train.start").click().run()
    note = next(c.value for c in at.sidebar.caption if c.value.startswith("On this CPU"))
    assert " for 3 runs " in note and at.button(key="train.start").label == "Start 3 of 4 runs"
    assert len(launched) == 3


def test_item3_estimate_uses_this_machines_last_run(data_in_use, runs_dir, trained_run, probe):
    add_run(trained_run, runs_dir, "measured")  # a finished CPU run of resnet18 at 64 px, with its images/s
    at = app("pages/train.py")
    at.selectbox(key="cfg.device").set_value("cpu")
    at.button(key="train.start").click().run()
    note = next(c.value for c in at.sidebar.caption if c.value.startswith("On this CPU"))
    assert "this machine reached in `measured`" in note and "BENCHMARKS.md" not in note
    assert not [c for c in probe.calls if c[0] == "resnet18"]   # a finished run of the model here wins over timing it again


def test_item4_stopped_card_says_where_resume_continues(data_in_use, runs_dir, trained_run):
    add_run(trained_run, runs_dir, "halted", state="stopped", epoch=2, step=1, steps=3, epochs=2)
    text = texts(app("pages/train.py"))
    assert "Stopped in epoch 2 of 2 at step 1 of 3: Resume continues epoch 2 from step 1." in text


def test_item4_queue_message_names_the_run_it_waits_for(data_in_use, runs_dir, trained_run):
    add_run(trained_run, runs_dir, "first", created=1.0, state="running", pid=os.getpid(), epoch=1, step=1, steps=3,
            epochs=2)
    add_run(trained_run, runs_dir, "second", created=2.0, state="queued", pid=os.getpid(), started=1.7e9)
    texts_ = [p.proto.text for p in app("pages/train.py").get("progress")]
    queued = next(t for t in texts_ if t.startswith("queued"))
    assert "is training on it" in queued and "`first`" not in queued  # named by its label, not a placeholder
    label = runs.load_run(runs_dir / "first").config["train"]
    assert TrainConfig.from_dict({**label, "name": ""}).display_name() in queued


def test_item5_data_page_says_split_and_synthetic_in_words(data_in_use, runs_dir):
    text = texts(app())
    assert "val carved from train by patient (10% of its patients, seed 0)" in text and "split: given" not in text
    assert "synthetic default data" in text


def test_item5_compare_says_when_calibration_did_not_help(data_in_use, runs_dir, trained_run):
    path = add_run(trained_run, runs_dir, "cal")
    report = json.loads((path / "test.json").read_text())
    report["calibration"].update(ece_before_temperature=0.019, ece=0.029, temperature=3.11)
    (path / "test.json").unlink()
    fileio.write_json(path / "test.json", report)
    text = texts(app("pages/compare.py", **{"compare.selected": ["cal"]}))
    assert "temperature scaling did not help on test: ECE 0.019 before, 0.029 after" in text


def test_item5_cli_help_has_no_backticks_and_predict_explains_its_arguments():
    top = run_cli("--help")
    assert top.returncode == 0 and "``" not in top.stdout and "python -m retino VERB --help" in top.stdout
    predict = run_cli("predict", "--help").stdout
    assert "the run folder" in predict and "fundus photographs" in predict


def test_item5_evaluate_says_when_calibration_did_not_help(runs_dir, trained_run):
    """The calibration line says so exactly when the temperature made test ECE worse than none."""
    path = add_run(trained_run, runs_dir, "cal")
    chosen = json.loads((path / "evaluation.json").read_text())
    worse = 0
    for temperature in (0.05, 25.0):  # far sharper and far softer than fitted: at least one hurts
        (path / "evaluation.json").unlink()
        fileio.write_json(path / "evaluation.json", {**chosen, "temperature": temperature})
        out = run_cli("evaluate", path)
        assert out.returncode == 0, out.stderr
        line = next(l for l in out.stdout.splitlines() if l.strip().startswith("calibration"))
        after, before = (float(x) for x in re.search(r"ECE ([\d.]+) \(before temperature ([\d.]+)", line).groups())
        said = ": temperature scaling did not help on test: ECE" in line
        assert said == (after > before), line
        worse += after > before
    assert worse, "neither temperature made test ECE worse: the message was never exercised"


def test_item6_make_run_says_where_to_go_and_a_display_opens_a_browser():
    make = (REPO / "Makefile").read_text()
    run_target = make.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "http://localhost:8501" in run_target and "echo" in run_target
    assert "about 1-2 minutes" in make  # the first start's data set, said before it is made
    conf = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert "headless" not in conf["server"] and conf["server"]["showEmailPrompt"] is False


def test_item6_export_check_prints_no_torchscript_deprecation(runs_dir, trained_run, tmp_path):
    out = run_cli("export", add_run(trained_run, runs_dir, "exp"), "--format", "torchscript", "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "deprecated" not in out.stderr and (tmp_path / "model.pt").is_file()
