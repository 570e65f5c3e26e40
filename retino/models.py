"""ResNet-18/50 for DR grading: a registry, our own builders, and offline-aware ImageNet weights.

Laid out like torchvision's ``models/resnet.py`` (helpers, blocks, the network, one private
``_resnet()`` builder, two-line public builders) and kept key-for-key identical to it, so that
torchvision's ImageNet checkpoints load with ``strict=True`` and a Retino checkpoint stays
readable by plain torchvision. Only what Retino uses is kept: no groups, width or dilation options.

Weights are never fetched behind the user's back on a machine without internet: the torch hub
cache is looked in first, a 3-second probe guards the download, and ``WeightsUnavailable`` says
which file to fetch elsewhere and where to put it.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from .config import ARCHS, HEADS
_DOWNLOAD_HOST = "download.pytorch.org"
_PROBE_TIMEOUT_S = 3.0


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be found, fetched or read; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# helpers


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


# ---------------------------------------------------------------------------------------------
# blocks


class BasicBlock(nn.Module):
    """Two 3x3 convolutions plus identity (ResNet-18/34)."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x  # (B, inplanes, H, W)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand, plus identity (ResNet-50 and up).

    The stride sits on the 3x3 conv (ResNet "v1.5", as in torchvision), not on the first 1x1 as in
    He et al. 2015 (https://arxiv.org/abs/1512.03385). torchvision's ImageNet weights were trained
    this way, so moving the stride would keep the keys but change what the weights compute.
    """

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x  # (B, inplanes, H, W)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, planes, H/stride, W/stride)
        out = self.bn3(self.conv3(out))  # (B, 4*planes, H/stride, W/stride)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


# ---------------------------------------------------------------------------------------------
# the network


class ResNet(nn.Module):
    """Stem, four stages, global average pool, one linear head ``fc``.

    ``layer4[-1]`` is the last residual block: the Grad-CAM target in ``retino.inference.explain``.
    """

    def __init__(self, block: type[Union[BasicBlock, Bottleneck]], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        # torchvision's init, in torchvision's module order, so the same seed gives the same
        # network. zero_init_residual stays off, as torchvision's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)  # (B, 512*expansion, H/32, W/32)
        x = torch.flatten(self.avgpool(x), 1)  # (B, 512*expansion)
        return self.fc(x)  # (B, num_classes)


# ---------------------------------------------------------------------------------------------
# weights

def _imagenet_weights(arch: str):
    """The torchvision ``WeightsEnum`` member ``arch`` starts from. ResNet-50 takes torchvision's V2 recipe
    (80.9% top-1 against V1's 76.1%); ResNet-18 has only V1.

    torchvision is imported here, not at the top: it costs seconds (its ops pull in torch._dynamo) and
    building or loading a Retino network never needs it, only finding ImageNet weights and their statistics.
    """
    from torchvision.models import ResNet18_Weights, ResNet50_Weights
    return {"resnet18": ResNet18_Weights.IMAGENET1K_V1, "resnet50": ResNet50_Weights.IMAGENET1K_V2}[arch]


def _checkpoint_path(weights) -> Path:
    """Where torch.hub keeps (or would keep) this checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _reachable(host: str, port: int = 443, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connection opens within ``timeout``; a thread bounds a DNS lookup that hangs."""
    opened: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(opened)


def _fetch_imagenet_weights(arch: str, progress: bool) -> dict[str, Tensor]:
    """The ImageNet state_dict for ``arch``: from the hub cache, else downloaded, else an error."""
    weights = _imagenet_weights(arch)
    path = _checkpoint_path(weights)
    if path.is_file():
        return _read_state_dict(path)
    advice = (
        f"ImageNet weights for {arch} are not available offline. Download {weights.url} on a machine "
        f"with internet and place it at {path} (or pass --weights PATH)."
    )
    if not _reachable(_DOWNLOAD_HOST):
        raise WeightsUnavailable(f"{advice} [no connection to {_DOWNLOAD_HOST}:443 within {_PROBE_TIMEOUT_S:.0f} s]")
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=progress, check_hash=False, weights_only=True
        )
    except Exception as err:  # network, HTTP or a truncated file: all leave the user the same fix
        raise WeightsUnavailable(f"{advice} [download failed: {type(err).__name__}: {err}]") from err


def _read_state_dict(path: Union[str, Path]) -> dict[str, Tensor]:
    """A state_dict from a file holding one, or a checkpoint dict with a "model"/"state_dict" key."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"Weights file {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailable(f"Weights file {path} could not be read: {type(err).__name__}: {err}") from err
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsUnavailable(
            f"Weights file {path} holds no state_dict: expected a dict of tensors, "
            'or a dict with a "model" or "state_dict" entry holding one.'
        )
    # DataParallel/DDP save "module.", torch.compile "_orig_mod."; neither belongs to the keys.
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _load_backbone(model: ResNet, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` strictly, except an ``fc`` of another shape, which keeps its fresh init."""
    own = model.state_dict()
    if any(k.startswith("fc.") and k in own and v.shape != own[k].shape for k, v in state.items()):
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # Checkpoints older than PyTorch 0.4.1 (resnet18-f37072fd.pth among them) lack BatchNorm's
    # num_batches_tracked; BatchNorm fills it in on load, as it does for torchvision.
    missing = sorted(
        k for k in set(own) - set(state) if k not in ("fc.weight", "fc.bias") and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise WeightsUnavailable(
            f"Weights from {source} do not fit this {type(model).__name__}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]} "
            f"({len(missing)}/{len(unexpected)}/{len(wrong)} in all). Is it the other architecture?"
        )
    model.load_state_dict(state, strict="fc.weight" in state)


# ---------------------------------------------------------------------------------------------
# the private builder and the public builders


def _resnet(
    arch: str,
    block: type[Union[BasicBlock, Bottleneck]],
    layers: list[int],
    *,
    pretrained: bool,
    num_classes: int,
    weights_path: Optional[Union[str, Path]],
    progress: bool,
) -> ResNet:
    model = ResNet(block, layers, num_classes=num_classes)
    if weights_path is not None:
        _load_backbone(model, _read_state_dict(weights_path), str(weights_path))
    elif pretrained:
        _load_backbone(model, _fetch_imagenet_weights(arch, progress), _imagenet_weights(arch).url)
    return model


def resnet18(*, pretrained: bool = False, num_classes: int = 1000, weights_path=None, progress: bool = True) -> ResNet:
    """ResNet-18 (11.2M parameters with a 5-class head); ImageNet weights IMAGENET1K_V1."""
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], pretrained=pretrained, num_classes=num_classes,
                   weights_path=weights_path, progress=progress)


def resnet50(*, pretrained: bool = False, num_classes: int = 1000, weights_path=None, progress: bool = True) -> ResNet:
    """ResNet-50 (23.5M parameters with a 5-class head); ImageNet weights IMAGENET1K_V2."""
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], pretrained=pretrained, num_classes=num_classes,
                   weights_path=weights_path, progress=progress)


_BUILDERS: dict[str, Callable[..., ResNet]] = {"resnet18": resnet18, "resnet50": resnet50}
assert tuple(_BUILDERS) == ARCHS, "retino.config.ARCHS names the builders, in order"  # the form's and CLI's choices


# ---------------------------------------------------------------------------------------------
# the registry: what the UI and the CLI call


def list_models() -> list[str]:
    """Architecture names that ``build_model`` accepts."""
    return list(_BUILDERS)


def _check_arch(arch: str) -> None:
    if arch not in _BUILDERS:
        raise ValueError(f"Unknown architecture '{arch}'. Choose one of: {', '.join(_BUILDERS)}.")


def build_model(
    arch: str,
    *,
    pretrained: bool = False,
    num_classes: int = 5,
    head: str = "classify",
    weights_path: Optional[Union[str, Path]] = None,
    progress: bool = True,
) -> nn.Module:
    """Build a grading network.

    Args:
        arch: one of ``list_models()``.
        pretrained: start from torchvision's ImageNet weights (hub cache, else download).
        num_classes: outputs of a "classify" head; ignored by "regress".
        head: "classify" (``fc`` gives ``num_classes`` logits) or "regress" (``fc`` gives one score).
        weights_path: a local state_dict or checkpoint to start from instead; wins over ``pretrained``.
        progress: show a progress bar while downloading.

    Raises:
        ValueError: unknown ``arch`` or ``head``.
        WeightsUnavailable: weights asked for but not found, not fetchable or not fitting.
    """
    _check_arch(arch)
    if head not in HEADS:
        raise ValueError(f"Unknown head '{head}'. Choose one of: {', '.join(HEADS)}.")
    outputs = num_classes if head == "classify" else 1
    if outputs < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    return _BUILDERS[arch](pretrained=pretrained, num_classes=outputs, weights_path=weights_path, progress=progress)


def check_weights(arch: str, *, pretrained: bool, weights_path: Optional[Union[str, Path]] = None) -> None:
    """Find (or fetch into the hub cache) and read the weights a run would start from.

    Called before a run folder is made or an image cached, so a missing file costs one line, not
    minutes of caching and a folder left behind. Scratch runs need nothing.

    Raises:
        WeightsUnavailable: as :func:`build_model` does, naming the file and where to put it.
    """
    _check_arch(arch)
    if pretrained or weights_path is not None:
        build_model(arch, pretrained=pretrained, weights_path=weights_path, progress=False)


def weights_available(arch: str) -> tuple[bool, str]:
    """Whether ``arch``'s ImageNet checkpoint is already in the hub cache, and the path looked at.

    Never touches the network.
    """
    _check_arch(arch)
    path = _checkpoint_path(_imagenet_weights(arch))
    return path.is_file(), str(path)


def normalization(arch: str, pretrained: bool) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel (mean, std) to normalise RGB in [0, 1] with, read from the weights' own transforms.

    Scratch models get the same ImageNet statistics on purpose: one set of numbers for every run,
    so scratch and pretrained runs see identical inputs and a checkpoint never needs to record which
    set it used. For a network trained from scratch the exact constants matter little, as ``bn1``
    re-centres after the first convolution.
    """
    _check_arch(arch)
    preset = _imagenet_weights(arch).transforms()
    mean, std = (tuple(float(v) for v in preset.mean), tuple(float(v) for v in preset.std))
    return mean, std  # type: ignore[return-value]


def param_count(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
