"""The Screen page's Stop: a screen stopped half-way shows what its report holds and resumes where it stopped."""
import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO
from retino import paths
from retino.screening.screen import screen
from retino.screening.screen_report import read_report
from retino.screening.screen_paths import default_report
from test_screen import GOOD, fresh_run, photos as photos  # noqa: F401  (the fixture)
from test_screen import screen_page, start_screen, write_photos


def test_screen_page_offers_stop_and_shows_progress_counts(photos, tmp_path):
    fresh_run(paths.runs_root() / "20260101-000000-run")
    folder = write_photos(tmp_path / "day", dict(list(photos.items())[:2]))
    at = start_screen(screen_page(), folder)
    assert not at.exception, at.exception
    assert at.button(key="screen.stop").label == "Stop"  # shown while the screen ran
    # the bar's last text before "Done" is a count; AppTest keeps the final state
    assert "Done" in [p.proto.text for p in at.get("progress")][0]


def test_a_stopped_screen_shows_its_report_so_far_and_start_resumes_it(photos, tmp_path):
    run = fresh_run(paths.runs_root() / "20260101-000000-run")
    folder = write_photos(tmp_path / "day", photos)
    report = default_report(folder, run)

    def stopped_after_first_batch(done, total):
        raise KeyboardInterrupt  # as the page's script run is ended by a click on Stop

    with pytest.raises(KeyboardInterrupt):
        screen(run, folder, report, batch_size=2, workers=0, quality_gate=False, on_progress=stopped_after_first_batch)
    assert len(read_report(report)) == 2
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("pages/screen.py").run()
    at.session_state["screen.job"] = {"folder": str(folder), "report": str(report)}  # what the stopped run left
    at.text_input(key="screen.folder").input(str(folder))
    at.number_input(key="screen.workers").set_value(0)
    at.toggle(key="screen.gate").set_value(False)
    at.run()
    assert not at.exception, at.exception
    assert any(w.value.startswith("Stopped") for w in at.main.warning)
    assert len(at.dataframe[1].value) == 2  # the photos graded before the stop
    at.button(key="screen.start").click().run()
    assert not at.exception, at.exception
    assert not any(w.value.startswith("Stopped") for w in at.main.warning)
    assert any("2 photos were already in the report" in c.value for c in at.caption)
    assert sorted(read_report(report)["image"]) == sorted(GOOD)  # resumed: every photo once
