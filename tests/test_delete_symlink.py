"""Compare -> Delete on a run that is a symlink to another run removes the link, never the run it points to."""
from streamlit.testing.v1 import AppTest

from conftest import REPO
from retino import paths
from retino import runs
from test_screen import fresh_run


def test_deleting_a_linked_run_removes_the_link_only(tmp_path):
    root = paths.runs_root()
    target = fresh_run(root / "20260101-000000-real")
    link = root / "20260101-000001-link"
    link.symlink_to(target)
    runs.delete_run(link)
    assert not link.exists() and not link.is_symlink()
    assert (target / "best.pt").is_file() and (target / "config.json").is_file()
    runs.delete_run(target)  # a real run folder is still deleted
    assert not target.exists()


def test_compare_page_delete_on_a_link_keeps_the_target(tmp_path):
    root = paths.runs_root()
    elsewhere = fresh_run(tmp_path / "kept" / "20260101-000000-real")
    link = root / "20260101-000001-link"
    root.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere)
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/compare.py").run()
    at.button(key="compare.ask_delete").click().run()
    at.button(key="compare.delete").click().run()
    assert not at.exception, at.exception
    assert not link.is_symlink() and (elsewhere / "best.pt").is_file()
