"""retino.models: our ResNets match torchvision key for key, and weights load offline or fail clearly."""

import os
import socket

import pytest
import torch
import torchvision

from retino import config, models
from retino.models import (WeightsUnavailable, build_model, check_weights, list_models, normalization, param_count,
                           weights_available)

ARCHS = list_models()
HEADS = list(config.HEADS)
_WEIGHTS = {"resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
            "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2}


def _torchvision(arch: str, num_classes: int) -> torch.nn.Module:
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def _file_name(arch: str) -> str:
    return os.path.basename(_WEIGHTS[arch].url)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache for the test, the real one restored afterwards."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    old = torch.hub.get_dir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(hub))
    yield hub
    torch.hub.set_dir(old)


@pytest.fixture
def offline(monkeypatch):
    """No network: the probe's socket and torch's downloader both fail."""
    def refuse(*args, **kwargs):
        raise OSError("network blocked by test")
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def _save_imagenet_like(arch: str, hub, seed: int = 1234) -> dict:
    """Write a torchvision 1000-class state_dict under the file name of the real ImageNet weights."""
    torch.manual_seed(seed)
    state = _torchvision(arch, 1000).state_dict()
    torch.save(state, hub / "checkpoints" / _file_name(arch))
    return state


def test_registry_lists_the_two_resnets():
    assert {"resnet18", "resnet50"} <= set(ARCHS)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_shape(arch, head):
    model = build_model(arch, head=head, num_classes=5)
    x = torch.randn(2, 3, 64, 64)  # (B, 3, H, W)
    out = model(x)
    assert out.shape == (2, 5 if head == "classify" else 1)
    out.sum().backward()
    assert model.conv1.weight.grad is not None
    assert model.fc.weight.grad is not None


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_keys_shapes_and_params_as_torchvision(arch, head):
    outputs = 5 if head == "classify" else 1
    ours = build_model(arch, head=head, num_classes=5)
    theirs = _torchvision(arch, outputs)
    assert param_count(ours) == param_count(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_init_as_torchvision(arch):
    """Same modules created in the same order with the same init: identical tensors from one seed."""
    torch.manual_seed(0)
    ours = build_model(arch, num_classes=5).state_dict()
    torch.manual_seed(0)
    theirs = _torchvision(arch, 5).state_dict()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("arch", ARCHS)
def test_computes_what_torchvision_computes(arch):
    """Torchvision's weights in our network give torchvision's outputs (stride placement included)."""
    theirs = _torchvision(arch, 5).eval()
    ours = build_model(arch, num_classes=5).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_layer4_last_block_is_the_gradcam_target():
    model = build_model("resnet18")
    assert isinstance(model.layer4[-1], models.BasicBlock)
    assert isinstance(build_model("resnet50").layer4[-1], models.Bottleneck)


@pytest.mark.parametrize("head", HEADS)
def test_pretrained_loads_from_hub_cache(hub_dir, offline, head):
    saved = _save_imagenet_like("resnet18", hub_dir)
    assert weights_available("resnet18") == (True, str(hub_dir / "checkpoints" / "resnet18-f37072fd.pth"))
    model = build_model("resnet18", pretrained=True, head=head, num_classes=5)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert model.fc.out_features == (5 if head == "classify" else 1)


def test_pretrained_keeps_fc_when_shapes_agree(hub_dir, offline):
    saved = _save_imagenet_like("resnet18", hub_dir)
    model = build_model("resnet18", pretrained=True, num_classes=1000)
    assert torch.equal(model.fc.weight, saved["fc.weight"])


def test_pretrained_loads_checkpoints_without_num_batches_tracked(hub_dir, offline):
    """The real resnet18-f37072fd.pth predates BatchNorm's num_batches_tracked buffer."""
    saved = _save_imagenet_like("resnet18", hub_dir)
    old_style = {k: v for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    torch.save(old_style, hub_dir / "checkpoints" / _file_name("resnet18"))
    model = build_model("resnet18", pretrained=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])


@pytest.mark.parametrize("arch", ARCHS)
def test_offline_without_cache_raises_with_file_and_folder(hub_dir, offline, arch):
    assert weights_available(arch)[0] is False
    with pytest.raises(WeightsUnavailable) as info:
        build_model(arch, pretrained=True)
    message = str(info.value)
    assert _file_name(arch) in message
    assert str(hub_dir / "checkpoints") in message
    assert _WEIGHTS[arch].url in message
    assert isinstance(info.value, RuntimeError)


def test_failed_download_raises_weights_unavailable(hub_dir, monkeypatch):
    """The probe gets through but the download breaks off: same advice, cause attached."""
    monkeypatch.setattr(models, "_reachable", lambda *a, **k: True)

    def broken(*args, **kwargs):
        raise ConnectionResetError("connection reset")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", broken)
    with pytest.raises(WeightsUnavailable, match="resnet18-f37072fd.pth.*ConnectionResetError"):
        build_model("resnet18", pretrained=True)


def test_download_used_when_reachable(hub_dir, monkeypatch):
    torch.manual_seed(7)
    state = _torchvision("resnet18", 1000).state_dict()
    calls = []

    def fake_download(url, **kwargs):
        calls.append((url, kwargs))
        return state
    monkeypatch.setattr(models, "_reachable", lambda *a, **k: True)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_model("resnet18", pretrained=True)
    assert calls[0][0] == _WEIGHTS["resnet18"].url
    assert calls[0][1]["check_hash"] is False
    assert torch.equal(model.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix"])
def test_weights_path_loads(tmp_path, offline, wrap):
    torch.manual_seed(3)
    state = _torchvision("resnet18", 5).state_dict()
    payload = {
        "plain": state,
        "model": {"model": state, "epoch": 3},
        "state_dict": {"state_dict": state},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    model = build_model("resnet18", weights_path=path, num_classes=5)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.fc.weight, state["fc.weight"])  # same shape: the head is kept too


def test_weights_path_missing_names_the_path(tmp_path):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsUnavailable, match="nowhere.pth"):
        build_model("resnet18", weights_path=path)


def test_weights_path_unreadable_names_the_path(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="garbage.pth"):
        build_model("resnet18", weights_path=path)


def test_weights_path_of_other_arch_is_refused(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(_torchvision("resnet50", 5).state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="r50.pth.*other architecture"):
        build_model("resnet18", weights_path=path)


def test_unknown_arch_and_head_list_the_choices():
    with pytest.raises(ValueError, match=r"Unknown architecture 'x'\. Choose one of: resnet18, resnet50\."):
        build_model("x")
    with pytest.raises(ValueError, match=r"Unknown head 'x'\. Choose one of: classify, regress\."):
        build_model("resnet18", head="x")
    with pytest.raises(ValueError, match="Choose one of"):
        weights_available("x")


@pytest.mark.parametrize("pretrained", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_normalization_is_imagenet(arch, pretrained):
    mean, std = normalization(arch, pretrained)
    assert mean == pytest.approx((0.485, 0.456, 0.406))
    assert std == pytest.approx((0.229, 0.224, 0.225))
    assert all(type(v) is float for v in mean + std)


def test_param_count_trainable_only():
    model = build_model("resnet18")
    total = param_count(model)
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    assert param_count(model, trainable_only=True) == 512 * 5 + 5 < total


def test_check_weights_names_the_missing_file_before_any_model_is_trained(hub_dir, offline):
    check_weights("resnet50", pretrained=False)  # scratch runs need no file, and no network
    with pytest.raises(WeightsUnavailable) as info:
        check_weights("resnet18", pretrained=True)
    assert _file_name("resnet18") in str(info.value) and str(hub_dir / "checkpoints") in str(info.value)
    _save_imagenet_like("resnet18", hub_dir)
    check_weights("resnet18", pretrained=True)  # found in the hub cache, offline


def test_check_weights_refuses_a_weights_file_of_the_other_arch(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(_torchvision("resnet50", 1000).state_dict(), path)
    with pytest.raises(WeightsUnavailable, match="r50.pth"):
        check_weights("resnet18", pretrained=True, weights_path=path)
