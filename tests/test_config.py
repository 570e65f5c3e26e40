"""TrainConfig: frozen, round-trips through config.json and through the CLI flags; presets as data."""
import dataclasses
import json

import pytest

from retino.dashboard import jobs
from retino.__main__ import build_parser
from retino.config import ARCHS, PRESETS, ConfigError, TrainConfig, config_from_args, expand_preset, preset_base

# every field away from its default, each to a value the validator accepts
ODD = TrainConfig(
    data="some data/set", image_size=96, ben_graham=False, cache=False, arch="resnet50", pretrained=True,
    weights="/tmp/w e.pth", head="regress", loss="smoothl1", class_weights="inverse", sampler="balanced",
    augment="lab+color", interpolation="nearest", epochs=3, batch_size=7, optimizer="sgd", lr=0.0025,
    momentum=0.8, weight_decay=3e-4, schedule="step", step_size=2, warmup_epochs=0.5, seed=7, device="cpu",
    workers="1", amp=False, channels_last=False, compile=True, eval_batch_size=5, name="my run", val_fraction=0.2,
    target_sensitivity=0.8, log_every=5, keep_last=True)


def test_the_odd_config_touches_every_field():
    default = TrainConfig()
    same = [f.name for f in dataclasses.fields(TrainConfig) if getattr(ODD, f.name) == getattr(default, f.name)]
    assert same == [] and ODD.validate() is ODD


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert dataclasses.replace(cfg, epochs=3).epochs == 3 and cfg.epochs == TrainConfig().epochs


def test_config_round_trips_through_json():
    saved = json.loads(json.dumps({"train": ODD.to_dict()}))  # as config.json holds it
    assert TrainConfig.from_dict(saved["train"]) == ODD
    assert TrainConfig.from_dict({**saved["train"], "from_a_newer_retino": 1}) == ODD


def test_config_round_trips_through_the_cli_flags():
    """What the dashboard launches (jobs.config_to_args) is what the trainer parses back."""
    train = build_parser()
    args = train.parse_args(["train", *jobs.config_to_args(ODD)])
    assert config_from_args(args) == ODD
    assert config_from_args(train.parse_args(["train"])) == TrainConfig()


def test_choices_ignore_case_and_list_themselves():
    args = build_parser().parse_args(["train", "--arch", "ResNet50", "--head", "REGRESS", "--loss", "MSE"])
    assert (args.arch, args.head, args.loss) == ("resnet50", "regress", "mse")
    with pytest.raises(SystemExit) as bad:
        build_parser().parse_args(["train", "--arch", "resnet-18"])
    assert bad.value.code == 2


def test_weights_imply_pretrained():
    args = build_parser().parse_args(["train", "--weights", "/x.pth"])
    assert config_from_args(args).pretrained is True


def test_lab_report_preset_names_its_four_runs():
    base = preset_base("lab-report")
    assert (base.image_size, base.optimizer, base.class_weights, base.ben_graham) == (512, "sgd", "lab", False)
    named = expand_preset("lab-report", dataclasses.replace(base, name="lab", epochs=2))
    assert [c.name for c in named] == ["lab-resnet18-scratch", "lab-resnet18-pretrained",
                                       "lab-resnet50-scratch", "lab-resnet50-pretrained"]
    assert [(c.arch, c.pretrained) for c in named] == [(a, p) for a in ARCHS for p in (False, True)]
    assert {c.epochs for c in named} == {2}  # the user's change over the preset's 10 holds for every run
    unnamed = expand_preset("lab-report", base)
    assert len({c.display_name() for c in unnamed}) == 4 and {c.name for c in unnamed} == {""}


def test_preset_scratch_runs_drop_a_weights_file():
    runs = expand_preset("lab-report", dataclasses.replace(preset_base("lab-report"), weights="/w.pth",
                                                           pretrained=True))
    assert [(c.pretrained, bool(c.weights)) for c in runs] == [(False, False), (True, True)] * 2


def test_quick_demo_is_the_defaults_and_unknown_presets_list_the_choices():
    assert expand_preset("quick-demo", preset_base("quick-demo")) == [TrainConfig()]
    with pytest.raises(ConfigError, match="Choose one of: quick-demo, lab-report"):
        expand_preset("nope", TrainConfig())
    assert build_parser().parse_args(["train", "--preset", "Lab-Report"]).preset == "lab-report"
    assert set(PRESETS) == {"quick-demo", "lab-report"}
