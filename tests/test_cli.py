"""The command line as a user meets it: one-line errors, Ctrl-C, defaults that agree between verbs."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, wait_for
import retino.__main__ as cli
from retino.runs import RunError


@pytest.mark.parametrize("args, expected", [
    (["train", "--arch", "resnet-18"], "invalid choice: 'resnet-18' (choose from 'resnet18', 'resnet50')"),
    (["stats", "--nope"], "unrecognized arguments: --nope"),
    ([], "the following arguments are required: verb"),
    (["predict", "run"], "the following arguments are required: images"),
])
def test_every_argparse_error_is_one_line(args, expected):
    r = run_cli(*args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and expected in r.stderr
    assert "usage:" not in r.stderr


def test_help_still_shows_the_usage():
    r = run_cli("train", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "--preset" in r.stdout


def test_arch_is_case_insensitive(tmp_path):
    r = run_cli("train", "--arch", "ResNet18", "--epochs", "0", "--run-dir", tmp_path / "r")
    # parsed (no "invalid choice"), then refused by the config's own check: nothing trained
    assert r.returncode == 2 and r.stderr.strip() == "error: epochs must be at least 1, got 0"


def test_stats_defaults_to_the_training_default(tiny_data, tmp_path):
    """`stats` with no folder reads data/synthetic, from the working directory, as `train` does."""
    shutil.copytree(tiny_data, tmp_path / "data" / "synthetic")
    r = subprocess.run([sys.executable, "-m", "retino", "stats"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{tmp_path / 'data' / 'synthetic'}: layout retino")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, -signal.SIGTERM)])
def test_ctrl_c_and_sigterm_stop_a_verb_that_is_not_train(tmp_path, sig, code):
    """Only `train` catches the stop signals (to save and stop after the step); `synth` just ends."""
    out = tmp_path / "synth"
    proc = subprocess.Popen([sys.executable, "-m", "retino", "synth", str(out), "--n", "40", "--size", "1024",
                             "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite launched in the background ignores SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert wait_for(lambda: (out / "images").is_dir() and any((out / "images").iterdir()), timeout=120)
        proc.send_signal(sig)
        started = time.monotonic()
        proc.wait(timeout=30)
        assert proc.returncode == code and time.monotonic() - started < 30
        assert not (out / "synth.json").exists()  # stopped, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_only_named_errors_become_exit_2(monkeypatch, capsys):
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when launched in the background
    def bad_input(args):
        raise RunError("x/status.json: missing")

    def bug(args):
        raise ValueError("an internal mistake")
    monkeypatch.setattr(cli, "cmd_check_run", bad_input)
    assert cli.main(["check-run", "x"]) == 2
    assert capsys.readouterr().err == "error: x/status.json: missing\n"
    monkeypatch.setattr(cli, "cmd_check_run", bug)
    with pytest.raises(ValueError, match="internal mistake"):  # a traceback, not "bad input"
        cli.main(["check-run", "x"])
    assert signal.getsignal(signal.SIGINT) is before  # main() left Ctrl-C alone
