"""Screen's in-process read-ahead: a thread decodes the next photos while a batch is graded, and the
report is the one decoding each photo on demand gives."""
import threading

import pandas as pd
import pytest

from retino.data.synthetic import render_fundus
from retino.screening import screen as screening
from retino.screening.screen_report import read_report
from test_screen import GOOD, PHOTO, fresh_run, write_photos

ITEMS = [(f"{i}_left.jpeg", f"/nowhere/{i}_left.jpeg") for i in range(7)]


@pytest.fixture
def recorded(monkeypatch):
    """prepare_photo replaced by one that notes each photo asked for (from any thread) and decodes nothing."""
    calls, lock = [], threading.Lock()

    def prepare_photo(image, path, config, *, gate=True):
        with lock:
            calls.append(image)
        return {"error": f"{image}: not decoded"}
    monkeypatch.setattr(screening, "prepare_photo", prepare_photo)
    return calls


def wait_for(calls: list, n: int) -> None:
    done = threading.Event()
    for _ in range(2000):  # a hang guard only: the thread has nothing else to do
        if len(calls) >= n:
            done.set()
            break
        done.wait(0.005)
    assert done.is_set(), f"the read-ahead thread decoded {len(calls)} photos, expected {n}"


def test_read_ahead_decodes_in_front_and_yields_in_order(recorded):
    stream = screening._prepared(ITEMS, None, gate=False, workers=0, chunk=1, ahead=3)
    first = next(stream)
    assert first == (ITEMS[0], {"error": f"{ITEMS[0][0]}: not decoded"})
    wait_for(recorded, 4)  # the one asked for and three in front, before anyone asks
    assert recorded[:4] == [image for image, _ in ITEMS[:4]]
    rest = list(stream)
    assert [item for item, _ in rest] == ITEMS[1:]
    assert recorded == [image for image, _ in ITEMS]  # each photo decoded once


def test_without_read_ahead_a_photo_is_decoded_when_asked_for(recorded):
    stream = screening._prepared(ITEMS, None, gate=False, workers=0, chunk=1, ahead=0)
    next(stream)
    next(stream)
    assert recorded == [ITEMS[0][0], ITEMS[1][0]]
    stream.close()


def test_read_ahead_rows_equal_decoding_on_demand(tmp_path, monkeypatch):
    run = fresh_run(tmp_path / "run")
    photos = {name: render_fundus(grade, eye="left" if "left" in name else "right", size=PHOTO, seed=i)[0]
              for i, (name, grade) in enumerate(GOOD.items())}
    folder = write_photos(tmp_path / "day", photos)
    (folder / "9_left.jpeg").write_bytes(b"not a jpeg")  # an error row among the graded ones
    dark = (render_fundus(1, size=256, seed=9)[0] // 8)
    write_photos(folder, {"9_right.jpeg": dark})  # one the gate flags
    ahead = screening.screen(run, folder, tmp_path / "ahead.csv", batch_size=3, workers=0)
    monkeypatch.setattr(screening, "READ_AHEAD_BATCHES", 0)
    on_demand = screening.screen(run, folder, tmp_path / "on_demand.csv", batch_size=3, workers=0)
    assert ahead.new == on_demand.new == 8 and ahead.complete
    assert ahead.photos["error"].notna().sum() >= 1
    pd.testing.assert_frame_equal(read_report(ahead.report), read_report(on_demand.report))
    pd.testing.assert_frame_equal(ahead.patients, on_demand.patients)
