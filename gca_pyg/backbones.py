"""Image backbones: a batch of images to one pooled feature vector per image (docs/method.md,
"Backbone and embedding").

ResNet-50 and the small CNN pool their last feature map by global average plus global max pooling,
summed; GoogLeNet by global average pooling, as in the authors' code (``pooling`` chooses for the
three CNNs). Each reports the size of its feature vector as ``out_features``. ResNet-50 and
GoogLeNet come from torchvision, with its ImageNet weights when asked; ``small_cnn`` is a few
conv-BN-ReLU blocks that train quickly on small images on a CPU, for the demo data set.

Vision transformers and any other model come from timm (the ``vit`` extra) and are pooled as timm
pools them (:func:`timm.create_model` with ``num_classes=0``): ``dino_vits16`` is DINO's ViT-S/16
(timm's ``vit_small_patch16_224.dino``, the weights of the DINO hub model; its CLS token, 384-d),
``dinov2_vits14`` DINOv2's ViT-S/14 (``vit_small_patch14_dinov2.lvd142m``, 384-d), and
``timm:<name>`` any timm model by name.
"""

import contextlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models

from gca_pyg.errors import ConfigError, MissingExtraError, WeightsUnavailableError

#: The torchvision / built-in CNNs.
CNN_BACKBONES = ("resnet50", "googlenet", "small_cnn")
#: Short names of timm models, and the timm model each stands for.
TIMM_ALIASES = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
}
#: ``model.backbone: timm:<name>`` builds any timm model.
TIMM_PREFIX = "timm:"
BACKBONE_NAMES = CNN_BACKBONES + tuple(TIMM_ALIASES)
PRETRAINED_CHOICES = ("imagenet", "none")
#: ``model.pretrained`` may also name a file of backbone weights with one of these suffixes.
WEIGHTS_SUFFIXES = (".pt", ".pth")
#: ``auto``: the backbone's own pooling (ResNet-50 and the small CNN avg+max, GoogLeNet avg, a timm
#: model timm's); ``avgmax`` or ``avg`` for the three CNNs.
POOLING_CHOICES = ("auto", "avgmax", "avg")

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


def timm_model_name(name):
    """The timm model that backbone `name` stands for (None for a CNN)."""
    if name.startswith(TIMM_PREFIX):
        return name[len(TIMM_PREFIX) :]
    return TIMM_ALIASES.get(name)


def is_backbone_name(name):
    """Whether `name` names a backbone. Whether a ``timm:<name>`` exists is only known to timm,
    when the backbone is built."""
    return name in BACKBONE_NAMES or (name.startswith(TIMM_PREFIX) and len(name) > len(TIMM_PREFIX))


def check_backbone_name(name, where="model.backbone"):
    """Raises a :class:`ConfigError` naming the choices if `name` is no backbone name."""
    if is_backbone_name(name):
        return
    raise ConfigError(
        f"unknown backbone {name!r} ({where}); choose one of {', '.join(BACKBONE_NAMES)}, "
        f"or {TIMM_PREFIX}<model name> for any timm model"
    )


def build_backbone(
    name,
    pretrained="imagenet",
    frozen_bn=False,
    *,
    pooling="auto",
    image_size=224,
    load_weights=True,
):
    """Build a backbone by name.

    Args:
        name (str): ``"resnet50"`` (2048-d), ``"googlenet"`` (1024-d), ``"small_cnn"`` (128-d),
            ``"dino_vits16"`` (384-d), ``"dinov2_vits14"`` (384-d) or ``"timm:<model name>"``.
            The last three need timm (``pip install "gca-pyg[vit]"``).
        pretrained (str, optional): ``"imagenet"`` for the published weights (torchvision's
            ImageNet weights; timm's weights of the model's tag, e.g. DINO's self-supervised
            ImageNet training for ``dino_vits16``), downloaded into the torch hub cache when
            missing; ``"none"`` for random initialisation; or the path of a ``.pt``/``.pth`` file
            holding the ``state_dict()`` of a backbone built by this function (by name, without
            pretrained weights), e.g. one pretrained on your own images. The small CNN has no
            ImageNet weights. (default: ``"imagenet"``)
        frozen_bn (bool, optional): Keep the running statistics of every BatchNorm2d frozen (eval
            mode); their affine parameters still train. The CUB and Cars recipes set it.
            (default: ``False``)
        pooling (str, optional): ``"auto"`` (the backbone's own), ``"avgmax"`` (global average
            plus global max) or ``"avg"`` (global average); the last two for the three CNNs only.
            (default: ``"auto"``)
        image_size (int, optional): Side of the square input images; timm models with a fixed
            input size (vision transformers) are built for it, their position embeddings resampled
            by timm when pretrained weights are loaded. (default: ``224``)
        load_weights (bool, optional): Load the pretrained weights. ``False`` builds the same
            network (e.g. GoogLeNet's input transform of its ImageNet weights) without reading or
            downloading them, for a checkpoint that holds every weight. (default: ``True``)

    Returns:
        Backbone: The module, with attribute ``out_features``.

    Raises:
        ConfigError: If the name, ``pretrained`` or ``pooling`` is unknown or does not apply, or
            ImageNet weights are asked of the small CNN.
        MissingExtraError: If a timm backbone is asked for and timm is not installed.
        WeightsUnavailableError: If pretrained weights are neither cached nor downloadable.
    """
    check_backbone_name(name)
    if is_weights_file(pretrained):
        backbone = build_backbone(
            name, "none", frozen_bn, pooling=pooling, image_size=image_size, load_weights=False
        )
        if load_weights:
            load_backbone_weights(backbone, pretrained, name)
        return backbone
    if pretrained not in PRETRAINED_CHOICES:
        raise ConfigError(
            f"unknown pretrained={pretrained!r} for backbone {name}; choose one of "
            f"{', '.join(PRETRAINED_CHOICES)} or a {'/'.join(WEIGHTS_SUFFIXES)} file of backbone "
            "weights (model.pretrained)"
        )
    if pooling not in POOLING_CHOICES:
        raise ConfigError(
            f"unknown pooling={pooling!r} for backbone {name}; choose one of "
            f"{', '.join(POOLING_CHOICES)} (model.pooling)"
        )
    model_name = timm_model_name(name)
    if model_name is not None:
        if pooling != "auto":
            raise ConfigError(
                f"model.pooling is {pooling} but backbone {name} is a timm model, pooled as timm "
                "pools it; set model.pooling to auto (--set model.pooling=auto)"
            )
        trunk = _timm_trunk(name, model_name, pretrained, image_size, load_weights)
        return Backbone(trunk, out_features=trunk.num_features, frozen_bn=frozen_bn)
    if name == "small_cnn":
        if pretrained == "imagenet":
            raise ConfigError(
                "backbone small_cnn has no ImageNet weights; set model.pretrained to none "
                "(--set model.pretrained=none)"
            )
        return Backbone(_small_cnn(pooling), out_features=128, frozen_bn=frozen_bn)

    load = pretrained if load_weights else "none"
    if name == "resnet50":
        weights = _cached_weights(name, models.ResNet50_Weights.IMAGENET1K_V1, load)
        trunk = models.resnet50(weights=weights)
        out_features = 2048
    else:
        weights = _cached_weights(name, models.GoogLeNet_Weights.IMAGENET1K_V1, load)
        # With weights, torchvision loads the auxiliary heads, then drops them; without, the class
        # defaults would keep them and warn about the initialisation. The input transform belongs
        # to the ImageNet weights: a network built for them keeps it when they are not loaded.
        options = (
            {}
            if weights
            else {
                "aux_logits": False,
                "init_weights": True,
                "transform_input": pretrained == "imagenet",
            }
        )
        trunk = models.googlenet(weights=weights, **options)
        trunk.dropout = nn.Identity()
        out_features = 1024
    # torchvision's forward pools with `avgpool` (global average pooling), flattens, then applies
    # `fc`. By default ResNet-50 sums average and max pooling and GoogLeNet keeps average pooling,
    # as the authors' code (docs/method.md, "Backbone and embedding").
    if pooling == "avgmax" or (pooling == "auto" and name == "resnet50"):
        trunk.avgpool = GlobalAvgMaxPool2d()
    trunk.fc = nn.Identity()
    return Backbone(trunk, out_features=out_features, frozen_bn=frozen_bn)


def is_weights_file(pretrained: str) -> bool:
    """Whether ``model.pretrained`` names a file of backbone weights (by its suffix)."""
    return str(pretrained).lower().endswith(WEIGHTS_SUFFIXES)


def load_backbone_weights(backbone: nn.Module, path, name: str):
    """Loads a backbone ``state_dict()`` saved in `path` into `backbone` (built as `name`).

    Raises:
        WeightsUnavailableError: If the file is missing or unreadable.
        ConfigError: If its tensors are not those of `backbone`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(
            f"model.pretrained names {path}, which does not exist: give the path of a saved "
            f"backbone state_dict, or imagenet / none"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise WeightsUnavailableError(
            f"model.pretrained {path} could not be read ({str(error).splitlines()[0]}): save it "
            "with torch.save(backbone.state_dict(), path)"
        ) from error
    if not isinstance(state, dict):
        raise ConfigError(
            f"model.pretrained {path} holds a {type(state).__name__}, not a state_dict: save it "
            "with torch.save(backbone.state_dict(), path)"
        )
    expected = backbone.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise ConfigError(
            f"model.pretrained {path} is not a {name} backbone of this config "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} misshapen "
            f"tensors, e.g. {first}): use weights saved from build_backbone({name!r}, ...)"
        )
    backbone.load_state_dict(state)


def _small_cnn(pooling="auto"):
    """Four 3×3 conv-BN-ReLU blocks, three of stride 2: a 32×32 image becomes a 4×4×128 map,
    pooled by average plus max (``auto``, ``avgmax``) or by average (``avg``)."""
    channels = [3, 32, 64, 128, 128]
    strides = [2, 2, 2, 1]
    layers = []
    for in_channels, out_channels, stride in zip(channels[:-1], channels[1:], strides):
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if pooling == "avg" else None
    return nn.Sequential(*layers, pool or GlobalAvgMaxPool2d())


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
    file_name = os.path.basename(urlparse(weights.url).path)
    hash_match = torch.hub.HASH_REGEX.search(file_name)
    _cached_file(
        f"ImageNet weights of {name}",
        weights.url,
        file_name,
        hash_prefix=hash_match.group(1) if hash_match else None,
    )
    return weights


def _cached_file(what, url, file_name, also=(), hash_prefix=None):
    """The path of a weight file in the torch hub cache (``<hub dir>/checkpoints``): `file_name`
    or one of the names in `also` if present there, else `file_name` downloaded from `url`.

    Raises:
        WeightsUnavailableError: If no such file is cached and the download fails (one line that
            says what to download and where to put it).
    """
    directory = os.path.join(torch.hub.get_dir(), "checkpoints")
    for candidate in (file_name, *also):
        if os.path.isfile(os.path.join(directory, candidate)):
            return os.path.join(directory, candidate)
    path = os.path.join(directory, file_name)
    try:
        os.makedirs(directory, exist_ok=True)
        with _socket_timeout(DOWNLOAD_TIMEOUT):
            torch.hub.download_url_to_file(url, path, hash_prefix, progress=True)
    except Exception as error:  # any failure (network, disk, hash) means the same thing to the user
        reason = " ".join(str(error).split()) or type(error).__name__
        others = f" (or {' or '.join(also)})" if also else ""
        raise WeightsUnavailableError(
            f"{what} are unavailable: {file_name}{others} is not in {directory} and downloading "
            f"{url} failed ({reason}); put the file there, or train without them with "
            "`pretrained: none` in the config (--set model.pretrained=none)"
        ) from error
    return path


def _import_timm(name):
    try:
        import timm
    except ImportError:
        raise MissingExtraError(
            f"backbone {name} comes from timm, which is not installed: "
            'pip install "gca-pyg[vit]" (or pip install timm)'
        ) from None
    return timm


def _timm_trunk(name, model_name, pretrained, image_size, load_weights):
    """timm's `model_name` without classifier (``num_classes=0``: its pooled features), for
    `image_size` where its input size is fixed, with its pretrained weights from the torch hub
    cache when asked (see :func:`_timm_weights`)."""
    timm = _import_timm(name)
    from timm.models import get_pretrained_cfg

    if not timm.is_model(model_name):
        raise ConfigError(
            f"timm {timm.__version__} has no model {model_name!r} (model.backbone: {name}); "
            f"python -c \"import timm; print(timm.list_models('*vit_small*'))\" lists names"
        )
    cfg = get_pretrained_cfg(model_name)
    options = {"num_classes": 0}
    if cfg is not None and cfg.fixed_input_size:
        options["img_size"] = image_size
    if pretrained == "none" or not load_weights:
        return timm.create_model(model_name, pretrained=False, **options)
    path = _timm_weights(name, model_name, cfg)
    # The file is a state dict; only an original .npz file needs timm's custom loader (older timm
    # would apply it to any file of a model whose original weights are .npz).
    overlay = {"file": path, "custom_load": bool(cfg.custom_load) and path.endswith(".npz")}
    try:
        return timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, **options
        )
    except Exception as error:  # a truncated or foreign file
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise WeightsUnavailableError(
            f"the pretrained weights of {name} in {path} could not be loaded ({reason}); delete "
            "the file to download it again, or train without them with `pretrained: none` "
            "(--set model.pretrained=none)"
        ) from None


def _timm_weights(name, model_name, cfg):
    """The weight file of timm model `model_name` in the torch hub cache, downloaded if missing.

    The file is ``<model_name>.safetensors`` from timm's Hugging Face hub repository, or, already
    there, the original file of the model's URL (e.g. ``dino_deitsmall16_pretrain.pth``, which the
    DINO hub model of the authors' code downloads to the same folder); timm converts either."""
    original = os.path.basename(urlparse(cfg.url).path) if cfg is not None and cfg.url else None
    if cfg is not None and cfg.hf_hub_id:
        remote = cfg.hf_hub_filename or "model.safetensors"
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{remote}"
        file_name = model_name.replace("/", "--") + os.path.splitext(remote)[1]
        also = (original,) if original else ()
    elif original:
        url, file_name, also = cfg.url, original, ()
    else:
        raise ConfigError(
            f"timm publishes no pretrained weights for {model_name} (model.backbone: {name}); "
            "train without them with `pretrained: none` (--set model.pretrained=none)"
        )
    return _cached_file(f"pretrained weights of {name} (timm {model_name})", url, file_name, also)


@contextlib.contextmanager
def _socket_timeout(seconds):
    """Give sockets opened inside the block a timeout, so an unreachable server cannot hang us."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
