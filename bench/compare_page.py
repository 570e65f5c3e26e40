"""How long the Compare page takes with 50 runs on disk, against the same page with one run.

Writes run folders with hand-made metrics (10 epochs each, no checkpoints: Compare never reads
them) into a temporary folder, then renders ``pages/compare.py`` through ``app.py`` under
Streamlit's AppTest: the first render (every metrics file read) and a rerun (read from the cache,
as when a user clicks a row). The one-run page, measured in the same process, is the baseline.

    python bench/compare_page.py [--runs 50] [--json]

(Before this script, ``tests/test_app.py`` held it as a timed test asserting a rerun under 5 s.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from retino import fileio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_runs(root: Path, n: int, epochs: int = 10) -> None:
    from retino import runs
    from retino.config import TrainConfig
    confusion = [[30, 3, 1, 0, 0], [4, 2, 1, 0, 0], [2, 1, 5, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    for i in range(n):
        run = root / f"2026010{i // 10}-0000{i % 10:02d}-run{i:02d}"
        run.mkdir(parents=True)
        fileio.write_json(run / "config.json", {"train": TrainConfig(seed=i).to_dict(), "created": 1.7e9 + i})
        runs.write_status(run, state="completed", epochs=epochs)
        for e in range(1, epochs + 1):
            runs.append_metrics(run, {"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 50, "test_loss": 1.1 / e,
                                      "test_acc": 0.6 + e / 60, "test_qwk": e / 20 + i / 1000, "test_macro_f1": e / 30,
                                      "test_balanced_acc": 0.4, "test_ref_auc": 0.7, "test_ref_sens_at_90spec": 0.3,
                                      "test_confusion": confusion})


def render(n: int) -> tuple[float, float]:
    """(first render, rerun) seconds of the Compare page with ``n`` runs."""
    from streamlit.testing.v1 import AppTest
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RETINO_RUNS"] = str(Path(tmp) / "checkpoints")
        os.environ["RETINO_SETTINGS"] = str(Path(tmp) / "settings.json")
        make_runs(Path(tmp) / "checkpoints", n)
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=120)
        at.run()
        at.switch_page("pages/compare.py")
        t0 = time.perf_counter()
        at.run()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        at.run()
        again = time.perf_counter() - t0
        if at.exception or len(at.dataframe[0].value) != n:
            raise SystemExit(f"the page did not render {n} runs: {at.exception}")
    return first, again


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    render(1)  # warm-up: imports, Streamlit's first script compile
    base, many = render(1), render(args.runs)
    out = {"runs": args.runs, "one_run_first_s": round(base[0], 3), "one_run_rerun_s": round(base[1], 3),
           "many_first_s": round(many[0], 3), "many_rerun_s": round(many[1], 3),
           "rerun_x_one_run": round(many[1] / base[1], 2), "cpu": platform.processor() or platform.machine()}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"Compare page, {args.runs} runs vs 1 run (AppTest, {out['cpu']}):")
    print(f"  first render  {many[0]:6.2f} s   (1 run: {base[0]:.2f} s)")
    print(f"  rerun         {many[1]:6.2f} s   (1 run: {base[1]:.2f} s)   {out['rerun_x_one_run']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
