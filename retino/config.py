"""TrainConfig: the one description of a training run, shared by the CLI, the form and the run folder."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields

# The choices of every field, defined here only (models.py and metrics.py import them; config.py
# imports nothing heavy, so the CLI parses flags before torch loads).
ARCHS = ("resnet18", "resnet50")  # the builders in retino.models, which checks it on import
HEADS = ("classify", "regress")
LOSSES = ("ce", "mse", "smoothl1")
CLASS_WEIGHTS = ("none", "lab", "inverse")
SAMPLERS = ("plain", "balanced")
AUGMENTS = ("lab", "lab+color", "none")
INTERPOLATIONS = ("bilinear", "nearest")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config value out of range; the message names the field and what was expected."""


def _f(default, help: str, choices=None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings; frozen: derive a changed copy with ``dataclasses.replace``."""

    # data
    data: str = _f("data/synthetic", "data-set folder (any layout Retino recognises)")
    image_size: int = _f(128, "working size in pixels: images are cropped to the fundus, squared and resized")
    ben_graham: bool = _f(True, "Ben Graham's local-colour normalisation (Kaggle 2015 winner): lesions stand "
                                "out, lighting and pigment do not; --ben-graham false for plain photos")
    cache: bool = _f(True, "decode each image once into a memory-mapped cache reused by later epochs and runs")
    val_fraction: float = _f(0.1, "share of the training patients held out as the validation split that every "
                                  "choice is made on (unless the data set has its own val split)")
    # model
    arch: str = _f("resnet18", "architecture", ARCHS)
    pretrained: bool = _f(False, "start from torchvision's ImageNet weights")
    weights: str = _f("", "local weights file instead of the torch hub cache (implies --pretrained)")
    head: str = _f("classify", "classify: 5-way softmax; regress: one score + QWK-optimised thresholds", HEADS)
    # objective and sampling
    loss: str = _f("ce", "ce for classify; mse or smoothl1 for regress", LOSSES)
    class_weights: str = _f("none", "cross-entropy weights: lab = 1 - n_k/N (the lab report), inverse = N/(K n_k)",
                            CLASS_WEIGHTS)
    sampler: str = _f("plain", "plain shuffling or class-balanced resampling", SAMPLERS)
    augment: str = _f("lab", "lab = vertical flip p=0.5 + rotation +-30 deg; lab+color adds brightness/contrast",
                      AUGMENTS)
    interpolation: str = _f("bilinear", "rotation resampling: bilinear, or nearest as the lab report's "
                            "RandomRotation did", INTERPOLATIONS)
    # optimisation
    epochs: int = _f(6, "number of epochs")
    batch_size: int = _f(32, "images per step (per process under torchrun)")
    optimizer: str = _f("adamw", "optimizer", OPTIMIZERS)
    lr: float = _f(1e-3, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "weight decay")
    schedule: str = _f("cosine", "learning-rate schedule (per step)", SCHEDULES)
    step_size: int = _f(10, "epochs between x0.1 decays for --schedule step")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs")
    seed: int = _f(0, "seed for initialisation, sampling and augmentation")
    # evaluation
    target_sensitivity: float = _f(0.9, "referable-DR sensitivity the operating point is chosen for, on val")
    # hardware
    device: str = _f("auto", "auto = cuda when available, else cpu", DEVICES)
    workers: str = _f("auto", "worker processes: 'auto' = every core for building the cache, and for the loader "
                              "what the feed needs (none when reading the cache), or a number")
    amp: bool = _f(True, "mixed precision on CUDA (bf16 where supported); ignored on CPU")
    channels_last: bool = _f(True, "channels_last memory format on CUDA; ignored on CPU")
    compile: bool = _f(False, "torch.compile the model (CUDA only; pays off on long runs)")
    eval_batch_size: int = _f(0, "evaluation batch size (0 = 2 x batch size)")
    log_every: int = _f(0, "read the loss off the device every N steps (0 = about twice a second)")
    # bookkeeping
    name: str = _f("", "run name shown in the dashboard (default: derived from the config)")
    keep_last: bool = _f(False, "keep last.pt (weights + optimizer, for --resume --epochs N later) after "
                                "the run completes")

    def __post_init__(self):
        # one spelling of workers, whether it came from the CLI ("2"), the form (2) or an older run (2)
        text = str(self.workers).strip().lower()
        object.__setattr__(self, "workers", text if text == "auto" or not text.isdigit() else str(int(text)))

    def validate(self) -> "TrainConfig":
        """Check every field; raise ConfigError naming the first bad one."""
        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"Invalid {f.name} {value!r}. Choose one of: {', '.join(choices)}.")
        positive = {"image_size": 32, "epochs": 1, "batch_size": 1, "step_size": 1}
        for key, low in positive.items():
            if getattr(self, key) < low:
                raise ConfigError(f"{key} must be at least {low}, got {getattr(self, key)}")
        if self.image_size > 1024:
            raise ConfigError(f"image_size must be at most 1024, got {self.image_size}")
        if not 0 < self.lr <= 10:
            raise ConfigError(f"lr must be in (0, 10], got {self.lr}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1 or self.warmup_epochs < 0:
            raise ConfigError("weight_decay and warmup_epochs must be >= 0 and momentum in [0, 1)")
        if self.eval_batch_size < 0 or self.log_every < 0:
            raise ConfigError("eval_batch_size and log_every must be >= 0")
        if str(self.workers).strip().lower() != "auto" and not str(self.workers).strip().isdigit():
            raise ConfigError(f"workers must be 'auto' or a whole number >= 0, got {self.workers!r}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if not 0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if not 0 < self.target_sensitivity < 1:
            raise ConfigError(f"target_sensitivity must be in (0, 1), got {self.target_sensitivity}")
        if self.head == "classify" and self.loss != "ce":
            raise ConfigError(f"loss {self.loss!r} needs --head regress; the classify head trains with ce")
        if self.head == "regress" and self.loss == "ce":
            raise ConfigError("the regress head trains with mse or smoothl1, not ce")
        if "\x00" in self.name or "\x00" in self.data or "\x00" in self.weights:
            raise ConfigError("names and paths cannot contain NUL bytes")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a saved dict; unknown keys (from a newer Retino) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def display_name(self) -> str:
        return self.name or (f"{self.arch}-{'pre' if self.pretrained or self.weights else 'scratch'}"
                             f"-{self.head}-{self.image_size}px")


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field, with its default in the help."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=None,
                                metavar="BOOL", help=help_text)
        else:
            choices = f.metadata.get("choices")
            # choices are lower-case names: --arch ResNet18 is resnet18; --arch resnet-18 lists them
            kind = str.lower if choices else {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, choices=choices, help=help_text)


def config_from_args(args: argparse.Namespace, base: TrainConfig | None = None) -> TrainConfig:
    """The parsed flags over ``base`` (defaults), validated."""
    cfg = base or TrainConfig()
    changes = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.weights:
        cfg = dataclasses.replace(cfg, pretrained=True)
    return cfg.validate()


# ----------------------------------------------------------------------------- presets

# The lab report's settings (ANCHORS.md, "The origin"): 512 px plain photos, its augmentation with
# nearest-neighbour rotation, SGD at a constant 1e-3, class weights 1 - n_k/N, 10 epochs of batch 8.
LAB_REPORT = {"image_size": 512, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4,
              "head": "classify", "loss": "ce", "class_weights": "lab", "epochs": 10, "batch_size": 8,
              "schedule": "constant", "ben_graham": False, "augment": "lab", "interpolation": "nearest",
              "sampler": "plain"}


@dataclass(frozen=True)
class Preset:
    """Settings shared by a preset's runs, and what each of its runs sets on top of them."""

    label: str                      # as the Train page lists it
    shared: dict                    # TrainConfig fields over the defaults
    runs: tuple = ({},)             # one dict of fields per run it queues
    suffixes: tuple = ("",)         # each run's name suffix, after the user's run name


PRESETS = {
    "quick-demo": Preset("Quick demo (CPU)", {}),
    "lab-report": Preset(
        "Lab report: ResNet18/50 x scratch/pretrained", LAB_REPORT,
        runs=tuple({"arch": a, "pretrained": p} for a in ("resnet18", "resnet50") for p in (False, True)),
        suffixes=tuple(f"{a}-{'pretrained' if p else 'scratch'}" for a in ("resnet18", "resnet50")
                       for p in (False, True))),
}


def preset_base(name: str) -> TrainConfig:
    """The defaults with a preset's shared settings: what the form shows and CLI flags apply over."""
    return dataclasses.replace(TrainConfig(), **_preset(name).shared)


def expand_preset(name: str, base_cfg: TrainConfig) -> list[TrainConfig]:
    """The runs a preset queues: ``base_cfg`` with each run's own fields, validated.

    ``base_cfg`` is usually ``preset_base(name)`` with the user's changes (the form, or the CLI's
    flags through ``config_from_args``); the runs' own fields (arch, pretrained) override it. With a
    run name set, a preset of several runs names them ``<name>-resnet18-scratch`` and so on; without
    one each run keeps the name its config derives (``display_name``).
    """
    preset = _preset(name)
    out = []
    for fields_, suffix in zip(preset.runs, preset.suffixes):
        cfg = dataclasses.replace(base_cfg, **fields_)
        if fields_.get("pretrained") is False and cfg.weights:  # a scratch run starts from no weights file
            cfg = dataclasses.replace(cfg, weights="")
        if base_cfg.name and suffix:
            cfg = dataclasses.replace(cfg, name=f"{base_cfg.name}-{suffix}")
        out.append(cfg.validate())
    return out


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"Invalid preset {name!r}. Choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]
