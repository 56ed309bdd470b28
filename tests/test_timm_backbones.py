"""Vision transformers and other timm models as backbones (the ``vit`` extra), the pooling option
of the CNNs, and how pretrained weights are found, downloaded or reported missing."""

import builtins
import os

import pytest
import torch

from gca_pyg.backbones import build_backbone
from gca_pyg.errors import ConfigError, MissingExtraError, WeightsUnavailableError

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402  (a dependency of timm)

DINO_FILE = "dino_deitsmall16_pretrain.pth"  # what the DINO hub model downloads
DINO_URL = "https://huggingface.co/timm/vit_small_patch16_224.dino/resolve/main/model.safetensors"


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
    torch.hub.set_dir(str(tmp_path))
    return tmp_path / "checkpoints"


@pytest.fixture
def downloads(monkeypatch):
    """Every download attempt, failing as without a network."""
    attempts = []

    def unreachable(url, dst, hash_prefix=None, progress=True):
        attempts.append(url)
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    return attempts


@pytest.mark.parametrize(
    "name, image_size", [("dino_vits16", 32), ("dinov2_vits14", 28), ("timm:resnet18", 32)]
)
def test_a_timm_backbone_returns_what_timm_pools(name, image_size, downloads):
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained="none", image_size=image_size).eval()
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        features = backbone(images)
        tokens = backbone.trunk.forward_features(images)
    assert features.shape == (2, backbone.out_features)
    assert backbone.out_features == (512 if name == "timm:resnet18" else 384)
    if name == "timm:resnet18":
        torch.testing.assert_close(features, tokens.mean(dim=(2, 3)))
    else:  # the CLS token after the final norm, as DINO's hub model returns it
        torch.testing.assert_close(features, tokens[:, 0])
        grid = image_size // backbone.trunk.patch_embed.patch_size[0]
        assert backbone.trunk.pos_embed.shape[1] == grid * grid + 1
    if name == "dino_vits16":  # DINO's ViT-S/16: 12 blocks, 384 wide, 6 heads
        trunk = backbone.trunk
        assert trunk.pretrained_cfg["architecture"] == "vit_small_patch16_224"
        assert trunk.pretrained_cfg["tag"] == "dino"
        assert (len(trunk.blocks), trunk.embed_dim, trunk.blocks[0].attn.num_heads) == (12, 384, 6)
    assert downloads == []


def test_pretrained_weights_come_from_the_hub_cache_in_either_file_name(empty_hub, downloads):
    torch.manual_seed(0)
    published = timm.create_model("vit_small_patch16_224.dino", num_classes=0).state_dict()
    empty_hub.mkdir()
    # The original file of the DINO hub model, as the authors' code leaves it in the cache.
    torch.save(published, empty_hub / DINO_FILE)
    original = build_backbone("dino_vits16", pretrained="imagenet").trunk.state_dict()
    # timm's own file takes precedence; at another image size timm resamples the positions.
    converted = {name: value + 1 for name, value in published.items()}
    save_file(converted, str(empty_hub / "vit_small_patch16_224.dino.safetensors"))
    small = build_backbone("dino_vits16", pretrained="imagenet", image_size=32).trunk.state_dict()

    assert downloads == []
    assert all(torch.equal(original[name], value) for name, value in published.items())
    assert torch.equal(small["blocks.3.mlp.fc1.weight"], converted["blocks.3.mlp.fc1.weight"])
    assert small["pos_embed"].shape == (1, 5, 384)


def test_pretrained_weights_are_downloaded_once_from_timms_hub_repository(empty_hub, monkeypatch):
    torch.manual_seed(0)
    published = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32)
    attempts = []

    def download(url, dst, hash_prefix=None, progress=True):
        attempts.append((url, dst))
        save_file(published.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        trunk = build_backbone("timm:vit_tiny_patch16_224", image_size=32).trunk
        assert torch.equal(trunk.blocks[0].attn.qkv.weight, published.blocks[0].attn.qkv.weight)
    hub_id = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    url = f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors"
    assert attempts == [(url, os.path.join(empty_hub, "vit_tiny_patch16_224.safetensors"))]


def test_unavailable_weights_are_one_line_saying_what_to_download_and_where(empty_hub, downloads):
    with pytest.raises(WeightsUnavailableError) as raised:
        build_backbone("dino_vits16", pretrained="imagenet")
    message = str(raised.value)
    assert "\n" not in message and downloads == [DINO_URL]
    assert (
        f"vit_small_patch16_224.dino.safetensors (or {DINO_FILE}) is not in {empty_hub}" in message
    )
    assert f"downloading {DINO_URL} failed" in message and "name resolution" in message
    assert "--set model.pretrained=none" in message


def test_a_corrupt_weight_file_is_one_line_saying_to_delete_it(empty_hub, downloads):
    empty_hub.mkdir()
    (empty_hub / DINO_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match=f"{DINO_FILE} could not be loaded .*delete"):
        build_backbone("dino_vits16", pretrained="imagenet")


def test_load_weights_false_builds_the_pretrained_network_without_reading_weights(
    empty_hub, downloads
):
    googlenet = build_backbone("googlenet", pretrained="imagenet", load_weights=False)
    assert googlenet.trunk.transform_input  # the input transform of the ImageNet weights
    assert not build_backbone("googlenet", pretrained="none").trunk.transform_input
    build_backbone("resnet50", pretrained="imagenet", load_weights=False)
    build_backbone("timm:vit_tiny_patch16_224", load_weights=False, image_size=32)
    assert downloads == []


@pytest.mark.parametrize(
    "name, pooling, expected",
    [
        ("resnet50", "auto", "avgmax"),
        ("resnet50", "avg", "avg"),
        ("googlenet", "auto", "avg"),
        ("googlenet", "avgmax", "avgmax"),
        ("small_cnn", "auto", "avgmax"),
        ("small_cnn", "avg", "avg"),
    ],
)
def test_pooling_of_the_cnns(name, pooling, expected):
    torch.manual_seed(0)
    backbone = build_backbone(name, pretrained="none", pooling=pooling).eval()
    side = 32 if name == "small_cnn" else 64
    last = {"resnet50": "layer4", "googlenet": "inception5b", "small_cnn": "11"}[name]
    maps = []
    backbone.trunk.get_submodule(last).register_forward_hook(lambda m, i, out: maps.append(out))
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, side, side))
    pooled = maps[0].mean(dim=(2, 3))
    if expected == "avgmax":
        pooled = pooled + maps[0].amax(dim=(2, 3))
    torch.testing.assert_close(features, pooled)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"name": "timm:"}, ConfigError, r"unknown backbone 'timm:'.*timm:<model name>"),
        ({"name": "timm:no_such_net"}, ConfigError, r"timm .* has no model 'no_such_net'"),
        ({"name": "dino_vits16", "pooling": "avg"}, ConfigError, r"pooled as timm pools it"),
        ({"name": "resnet50", "pooling": "max"}, ConfigError, r"choose one of auto, avgmax, avg"),
    ],
)
def test_bad_choices_are_one_clear_error(kwargs, error, message):
    with pytest.raises(error, match=message):
        build_backbone(**{"pretrained": "none", **kwargs})


def test_without_timm_the_error_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(MissingExtraError, match=r'pip install "gca-pyg\[vit\]"'):
        build_backbone("dino_vits16", pretrained="none")
