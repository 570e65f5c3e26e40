"""retino.screening.shard: one screen graded by two torchrun ranks (gloo, CPU) merges into exactly the report
a single process writes; a killed sharded screen resumes every shard; a screen over another number of
ranks is refused; a rank that fails is named and the others do not wait for it.

The run is a freshly initialised ResNet-18 (test_screen's ``fresh_run``): the grades are meaningless,
their equality across one and two processes is not.
"""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from torch.distributed import TCPStore

from conftest import REPO
from test_screen import GOOD, PHOTO, fresh_run, write_photos
from retino.data.synthetic import render_fundus
from retino.screening.screen import _screen, screen
from retino.screening.screen_paths import find_photos, partial_paths, partial_reports, report_lock
from retino.screening.screen_report import ScreenError, read_report, report_paths
from retino.screening.shard import Ranks, shard_of

# test_screen's six photos, four more patients in a sub-folder, and a file that is not a photo: 15 rows
MORE = {f"clinic b/{k}_{eye}.jpeg": (k % 5, eye) for k in range(4, 8) for eye in ("left", "right")}
N_ROWS = len(GOOD) + len(MORE) + 1


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    """(run, folder, the single-process report): what every sharded screen here must reproduce."""
    base = tmp_path_factory.mktemp("shard")
    run = fresh_run(base / "runs" / "20260101-000000-classify")
    photos = {name: render_fundus(grade, eye="left" if "left" in name else "right", size=PHOTO, seed=i)[0]
              for i, (name, grade) in enumerate(GOOD.items())}
    photos.update({name: render_fundus(g, eye=eye, size=PHOTO, seed=50 + i)[0]
                   for i, (name, (g, eye)) in enumerate(MORE.items())})
    folder = write_photos(base / "day", photos)
    (folder / "9_left.jpeg").write_bytes(b"not a jpeg")  # an error row, graded by no one
    single = screen(run, folder, base / "single" / "day.csv", workers=0)
    assert single.complete and len(single.photos) == N_ROWS
    return run, folder, single


def torchrun(run, folder, out, nproc=2):
    """``torchrun --nproc_per_node N -m retino screen``: gloo ranks on this CPU (the timeout only catches a hang)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "retino", "screen", str(run), str(folder), "--out", str(out),
                           "--quiet", "--workers", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                       "OMP_NUM_THREADS": "1"})


def assert_same_report(out: Path, single) -> None:
    """Photo and patient reports equal to the single process's: rows, order, grades, probabilities to 1e-6."""
    pd.testing.assert_frame_equal(read_report(out), read_report(single.report), check_exact=False, atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(out.with_name(out.stem + ".patients.csv")),
                                  pd.read_csv(single.patients_report), check_exact=False, atol=1e-6)


def summary(out: Path) -> dict:
    return json.loads(out.with_suffix(".json").read_text())["summary"]


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if ".rank" in p.name)


def test_two_ranks_merge_into_the_single_process_report(day, tmp_path):
    run, folder, single = day
    shares = {shard_of(image, 2) for image, _ in find_photos(folder)[0]}
    assert shares == {0, 1}  # both ranks have photos to grade here
    out = tmp_path / "merged" / "day.csv"
    r = torchrun(run, folder, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_report(out, single)
    s = summary(out)
    assert (s["world_size"], s["new"], s["skipped"], s["photos"], s["complete"]) == (2, N_ROWS, 0, N_ROWS, True)
    assert json.loads(out.with_suffix(".json").read_text())["key"] == \
        json.loads(single.meta.read_text())["key"]  # a single process resumes it, and it resumes a single one
    assert leftovers(out) == []  # the partial reports, removed once merged
    assert r.stdout.count(f"{N_ROWS} photos (") == 1  # rank 0 alone prints the summary
    assert "threads), on each of 2 ranks\n" in r.stdout


def test_a_killed_sharded_screen_resumes_every_shard(day, tmp_path):
    """Rank 0's partial report complete, rank 1's cut mid-row by the kill: the re-run grades only what is missing."""
    run, folder, single = day
    out = tmp_path / "day.csv"
    photos, problems = find_photos(folder)
    for rank in (0, 1):  # each partial written as its rank writes it: the single-process screen on its share
        share = [p for p in photos if shard_of(p[0], 2) == rank]
        _screen(run, folder, partial_paths(out, rank, 2)[0], found=(share, problems if rank == 0 else []),
                workers=0)
    cut = partial_paths(out, 1, 2)[0]
    lines = cut.read_text().splitlines(keepends=True)
    assert len(lines) >= 4  # the header and at least three rows, one kept, one cut short, the rest lost
    cut.write_text(lines[0] + lines[1] + lines[2][:len(lines[2]) // 2])
    rank1_total = len(lines) - 1
    r = torchrun(run, folder, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_report(out, single)
    s = summary(out)
    assert (s["new"], s["skipped"], s["world_size"]) == (rank1_total - 1, N_ROWS - rank1_total + 1, 2)
    assert leftovers(out) == []
    again = torchrun(run, folder, out)  # already merged: skipped as a completed single-process report is
    assert again.returncode == 0, again.stderr[-3000:]
    assert (summary(out)["new"], summary(out)["skipped"]) == (0, N_ROWS)
    assert_same_report(out, single)
    assert leftovers(out) == []
    # killed after the merge, before the partials were removed: their rows are not merged twice
    _screen(run, folder, partial_paths(out, 0, 2)[0], found=(photos, problems), workers=0)
    last = torchrun(run, folder, out)
    assert last.returncode == 0, last.stderr[-3000:]
    assert (summary(out)["new"], summary(out)["skipped"]) == (0, N_ROWS)
    assert_same_report(out, single)
    assert leftovers(out) == []


def test_another_number_of_ranks_is_refused_and_leaves_the_partials(day, tmp_path):
    run, folder, _ = day
    out = tmp_path / "day.csv"
    photos, problems = find_photos(folder)
    three = partial_paths(out, 0, 3)[0]
    _screen(run, folder, three, found=([p for p in photos if shard_of(p[0], 3) == 0], problems), workers=0)
    before = three.read_bytes()
    assert list(partial_reports(out)) == [3]
    with pytest.raises(ScreenError, match=r"day.csv: holds the unmerged partial reports of a screen over 3 processes"):
        screen(run, folder, out, workers=0)  # one process is another number of ranks, too
    r = torchrun(run, folder, out)
    assert r.returncode != 0
    assert "rank 0 of 2: " in r.stderr and "a screen over 3 processes (day.rank0-of-3.csv...)" in r.stderr
    assert three.read_bytes() == before and not out.exists()


def test_a_failing_rank_is_named_and_nothing_is_merged(day, tmp_path):
    run, folder, _ = day
    out = tmp_path / "day.csv"
    foreign = partial_paths(out, 1, 2)[0]
    foreign.parent.mkdir(parents=True, exist_ok=True)
    foreign.write_text("not a report this screen wrote\n")  # rank 1 alone refuses it, after the start
    r = torchrun(run, folder, out)
    assert r.returncode != 0
    assert "rank 1 of 2: " in r.stderr and "day.rank1-of-2.json is not beside it" in r.stderr
    assert read_report(out).empty and foreign.read_text() == "not a report this screen wrote\n"  # nothing merged


def test_a_report_another_screen_is_writing_is_refused_by_every_rank(day, tmp_path):
    run, folder, _ = day
    out = tmp_path / "day.csv"
    with report_lock(report_paths(out)):  # a single-process screen writing it
        r = torchrun(run, folder, out)
    assert r.returncode != 0
    assert "rank 0 of 2: " in r.stderr and "is being written by another screen (pid " in r.stderr
    assert not out.exists() and leftovers(out) == []  # no rank started grading


# ----------------------------------------------------------------------------- waiting on the other ranks

@pytest.fixture
def store():
    """A store for two ranks, as torchrun's: (rank 0's line, rank 1's line)."""
    host = TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    return host, TCPStore("127.0.0.1", host.port, 2, is_master=False)


def test_gather_gives_every_ranks_value_in_rank_order(store):
    host, other = store
    got = {}
    with Ranks(host, rank=0, world=2, stall_s=60) as r0, Ranks(other, rank=1, world=2, stall_s=60) as r1:
        t = threading.Thread(target=lambda: got.update(one=r1.gather("graded", {"new": 1})))
        t.start()
        got["zero"] = r0.gather("graded", {"new": 0})
        t.join(timeout=60)
    assert got == {"zero": [{"new": 0}, {"new": 1}], "one": [{"new": 0}, {"new": 1}]}


def test_gather_names_a_rank_that_failed(store):
    host, other = store
    with Ranks(host, rank=0, world=2, stall_s=60) as r0, Ranks(other, rank=1, world=2, stall_s=60) as r1:
        r1.fail("day.csv: cannot be read")
        with pytest.raises(ScreenError, match=r"^rank 1 of 2 failed: day.csv: cannot be read$"):
            r0.gather("graded", {})


def test_gather_gives_up_on_a_silent_rank_and_names_it(store):
    host, _ = store  # rank 1 never beats: killed before it started, or hung
    with Ranks(host, rank=0, world=2, stall_s=1) as r0:
        with pytest.raises(ScreenError, match=r"^rank 1 of 2 gave no sign of life for 1 s"):
            r0.gather("graded", {})
