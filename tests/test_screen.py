"""retino.screening.screen: a folder graded per photo and per patient, bad files as rows, resumed screens, the
operating point, the quality gate, the CLI verb and the Screen page.

Runs are freshly initialised ResNet-18s at 64 px saved as run folders (the numbers are meaningless,
the rows, files, thresholds and exit codes are not); photos are synthetic fundus images at 256 px,
large enough for the quality gate to measure.
"""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

from conftest import REPO, run_cli
from retino import paths
from retino.inference import quality
from retino import runs
from retino.config import TrainConfig
from retino.data.preprocess import load_image
from retino.data.synthetic import degrade_photo, render_fundus
from retino.models import build_model, normalization
from retino.inference.predict import predict
from retino.screening.screen import screen
from retino.screening.screen_report import ScreenError, patient_table, read_report
from retino.screening.screen_paths import default_report as screen_default_report
from retino import fileio

SIZE = 64    # the runs' image size
PHOTO = 256  # the photos' size
GOOD = {"1_left.jpeg": 0, "1_right.jpeg": 3, "2_left.jpeg": 1, "2_right.jpeg": 2, "sub/3_left.jpeg": 4,
        "sub/3_right.JPG": 0}  # name -> grade drawn


def fresh_run(run_dir: Path, *, head: str = "classify", seed: int = 0) -> Path:
    """A completed run folder holding a freshly initialised model, saved as training saves one."""
    cfg = TrainConfig(image_size=SIZE, head=head, loss="mse" if head == "regress" else "ce")
    torch.manual_seed(seed)
    model = build_model(cfg.arch, pretrained=False, head=head).eval()
    norm = normalization(cfg.arch, False)
    run_dir.mkdir(parents=True)
    runs.write_config(run_dir, cfg.to_dict(), dataset={}, norm=norm, world=1, device="cpu", data_fingerprint="")
    runs.save_checkpoint(run_dir / "best.pt", {"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1,
                                               "thresholds": [0.5, 1.5, 2.5, 3.5],
                                               "norm": {"mean": list(norm[0]), "std": list(norm[1])}})
    runs.append_metrics(run_dir, {"epoch": 1, "val_qwk": 0.5 + seed / 10})
    runs.write_status(run_dir, state="completed")
    return run_dir


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    return fresh_run(tmp_path_factory.mktemp("screen-runs") / "20260101-000000-classify")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: render_fundus(grade, eye="left" if "left" in name else "right", size=PHOTO, seed=i)[0]
            for i, (name, grade) in enumerate(GOOD.items())}


def write_photos(folder: Path, photos: dict[str, np.ndarray]) -> Path:
    for name, rgb in photos.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(path, format="PNG" if name.endswith(".png") else "JPEG", quality=95)
    return folder


def screen_page() -> AppTest:
    """The dashboard opened on the Screen page (a run must be in the runs folder)."""
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/screen.py").run()
    return at


def start_screen(at: AppTest, folder: Path) -> AppTest:
    """Screen ``folder`` from the page: decoded here (no worker processes), gate off, Start clicked."""
    at.text_input(key="screen.folder").input(str(folder))
    at.number_input(key="screen.workers").set_value(0)
    at.toggle(key="screen.gate").set_value(False)
    at.run()
    return at.button(key="screen.start").click().run()


def with_evaluation(run: Path, tmp_path: Path, **chosen) -> Path:
    """A copy of ``run`` with an evaluation.json as training writes one (temperature, operating point)."""
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    fileio.write_json(copy / "evaluation.json", {"selected_on": "val", "temperature": 1.0, "epoch": 1,
                                               "head": "classify", "thresholds": [0.5, 1.5, 2.5, 3.5], **chosen})
    return copy


# ----------------------------------------------------------------------------- the CLI on a folder with bad files

def test_cli_screens_a_folder_with_bad_files(classify_run, photos, tmp_path):
    folder = write_photos(tmp_path / "day", photos)
    good = (folder / "1_left.jpeg").read_bytes()
    (folder / "corrupt.jpeg").write_bytes(good[:len(good) // 3])   # cut off mid-scan
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image at all\n")
    (folder / "readme.txt").write_text("ignored: not a photo")
    (folder / ".hidden.jpg").write_bytes(good)                      # hidden: skipped
    (folder / "sub" / "loop").symlink_to("..")                      # a symlink loop back to the top
    with open(os.fsencode(folder) + b"/\xff\xfe_left.jpeg", "wb") as f:  # a name that is not UTF-8
        f.write(good)
    out = tmp_path / "reports" / "day.csv"
    result = run_cli("screen", classify_run, folder, "--out", out, "--workers", 1, "--batch-size", 4, "--json",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    table = read_report(out)
    assert summary["photos"] == len(table) == len(GOOD) + 5
    assert summary["graded"] == len(GOOD) and summary["errors"] == 5
    rows = table.set_index("image")
    bad_name = "\ufffd\ufffd_left.jpeg"  # the undecodable bytes shown as replacement characters
    assert set(rows.index) == set(GOOD) | {"corrupt.jpeg", "empty.jpg", "notes.png", "sub/loop/", bad_name}
    graded = rows.loc[list(GOOD)]
    assert graded["grade"].notna().all() and graded["error"].eq("").all()
    np.testing.assert_allclose(graded[[f"p{g}" for g in range(5)]].sum(axis=1), 1.0, atol=1e-4)
    assert rows.loc["empty.jpg", "error"].startswith("empty.jpg: the file is empty")
    assert rows.loc["corrupt.jpeg", "error"].startswith("corrupt.jpeg: ")
    assert rows.loc["notes.png", "error"].startswith("notes.png: not an image")
    assert "symlink loop" in rows.loc["sub/loop/", "error"]
    assert "not valid UTF-8" in rows.loc[bad_name, "error"]
    bad = rows.loc[["corrupt.jpeg", "empty.jpg", "notes.png"]]
    assert bad["grade"].isna().all() and bad["p0"].isna().all()
    patients = pd.read_csv(out.with_name("day.patients.csv"), dtype={"patient": str})
    assert list(patients.columns[:5]) == ["patient", "status", "referable", "worst_grade", "eyes"]
    by_id = patients.set_index("patient")
    assert {"1", "2", "3"} <= set(by_id.index) and "sub/loop/" not in by_id.index
    assert by_id.loc["3", "eyes"] == "left+right" and by_id.loc["3", "photos"] == 2
    assert json.loads(out.with_name("day.json").read_text())["summary"]["complete"] is True


def test_cli_refuses_a_missing_folder_in_one_line(classify_run, tmp_path):
    result = run_cli("screen", classify_run, tmp_path / "nowhere", "--quiet")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'}: does not exist; expected a "
                                                  f"folder of JPEG or PNG photographs"]


# ----------------------------------------------------------------------------- resuming

def test_interrupted_screen_resumes_without_duplicates(classify_run, photos, tmp_path):
    folder = write_photos(tmp_path / "day", photos)
    out = tmp_path / "report.csv"
    seen = []

    def killed_after_first_batch(done, total):
        seen.append((done, total))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        screen(classify_run, folder, out, batch_size=2, workers=0, on_progress=killed_after_first_batch)
    assert seen == [(2, len(GOOD))]
    first = read_report(out)
    assert list(first["image"]) == ["1_left.jpeg", "1_right.jpeg"]  # the first batch, flushed
    with open(out, "a") as f:  # the second batch's write cut short by the kill
        f.write("2_left.jpeg,2,left,1,0.2")
    result = screen(classify_run, folder, out, batch_size=2, workers=0)
    assert result.skipped == 2 and result.new == len(GOOD) - 2 and result.complete
    table = read_report(out)
    assert sorted(table["image"]) == sorted(GOOD) and table["image"].is_unique
    pd.testing.assert_frame_equal(table[table["image"].isin(first["image"])].reset_index(drop=True), first)
    assert len(pd.read_csv(result.patients_report)) == 3  # the patient table rewritten from all rows
    again = screen(classify_run, folder, out, batch_size=2, workers=0)  # nothing left to do
    assert again.new == 0 and again.skipped == len(GOOD)
    pd.testing.assert_frame_equal(read_report(out), table)


def test_a_stop_request_ends_after_the_batch_with_both_tables_written(classify_run, photos, tmp_path):
    import threading
    stop = threading.Event()
    stop.set()  # as SIGTERM or Ctrl-C in the CLI set it
    folder = write_photos(tmp_path / "day", photos)
    result = screen(classify_run, folder, tmp_path / "r.csv", batch_size=2, workers=0, quality_gate=False, stop=stop)
    assert not result.complete and result.new == 2 and len(read_report(result.report)) == 2
    assert list(pd.read_csv(result.patients_report, dtype={"patient": str})["patient"]) == ["1"]
    assert json.loads(result.meta.read_text())["summary"]["complete"] is False


def test_bad_folders_and_reports_are_refused_in_one_line(classify_run, photos, tmp_path):
    folder = write_photos(tmp_path / "day", dict(list(photos.items())[:2]))
    out = tmp_path / "report.csv"
    screen(classify_run, folder, out, workers=0, quality_gate=False)
    with pytest.raises(ScreenError, match="tta False"):
        screen(classify_run, folder, out, workers=0, quality_gate=False, tta=True)
    foreign = tmp_path / "theirs.csv"
    foreign.write_text("a,b\n1,2\n")
    with pytest.raises(ScreenError, match="not written by retino screen"):
        screen(classify_run, folder, foreign, workers=0)
    with pytest.raises(ScreenError, match="ending in .csv"):
        screen(classify_run, folder, tmp_path / "report.txt", workers=0)
    with pytest.raises(ScreenError) as missing:
        screen(classify_run, tmp_path / "nowhere", workers=0)
    assert str(missing.value) == f"{tmp_path / 'nowhere'}: does not exist; expected a folder of JPEG or PNG photographs"


# ----------------------------------------------------------------------------- grades, temperature, operating point

@pytest.mark.parametrize("tta", [False, True])
def test_grades_equal_predict_one_photo_at_a_time(classify_run, photos, tmp_path, tta):
    folder = write_photos(tmp_path / "day", photos)
    table = screen(classify_run, folder, tmp_path / "r.csv", batch_size=4, workers=0, tta=tta,
                   quality_gate=False).photos.set_index("image")
    for name in GOOD:
        (one,) = predict(classify_run, [folder / name], tta=tta)
        np.testing.assert_allclose(table.loc[name, [f"p{g}" for g in range(5)]].to_numpy(float), one.probs,
                                   atol=1e-4)
        assert table.loc[name, "grade"] == one.grade


def test_the_runs_temperature_is_applied(classify_run, photos, tmp_path):
    folder = write_photos(tmp_path / "day", photos)
    plain = screen(classify_run, folder, tmp_path / "plain.csv", workers=0, quality_gate=False).photos
    op = {"threshold": None, "target_sensitivity": 0.9, "error": "The validation set has no referable image"}
    run = with_evaluation(classify_run, tmp_path, temperature=2.0, operating_point=op)
    result = screen(run, folder, tmp_path / "warm.csv", workers=0, quality_gate=False)
    p = plain[[f"p{g}" for g in range(5)]].to_numpy(float) ** 0.5  # softmax(z / 2) = sqrt(softmax(z)), renormalised
    np.testing.assert_allclose(result.photos[[f"p{g}" for g in range(5)]].to_numpy(float),
                               p / p.sum(1, keepdims=True), atol=2e-5)
    assert result.threshold == 0.5 and "no referable image" in result.threshold_source


def test_operating_point_flips_one_eye_and_the_patient_follows(classify_run, photos, tmp_path):
    folder = write_photos(tmp_path / "day", photos)
    plain = screen(classify_run, folder, tmp_path / "plain.csv", workers=0, quality_gate=False).photos
    assert (plain["referable"] == (plain["referable_score"] >= 0.5)).all()  # the default cut
    score = plain.set_index("image")["referable_score"]
    high, low = sorted(["1_left.jpeg", "1_right.jpeg"], key=score.get, reverse=True)
    assert score[high] > score[low]
    cut = (score[high] + score[low]) / 2  # between patient 1's eyes
    run = with_evaluation(classify_run, tmp_path, operating_point={"threshold": cut, "target_sensitivity": 0.9})
    result = screen(run, folder, tmp_path / "op.csv", workers=0, quality_gate=False)
    rows = result.photos.set_index("image")
    assert result.threshold == cut and "operating point" in result.threshold_source
    assert rows.loc[high, "referable"] and not rows.loc[low, "referable"]
    assert (rows["referable"] == (rows["referable_score"] >= cut)).all()
    patient = result.patients.set_index("patient").loc["1"]
    assert patient["referable"] and patient["worst_grade"] == rows.loc[[high, low], "grade"].max()
    assert list(result.patients["referable"]) == sorted(result.patients["referable"], reverse=True)  # referable first


def test_regress_head_cuts_its_score(tmp_path, photos):
    run = fresh_run(tmp_path / "runs" / "regress", head="regress")
    folder = write_photos(tmp_path / "day", photos)
    table = screen(run, folder, tmp_path / "r.csv", workers=0, quality_gate=False).photos
    assert table["score"].notna().all() and table["p0"].isna().all()
    assert (table["referable"] == (table["score"] >= 1.5)).all()
    cut = float(table["score"].median())
    fileio.write_json(run / "evaluation.json", {"selected_on": "val", "temperature": 1.0, "head": "regress",
                                              "operating_point": {"threshold": cut, "target_sensitivity": 0.9}})
    again = screen(run, folder, tmp_path / "op.csv", workers=0, quality_gate=False).photos
    assert (again["referable"] == (again["score"] >= cut)).all() and 0 < again["referable"].sum() < len(again)


# ----------------------------------------------------------------------------- patients and the quality gate

def test_patient_table_known_answers():
    rows = pd.DataFrame({
        "patient": ["a", "a", "b", "b", "c", "c", "d", "e"],
        "eye": ["left", "right", "left", "right", "left", "right", "left", ""],
        "grade": pd.array([3, 0, 1, 1, None, 2, None, 0], dtype="Int64"),
        "referable": pd.array([True, False, False, False, None, True, None, False], dtype="boolean"),
    })
    table = patient_table(rows).set_index("patient")
    assert list(table.index) == ["a", "c", "d", "b", "e"]  # referable by worst grade, then ungraded, then the rest
    assert table.loc["a", "referable"] and table.loc["a", "worst_grade"] == 3  # one eye referable is enough
    assert not table.loc["b", "referable"] and table.loc["b", "worst_grade"] == 1
    assert table.loc["c", "referable"] and table.loc["c", "ungraded"] == 1 and table.loc["c", "eyes"] == "left+right"
    assert pd.isna(table.loc["d", "referable"]) and pd.isna(table.loc["d", "worst_grade"])
    assert table.loc["e", "eyes"] == "" and table.loc["e", "photos"] == 1
    assert dict(table["status"]) == {"a": "refer", "c": "refer", "d": "refer: ungraded eye", "b": "no referral",
                                     "e": "no referral"}


def test_quality_gate_rejects_a_non_fundus_and_flags_a_dark_one(classify_run, photos, tmp_path):
    words = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(words)
    for i in range(10):
        draw.text((20, 20 + 44 * i), f"Screenshot line {i}: File Edit View Help", fill="black")
    folder = write_photos(tmp_path / "day", {"7_left.jpeg": photos["1_left.jpeg"],
                                              "7_right.jpeg": degrade_photo(photos["1_right.jpeg"], "dark", seed=1)[0],
                                              "screenshot.png": np.asarray(words)})
    verdicts = {n: quality.assess(load_image(folder / n)).verdict for n in ("7_left.jpeg", "7_right.jpeg",
                                                                            "screenshot.png")}
    assert verdicts == {"7_left.jpeg": "ok", "7_right.jpeg": "ungradable", "screenshot.png": "not_fundus"}
    rows = screen(classify_run, folder, tmp_path / "r.csv", workers=0).photos.set_index("image")
    good = rows.loc["7_left.jpeg"]  # an ok photo's reasons say at most why its referral and grade part
    assert good["quality"] == "ok" and (good["reasons"] == "" or good["reasons"].startswith(
        ("referable although", "not referable although")))
    dark = rows.loc["7_right.jpeg"]
    assert dark["quality"] == "ungradable" and "too dark" in dark["reasons"] and pd.notna(dark["grade"])
    shot = rows.loc["screenshot.png"]
    assert shot["quality"] == "not_fundus" and pd.isna(shot["grade"]) and shot["reasons"]
    assert shot["error"].startswith("screenshot.png: not a fundus photograph: ")
    ungated = screen(classify_run, folder, tmp_path / "all.csv", workers=0, quality_gate=False).photos
    assert ungated["grade"].notna().all() and ungated["quality"].eq("").all()


# ----------------------------------------------------------------------------- the page

def test_screen_page_without_runs_says_what_to_do():
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/screen.py").run()
    assert not at.exception, at.exception
    assert any("No completed run" in i.value for i in at.info) and not at.main.button


def test_screen_page_runs_a_screen_and_offers_both_reports(photos, tmp_path):
    root = paths.runs_root()
    fresh_run(root / "20260101-000000-worse", seed=0)
    fresh_run(root / "20260101-000001-better", seed=1)  # val QWK 0.6: listed first
    folder = write_photos(tmp_path / "day", dict(list(photos.items())[:4]))
    at = screen_page()
    assert not at.exception, at.exception
    assert "20260101-000001-better" in at.selectbox(key="screen.run").options[0]
    start_screen(at, folder)
    assert not at.exception, at.exception
    assert not at.main.error, [e.value for e in at.main.error]
    patients, photo_table = at.dataframe[0].value, at.dataframe[1].value
    assert list(patients["referable"]) == sorted(patients["referable"], reverse=True)  # referable first
    assert set(patients["patient"]) == {"1", "2"} and len(photo_table) == 4
    assert len(at.get("download_button")) == 2
    assert not list(folder.glob("*.csv"))  # the default report is under the runs folder, not among the photos
    report = screen_default_report(folder, root / "20260101-000001-better")
    assert report.is_file() and report.is_relative_to(root)


# ----------------------------------------------------------------------------- patients with an ungraded eye

def never_referable(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` whose operating point no photo reaches: only an ungraded eye can refer a patient."""
    return with_evaluation(run, tmp_path, operating_point={"threshold": 1.0, "target_sensitivity": 0.9})


def screenshot() -> np.ndarray:
    words = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(words)
    for i in range(10):
        draw.text((20, 20 + 44 * i), f"Screenshot line {i}: File Edit View Help", fill="black")
    return np.asarray(words)


def test_a_refused_left_eye_refers_its_patient_for_the_ungraded_eye(classify_run, tmp_path):
    grade1 = render_fundus(1, eye="right", size=PHOTO, seed=11)[0]
    folder = write_photos(tmp_path / "day", {"9_left.jpeg": screenshot(), "9_right.jpeg": grade1,
                                              "8_left.jpeg": render_fundus(0, eye="left", size=PHOTO, seed=12)[0],
                                              "8_right.jpeg": render_fundus(1, eye="right", size=PHOTO, seed=13)[0]})
    result = screen(never_referable(classify_run, tmp_path), folder, tmp_path / "r.csv", workers=0)
    rows = result.photos.set_index("image")
    assert rows.loc["9_left.jpeg", "quality"] == "not_fundus" and pd.notna(rows.loc["9_right.jpeg", "grade"])
    assert not rows["referable"].fillna(False).any()  # no eye is referable at this cut
    patients = result.patients.set_index("patient")
    assert patients.loc["9", "status"] == "refer: ungraded eye" and patients.loc["9", "ungraded"] == 1
    assert pd.isna(patients.loc["9", "referable"])  # never "not referable" while an eye went ungraded
    assert patients.loc["8", "status"] == "no referral" and not patients.loc["8", "referable"]
    assert list(result.patients["patient"]) == ["9", "8"]  # the patient to refer first
    s = result.summary()
    assert (s["referable_patients"], s["ungraded_patients"], s["patients_to_refer"]) == (0, 1, 1)
    written = pd.read_csv(result.patients_report, dtype=str, keep_default_na=False).set_index("patient")
    assert written.loc["9", "status"] == "refer: ungraded eye" and written.loc["8", "status"] == "no referral"


def test_an_ungradable_eye_refers_its_patient_too(classify_run, photos, tmp_path):
    dark = degrade_photo(photos["1_right.jpeg"], "dark", seed=1)[0]
    folder = write_photos(tmp_path / "day", {"7_left.jpeg": photos["1_left.jpeg"], "7_right.jpeg": dark})
    result = screen(never_referable(classify_run, tmp_path), folder, tmp_path / "r.csv", workers=0)
    assert result.photos.set_index("image").loc["7_right.jpeg", "quality"] == "ungradable"
    assert result.patients.set_index("patient").loc["7", "status"] == "refer: ungraded eye"


def test_patient_ids_drop_the_file_extension(classify_run, photos, tmp_path):
    folder = write_photos(tmp_path / "day", {"000c1434d8d7.png": photos["1_left.jpeg"],
                                              "sub/1a2b.JPG": photos["1_right.jpeg"]})
    result = screen(classify_run, folder, tmp_path / "r.csv", workers=0, quality_gate=False)
    assert sorted(result.photos["patient"]) == ["000c1434d8d7", "sub/1a2b"]
    assert sorted(result.patients["patient"]) == ["000c1434d8d7", "sub/1a2b"]


@pytest.mark.parametrize("content", ["empty", "not_fundus"])
def test_a_folder_where_nothing_can_be_graded_writes_every_file(classify_run, tmp_path, content):
    folder = tmp_path / "day"
    folder.mkdir()
    if content == "empty":
        (folder / "5_left.jpg").write_bytes(b"")
    else:
        write_photos(folder, {"5_left.jpg": screenshot(), "5_right.jpg": screenshot()})
    result = screen(classify_run, folder, tmp_path / "r.csv", workers=0)
    assert result.photos["grade"].isna().all() and result.complete
    assert result.report.is_file() and result.patients_report.is_file() and result.meta.is_file()
    patient = pd.read_csv(result.patients_report, dtype=str, keep_default_na=False).set_index("patient").loc["5"]
    assert patient["status"] == "refer: ungraded eye" and patient["referable"] == "" and patient["worst_grade"] == ""
    assert result.summary()["ungraded_patients"] == 1


def test_screen_page_shows_a_patient_with_a_refused_eye_as_referred(photos, tmp_path):
    run = never_referable(fresh_run(tmp_path / "src" / "20260101-000000-run"), tmp_path)
    shutil.copytree(run, paths.runs_root() / run.name)
    folder = write_photos(tmp_path / "day", {"9_left.jpeg": screenshot(), "9_right.jpeg": photos["2_left.jpeg"]})
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/screen.py").run()
    at.text_input(key="screen.folder").input(str(folder))
    at.number_input(key="screen.workers").set_value(0)
    at.run()
    at.button(key="screen.start").click().run()
    assert not at.exception, at.exception
    patients = at.dataframe[0].value
    assert list(patients["status"]) == ["refer: ungraded eye"]
    assert [m.value for m in at.metric][:2] == ["1", "1"]  # 1 patient, 1 to refer
    assert any("0 referable, 1 refer: ungraded eye" in m.value for m in at.markdown)
    at.multiselect(key="screen.status").set_value(["no referral"]).run()
    assert at.dataframe[0].value.empty  # the status filter
