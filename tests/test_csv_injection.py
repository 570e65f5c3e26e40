"""Screen reports open safely in a spreadsheet: cells that would run as a formula start with "'" (OWASP's
rule for CSV injection), numbers stay numbers, and a report read back gives the names as they are."""
import csv

import numpy as np
import pandas as pd

from retino.screening.screen import screen
from retino.screening.screen_report import read_report, table_csv
from retino.screening.screen_report import escape_cell, unescape_cell
from test_screen import fresh_run, photos as photos  # noqa: F401  (the fixture)
from test_screen import write_photos

HOSTILE = ["=cmd|' -C calc'!A0_left.jpg", "+SUM(1+1)_right.jpg", "-2+3_right.jpg", "@evil_left.jpg"]


def test_formula_cells_are_escaped_in_both_reports_and_read_back_as_named(photos, tmp_path):
    run = fresh_run(tmp_path / "runs" / "r")
    pictures = list(photos.values())
    folder = write_photos(tmp_path / "day", {name: pictures[i] for i, name in enumerate(HOSTILE)})
    out = tmp_path / "report.csv"
    result = screen(run, folder, out, workers=0, quality_gate=False)
    with open(out, newline="") as f:
        cells = [row for row in csv.reader(f)][1:]
    assert sorted(row[0] for row in cells) == sorted("'" + n for n in HOSTILE)
    assert {row[1] for row in cells} == {"'=cmd|' -C calc'!A0", "'+SUM(1+1)", "'-2+3", "'@evil"}
    with open(result.patients_report, newline="") as f:
        patients = [row[0] for row in csv.reader(f)][1:]
    assert sorted(patients) == sorted(["'=cmd|' -C calc'!A0", "'+SUM(1+1)", "'-2+3", "'@evil"])
    assert all(not c.startswith(("=", "+", "-", "@")) for row in cells for c in row)
    table = read_report(out)
    assert sorted(table["image"]) == sorted(HOSTILE)
    assert table["p0"].notna().all() and np.issubdtype(table["p0"].dtype, np.floating)
    again = screen(run, folder, out, workers=0, quality_gate=False)  # resuming matches the escaped names
    assert again.new == 0 and again.skipped == len(HOSTILE) and len(read_report(out)) == len(HOSTILE)
    downloaded = table_csv(result.photos).decode()  # what the page's download button gives
    assert "\n'=cmd|' -C calc'!A0_left.jpg," in downloaded and "\n=cmd" not in downloaded


def test_numbers_are_never_escaped():
    table = pd.DataFrame({"image": ["-1_left.jpg", "a.jpg"], "score": [-0.25, 1.5], "grade": pd.array([0, None],
                                                                                                     dtype="Int64")})
    lines = table_csv(table).decode().splitlines()
    assert lines[1:] == ["'-1_left.jpg,-0.25,0", "a.jpg,1.5,"]


def test_escaping_round_trips_every_leading_character():
    for text in ["=1", "+1", "-1", "@a", "\tx", "\rx", "'quoted", "''", "plain", "", "a=b"]:
        assert unescape_cell(escape_cell(text)) == text
    assert escape_cell("plain") == "plain" and escape_cell("a=b") == "a=b" and escape_cell("=1") == "'=1"
