"""Where a screen reads and writes: never into a run folder or over another program's file, one screen a
report at a time, no system folders, no links out of the folder, a question before a huge folder, and one
line for paths the file system cannot take."""
import json
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, run_cli
from retino import paths
from retino import runs
from retino.screening.screen import screen
from retino.screening.screen_report import ScreenError, report_paths
from retino.screening.screen_paths import MAX_FILES, TooManyPhotos, find_photos
from retino.screening.screen_paths import check_out, default_report, report_lock
from test_screen import fresh_run, photos as photos  # noqa: F401  (the fixture)
from test_screen import screen_page, start_screen, write_photos
from retino import fileio


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return fresh_run(tmp_path_factory.mktemp("paths-runs") / "20260101-000000-run")


@pytest.fixture
def day(photos, tmp_path) -> Path:
    return write_photos(tmp_path / "day", dict(list(photos.items())[:2]))


def test_out_in_a_run_folder_is_refused_and_the_run_is_untouched(run, day, tmp_path):
    evaluation = {"selected_on": "val", "temperature": 1.5}
    fileio.write_json(run / "evaluation.json", evaluation)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ScreenError, match="is a run folder"):
        screen(run, day, run / "evaluation.csv", workers=0)
    assert json.loads((run / "evaluation.json").read_text()) == evaluation
    assert sorted(p.name for p in run.iterdir()) == before
    (run / "evaluation.json").unlink()


@pytest.mark.parametrize("foreign", ["day.json", "day.patients.csv"])
def test_out_never_replaces_a_file_the_screen_did_not_write(run, day, tmp_path, foreign):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / foreign).write_text("someone else's\n")
    with pytest.raises(ScreenError, match=f"{foreign}.* did not write"):
        screen(run, day, reports / "day.csv", workers=0)
    assert (reports / foreign).read_text() == "someone else's\n" and not (reports / "day.csv").exists()


def test_out_that_is_a_link_is_refused(run, day, tmp_path):
    target = tmp_path / "elsewhere.csv"
    (tmp_path / "day.csv").symlink_to(target)
    with pytest.raises(ScreenError, match="is a link"):
        screen(run, day, tmp_path / "day.csv", workers=0)
    assert not target.exists()


def test_a_second_screen_on_the_same_report_is_refused_naming_the_pid(run, day, tmp_path):
    out = tmp_path / "day.csv"
    with report_lock(report_paths(out)):  # as another screen holds it
        with pytest.raises(ScreenError, match=f"being written by another screen \\(pid {os.getpid()}\\)"):
            screen(run, day, out, workers=0, quality_gate=False)
    result = screen(run, day, out, workers=0, quality_gate=False)  # released: the screen runs
    assert result.complete and len(result.photos) == 2


def test_two_screen_processes_on_one_report_do_not_interleave(run, day, tmp_path):
    out = tmp_path / "day.csv"
    holder = f"""
import sys, time
from retino.screening.screen_report import report_paths
from retino.screening.screen_paths import report_lock
with report_lock(report_paths(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        result = run_cli("screen", run, day, "--out", out, "--workers", 0, "--quiet")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: {out}: is being written by another screen (pid {proc.pid}); wait for it to finish or choose "
            f"another report file"]
        assert not out.exists()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("folder", ["/", "/dev", "/proc", "/etc", "/sys/class"])
def test_system_folders_are_refused(folder):
    with pytest.raises(ScreenError, match="is a system folder"):
        find_photos(folder)


def test_a_link_to_a_system_folder_is_refused(run, tmp_path):
    (tmp_path / "photos").symlink_to("/etc")
    with pytest.raises(ScreenError, match="/etc is a system folder"):
        screen(run, tmp_path / "photos", tmp_path / "r.csv", workers=0)
    assert not (tmp_path / "r.csv").exists()


def test_a_report_is_never_written_into_a_system_folder(tmp_path):
    with pytest.raises(ScreenError, match="/dev is a system folder"):
        check_out(report_paths("/dev/report.csv"))
    (tmp_path / "etc").symlink_to("/etc")
    with pytest.raises(ScreenError, match="/etc is a system folder"):
        check_out(report_paths(tmp_path / "etc" / "report.csv"))


def test_links_out_of_the_folder_are_not_followed(photos, tmp_path):
    outside = write_photos(tmp_path / "outside", {"4_left.jpeg": photos["1_left.jpeg"]})
    folder = write_photos(tmp_path / "day", {"1_left.jpeg": photos["1_left.jpeg"]})
    (folder / "more").symlink_to(outside)
    (folder / "4_right.jpeg").symlink_to(outside / "4_left.jpeg")
    (folder / "inside").symlink_to(folder / "1_left.jpeg")  # a link inside the folder is followed
    found, problems = find_photos(folder)
    assert [image for image, _ in found] == ["1_left.jpeg"]
    errors = {r["image"]: r["error"] for r in problems}
    assert set(errors) == {"more/", "4_right.jpeg"}
    assert "outside the folder screened: not followed" in errors["more/"]
    assert "outside the folder screened: not read" in errors["4_right.jpeg"]


def test_the_default_report_is_under_the_runs_folder(day, run):
    report = default_report(day, run)
    assert report.is_relative_to(paths.runs_root()) and not report.is_relative_to(day)
    assert default_report(day, run) == report  # the same folder resumes the same report
    other = day.parent / "other" / day.name
    assert default_report(other, run) != report  # two folders of one name keep apart
    assert not runs.list_runs()  # the screens folder is not a run


def test_a_folder_of_more_photos_than_the_limit_asks_first(run, photos, tmp_path):
    folder = write_photos(tmp_path / "day", dict(list(photos.items())[:3]))
    with pytest.raises(TooManyPhotos, match="more than 2 photos"):
        find_photos(folder, limit=2)
    assert len(find_photos(folder, limit=3)[0]) == 3 and MAX_FILES >= 1000
    result = run_cli("screen", run, folder, "--out", tmp_path / "r.csv", "--max-files", 2, "--quiet")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "more than 2 photos" in result.stderr and "--yes" in result.stderr
    assert not (tmp_path / "r.csv").exists()
    result = run_cli("screen", run, folder, "--out", tmp_path / "r.csv", "--max-files", 2, "--yes", "--quiet",
                     "--workers", 0, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["photos"] == 3


@pytest.mark.parametrize("args, expected", [
    (lambda t: ["~nosuchuser/photos"], "no such user 'nosuchuser'"),
    (lambda t: [str(t / ("x" * 5000))], "at most 255 are allowed"),
    (lambda t: [str(t / "day"), "--out", str(t / ("r" * 300 + ".csv"))], "cannot be a report file"),
])
def test_cli_answers_impossible_paths_in_one_line(run, day, tmp_path, args, expected):
    result = run_cli("screen", run, *args(tmp_path), "--quiet", "--workers", 0)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert len(lines[0]) < 400  # the 5,000-character path is shortened


@pytest.mark.parametrize("folder, out, expected", [
    ("~nosuchuser/photos", "", "no such user"),
    ("/tmp/" + "p" * 5000, "", "at most 255 are allowed"),
    ("DAY", "/tmp/" + "r" * 300 + ".csv", "cannot be a report file"),
    ("/dev", "", "system folder"),
])
def test_screen_page_answers_bad_paths_in_one_line(day, tmp_path, folder, out, expected):
    fresh_run(paths.runs_root() / "20260101-000000-run")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/screen.py").run()
    at.text_input(key="screen.folder").input(folder.replace("DAY", str(day)))
    at.text_input(key="screen.out").input(out)
    at.run()
    at.button(key="screen.start").click().run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.main.error]
    assert len(errors) == 1 and expected in errors[0].replace("\\", "") and "\n" not in errors[0], errors
    assert not at.dataframe


def test_screen_page_asks_before_a_folder_above_the_limit(photos, tmp_path, monkeypatch):
    from retino.screening import screen_paths
    monkeypatch.setattr(screen_paths, "MAX_FILES", 2)
    fresh_run(paths.runs_root() / "20260101-000000-run")
    folder = write_photos(tmp_path / "day", dict(list(photos.items())[:3]))
    at = start_screen(screen_page(), folder)
    assert not at.exception, at.exception
    assert any("more than 2 photos" in w.value for w in at.main.warning) and not at.dataframe
    at.button(key="screen.confirm").click().run()
    assert not at.exception, at.exception
    assert len(at.dataframe[1].value) == 3  # every photo screened once confirmed
