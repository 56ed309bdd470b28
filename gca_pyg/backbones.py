"""Image backbones: a batch of images to one pooled feature vector per image (docs/method.md,
"Backbone and embedding").

ResNet-50 and the small CNN pool their last feature map by global average plus global max pooling,
summed; GoogLeNet by global average pooling, as in the authors' code. Each reports the size of its
feature vector as ``out_features``. ResNet-50 and GoogLeNet come from torchvision,
with its ImageNet weights when asked; ``small_cnn`` is a few conv-BN-ReLU blocks that train quickly
on small images on a CPU, for the demo data set.
"""

import contextlib
import os
import socket
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

from gca_pyg.errors import ConfigError, WeightsUnavailableError

BACKBONE_NAMES = ("resnet50", "googlenet", "small_cnn")
PRETRAINED_CHOICES = ("imagenet", "none")

# Seconds without a byte from the server before a weight download gives up.
DOWNLOAD_TIMEOUT = 30.0


class GlobalAvgMaxPool2d(nn.Module):
    r"""Global average pooling plus global max pooling, summed.

    .. math::
        \mathbf{f}_c = \frac{1}{HW} \sum_{h,w} \mathbf{x}_{c,h,w} + \max_{h,w} \mathbf{x}_{c,h,w}

    Shapes:
        - **input:** :math:`(N, C, H, W)`
        - **output:** :math:`(N, C)`
    """

    def forward(self, x):
        return x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))


class Backbone(nn.Module):
    r"""An image trunk ending in a pooled feature vector, optionally with frozen BatchNorm2d
    statistics.

    Frozen BatchNorm2d layers keep their running statistics: they stay in eval mode when the
    backbone is put in training mode, so they normalise with the (ImageNet) statistics they were
    loaded with,

    .. math::
        \mathrm{BN}(\mathbf{x}) = \boldsymbol{\gamma} \odot
        \frac{\mathbf{x} - \boldsymbol{\mu}_{\mathrm{running}}}
        {\sqrt{\boldsymbol{\sigma}^2_{\mathrm{running}} + \epsilon}} + \boldsymbol{\beta},

    while their affine parameters :math:`\boldsymbol{\gamma}, \boldsymbol{\beta}` require grad
    like every other backbone parameter, as in the authors' code after warm-up (during the warm-up
    epochs the training step runs the whole backbone without gradients).

    Args:
        trunk (torch.nn.Module): Maps images to ``(N, out_features)`` features.
        out_features (int): Size of the feature vector.
        frozen_bn (bool, optional): Keep every BatchNorm2d of the trunk in eval mode.
            (default: ``False``)

    Shapes:
        - **input:** images :math:`(N, 3, H, W)`
        - **output:** features :math:`(N, \text{out\_features})`
    """

    def __init__(self, trunk, out_features, frozen_bn=False):
        super().__init__()
        self.trunk = trunk
        self.out_features = out_features
        self.frozen_bn = frozen_bn
        self.train(self.training)

    def _frozen_norms(self):
        if not self.frozen_bn:
            return []
        return [module for module in self.trunk.modules() if isinstance(module, nn.BatchNorm2d)]

    def train(self, mode=True):
        super().train(mode)
        for norm in self._frozen_norms():
            norm.eval()
        return self

    def forward(self, images):
        return self.trunk(images)

    def extra_repr(self):
        return f"out_features={self.out_features}, frozen_bn={self.frozen_bn}"


def build_backbone(name, pretrained="imagenet", frozen_bn=False):
    """Build a backbone by name.

    Args:
        name (str): One of ``"resnet50"`` (2048-d), ``"googlenet"`` (1024-d) or ``"small_cnn"``
            (128-d).
        pretrained (str, optional): ``"imagenet"`` for torchvision's ImageNet weights (downloaded
            into the torch hub cache when missing), ``"none"`` for random initialisation; the
            small CNN has no pretrained weights. (default: ``"imagenet"``)
        frozen_bn (bool, optional): Keep the running statistics of every BatchNorm2d frozen (eval
            mode); their affine parameters still train. The CUB and Cars recipes set it.
            (default: ``False``)

    Returns:
        Backbone: The module, with attribute ``out_features``.

    Raises:
        ConfigError: If the name or ``pretrained`` is unknown, or ImageNet weights are asked of the
            small CNN.
        WeightsUnavailableError: If ImageNet weights are neither cached nor downloadable.
    """
    if name not in BACKBONE_NAMES:
        raise ConfigError(
            f"unknown backbone {name!r}; choose one of {', '.join(BACKBONE_NAMES)} (model.backbone)"
        )
    if pretrained not in PRETRAINED_CHOICES:
        raise ConfigError(
            f"unknown pretrained={pretrained!r} for backbone {name}; choose one of "
            f"{', '.join(PRETRAINED_CHOICES)} (model.pretrained)"
        )
    if name == "small_cnn":
        if pretrained == "imagenet":
            raise ConfigError(
                "backbone small_cnn has no ImageNet weights; set model.pretrained to none "
                "(--set model.pretrained=none)"
            )
        return Backbone(_small_cnn(), out_features=128, frozen_bn=frozen_bn)

    if name == "resnet50":
        weights = _cached_weights(name, models.ResNet50_Weights.IMAGENET1K_V1, pretrained)
        trunk = models.resnet50(weights=weights)
        out_features = 2048
    else:
        weights = _cached_weights(name, models.GoogLeNet_Weights.IMAGENET1K_V1, pretrained)
        # With weights, torchvision loads the auxiliary heads, then drops them; without, the class
        # defaults would keep them and warn about the initialisation.
        options = {} if weights else {"aux_logits": False, "init_weights": True}
        trunk = models.googlenet(weights=weights, **options)
        trunk.dropout = nn.Identity()
        out_features = 1024
    # torchvision's forward pools with `avgpool`, flattens, then applies `fc`. ResNet-50 sums
    # average and max pooling; GoogLeNet keeps average pooling, as the authors' code
    # (docs/method.md, "Backbone and embedding").
    if name == "resnet50":
        trunk.avgpool = GlobalAvgMaxPool2d()
    trunk.fc = nn.Identity()
    return Backbone(trunk, out_features=out_features, frozen_bn=frozen_bn)


def _small_cnn():
    """Four 3×3 conv-BN-ReLU blocks, three of stride 2: a 32×32 image becomes a 4×4×128 map."""
    channels = [3, 32, 64, 128, 128]
    strides = [2, 2, 2, 1]
    layers = []
    for in_channels, out_channels, stride in zip(channels[:-1], channels[1:], strides):
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers, GlobalAvgMaxPool2d())


def _cached_weights(name, weights, pretrained):
    """Make sure ``weights`` are in the torch hub cache, downloading them if needed.

    Args:
        name (str): Backbone name, for the error message.
        weights (torchvision.models.WeightsEnum): The weights torchvision will load.
        pretrained (str): ``"imagenet"`` or ``"none"``.

    Returns:
        torchvision.models.WeightsEnum or None: ``weights``, or ``None`` for ``pretrained="none"``.

    Raises:
        WeightsUnavailableError: If the file is not cached and the download fails.
    """
    if pretrained == "none":
        return None
    directory = os.path.join(torch.hub.get_dir(), "checkpoints")
    file_name = os.path.basename(urlparse(weights.url).path)
    path = os.path.join(directory, file_name)
    if os.path.isfile(path):
        return weights
    hash_match = torch.hub.HASH_REGEX.search(file_name)
    hash_prefix = hash_match.group(1) if hash_match else None
    try:
        os.makedirs(directory, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            torch.hub.download_url_to_file(weights.url, path, hash_prefix, progress=True)
    except Exception as error:  # any failure (network, disk, hash) means the same thing to the user
        reason = " ".join(str(error).split()) or type(error).__name__
        raise WeightsUnavailableError(
            f"ImageNet weights of {name} are unavailable: {file_name} is not in {directory} and "
            f"downloading {weights.url} failed ({reason}); put the file there, or train without "
            "them with `pretrained: none` in the config (--set model.pretrained=none)"
        ) from error
    return weights


@contextlib.contextmanager
def _socket_timeout(seconds):
    """Give sockets opened inside the block a timeout, so an unreachable server cannot hang us."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
