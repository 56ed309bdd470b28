import os
import socket
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision import models

from gca_pyg import backbones
from gca_pyg.backbones import GlobalAvgMaxPool2d, build_backbone
from gca_pyg.errors import ConfigError, WeightsUnavailableError

SIZES = {"resnet50": (2048, 64), "googlenet": (1024, 64), "small_cnn": (128, 32)}


@pytest.fixture(scope="module", params=sorted(SIZES))
def name(request):
    return request.param


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub directory for the duration of one test."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
    torch.hub.set_dir(str(tmp_path))
    return tmp_path


def test_global_avg_max_pool_sums_mean_and_max_per_channel():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[-4.0, -2.0], [0.0, -2.0]]]])
    assert torch.equal(GlobalAvgMaxPool2d()(x), torch.tensor([[3.0 + 6.0, -2.0 + 0.0]]))


def test_output_pools_the_last_feature_map(name):
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained="none").eval()
    out_features, side = SIZES[name]
    last_block = {"resnet50": "layer4", "googlenet": "inception5b", "small_cnn": "10"}[name]
    feature_maps = []
    last = backbone.trunk.get_submodule(last_block)
    last.register_forward_hook(lambda module, inputs, output: feature_maps.append(output))

    with torch.no_grad():
        features = backbone(torch.randn(2, 3, side, side))

    assert backbone.out_features == out_features
    assert features.shape == (2, out_features)
    (feature_map,) = feature_maps
    assert feature_map.shape[1] == out_features
    pooled = feature_map.mean(dim=(2, 3))
    if name != "googlenet":  # GoogLeNet averages only, as in the authors' code
        pooled = pooled + feature_map.amax(dim=(2, 3))
    torch.testing.assert_close(features, pooled)


@pytest.mark.parametrize("frozen_bn", [True, False])
def test_frozen_batch_norm_keeps_its_statistics_and_trains_its_affine_parameters(name, frozen_bn):
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained="none", frozen_bn=frozen_bn)  # in training mode
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(norm.training is not frozen_bn for norm in norms)
    backbone.eval().train()
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    running_means = [norm.running_mean.clone() for norm in norms]
    side = SIZES[name][1]

    backbone(torch.randn(2, 3, side, side)).sum().backward()

    assert norms and all(norm.training is not frozen_bn for norm in norms)
    # Frozen or not, gamma and beta require grad and receive it.
    assert all(norm.weight.requires_grad and norm.bias.requires_grad for norm in norms)
    assert all(
        norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0 for norm in norms
    )
    unchanged = [torch.equal(old, norm.running_mean) for old, norm in zip(running_means, norms)]
    assert all(unchanged) is frozen_bn
    assert all(conv.weight.grad is not None for conv in convs)
    assert backbone.training and all(conv.training for conv in convs)
    backbone.eval()
    assert not any(m.training for m in backbone.modules())


def test_frozen_batch_norm_normalises_with_its_running_statistics():
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", pretrained="none", frozen_bn=True).train()
    norm = backbone.trunk[1]
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    images = torch.randn(4, 3, 32, 32)
    conv_out = backbone.trunk[0](images)
    expected = (conv_out - norm.running_mean[:, None, None]) / (
        norm.running_var[:, None, None] + norm.eps
    ).sqrt() * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(norm(conv_out), expected)


def test_small_cnn_trains_on_a_demo_batch():
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", pretrained="none")
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1)
    images = torch.randn(81, 3, 32, 32)
    target = torch.randn(81, 128)
    losses = []
    for _ in range(5):
        loss = (backbone(images) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"name": "resnet18"},
            r"unknown backbone 'resnet18' \(model.backbone\); choose one of resnet50, googlenet, "
            "small_cnn, dino_vits16, dinov2_vits14, or timm:<model name>",
        ),
        ({"name": "resnet50", "pretrained": "imagenet21k"}, "choose one of imagenet, none or a"),
        ({"name": "resnet50", "pretrained": True}, "choose one of imagenet, none"),
        ({"name": "small_cnn", "pretrained": "imagenet"}, "small_cnn has no ImageNet weights"),
    ],
)
def test_bad_names_are_config_errors_that_list_the_choices(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_backbone(**kwargs)


@pytest.mark.parametrize(
    "name, weights",
    [
        ("resnet50", models.ResNet50_Weights.IMAGENET1K_V1),
        ("googlenet", models.GoogLeNet_Weights.IMAGENET1K_V1),
    ],
)
def test_uncached_weights_that_cannot_be_downloaded_are_one_clear_error(
    empty_hub, monkeypatch, name, weights
):
    def unreachable(url, dst, hash_prefix=None, progress=True):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(WeightsUnavailableError) as raised:
        build_backbone(name, pretrained="imagenet")

    message = str(raised.value)
    file_name = weights.url.rsplit("/", 1)[1]
    assert "\n" not in message
    assert f"{file_name} is not in {empty_hub / 'checkpoints'}" in message
    assert "Name or service not known" in message
    assert "pretrained: none" in message and "--set model.pretrained=none" in message


def test_weights_are_downloaded_once_into_the_hub_cache_then_read_from_it(empty_hub, monkeypatch):
    torch.manual_seed(0)
    # Stand-in for the ImageNet file: a GoogLeNet state dict as torchvision publishes it, with
    # the auxiliary heads.
    published = models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict()
    downloads = []

    def download(url, dst, hash_prefix=None, progress=True):
        downloads.append((url, dst, hash_prefix, socket.getdefaulttimeout()))
        torch.save(published, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    first = build_backbone("googlenet", pretrained="imagenet")
    second = build_backbone("googlenet", pretrained="imagenet")

    weights = models.GoogLeNet_Weights.IMAGENET1K_V1
    expected_path = os.path.join(empty_hub, "checkpoints", "googlenet-1378be20.pth")
    assert downloads == [(weights.url, expected_path, "1378be20", backbones.DOWNLOAD_TIMEOUT)]
    assert socket.getdefaulttimeout() is None
    for backbone in (first, second):
        assert torch.equal(backbone.trunk.conv1.conv.weight, published["conv1.conv.weight"])
        assert backbone.trunk.aux1 is None and backbone.out_features == 1024


def test_a_file_of_backbone_weights_is_loaded_as_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    trained = build_backbone("small_cnn", "none")
    for parameter in trained.parameters():
        parameter.data.normal_()
    path = tmp_path / "backbone.pt"
    torch.save(trained.state_dict(), path)
    loaded = build_backbone("small_cnn", str(path))
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    skipped = build_backbone("small_cnn", str(path), load_weights=False)  # a checkpoint follows
    assert not torch.equal(skipped.state_dict()["trunk.0.weight"], trained.trunk[0].weight)


def test_a_bad_file_of_backbone_weights_is_one_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone("small_cnn", str(tmp_path / "missing.pt"))
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="could not be read"):
        build_backbone("small_cnn", str(tmp_path / "broken.pt"))
    torch.save({"trunk.0.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="is not a small_cnn backbone of this config"):
        build_backbone("small_cnn", str(tmp_path / "other.pt"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ConfigError, match="not a state_dict"):
        build_backbone("small_cnn", str(tmp_path / "tensor.pt"))
