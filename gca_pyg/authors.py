"""The authors' state dicts (PWenJay/GCA-HNG) mapped onto gca_pyg's :class:`~gca_pyg.model.GCAHNG`.

Their ``train.py`` saves ``GCA_HNG.state_dict()``; their released models are such files.
:func:`convert_state_dict` maps every tensor (:data:`KEY_TABLE`) so that the network computes the
same function as theirs (tests/test_convert.py compares embeddings, node logits and fusion weights
with their forward). Where the layouts differ:

- their one LayerNorm per node update (and per edge update) fills each of our separate LayerNorms
  of that update;
- our undirected edge storage and folded edge query need no change of weights: they compute the
  same products from the same matrices;
- tensors their forward never uses are dropped: the ImageNet classifier of ResNet-50 and GoogLeNet,
  GoogLeNet's auxiliary heads, the ``update_node`` Linear of their node layer;
- a DINO ViT's position embedding, which their backbone interpolates at every forward pass for the
  image size (bicubic, DINO's scale factor), is interpolated the same way once, for
  ``data.image_size``.

A file that holds only their metric model (backbone and embedding head, no ``gnn.*`` nor
``softmax_classifier.*``) converts too: the correlation net and the classifiers keep a fresh
initialisation, which evaluation does not use. Reading their files and writing gca_pyg checkpoints
is :mod:`gca_pyg.checkpoint`'s (:func:`~gca_pyg.checkpoint.convert_authors_file`,
``model.init``); ``python -m gca_pyg.convert`` is the command.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg.backbones import timm_model_name
from gca_pyg.config import Config
from gca_pyg.errors import GcaError

__all__ = [
    "ReferenceFormatError",
    "OUR_PREFIXES",
    "KEY_TABLE",
    "OFFICIAL_TRAIN_CLASSES",
    "convert_state_dict",
    "check_fits",
    "their_state",
    "their_backbone",
    "their_classes",
    "class_rows",
    "tensors",
]

#: Where each component of GCA-HNG lives in gca_pyg's :class:`~gca_pyg.model.GCAHNG`: the one place
#: to change when the model's attributes move. ``{layer}`` is the index of a correlation-net layer.
OUR_PREFIXES = {
    "backbone": "backbone.trunk.",
    "embedding head": "embedding.",
    "correlation net": "generator.net.",
    "correlation net layers": "generator.net.convs.{layer}.",
    "classifier": "generator.classifier.",
}

#: Where the metric loss keeps its own parameters (Proxy-Anchor's proxies; N-pair has none).
METRIC_LOSS_PREFIX = "criterion."

#: The authors' state-dict keys, by component: their key prefix -> our prefixes within the
#: component (see :data:`OUR_PREFIXES`). Several: one of their tensors fills several of ours (a
#: shared LayerNorm); none: their forward does not use the tensor, it is dropped. The longest
#: matching prefix applies.
KEY_TABLE = {
    "backbone": {
        # ResNet-50 (MODEL.BACKBONE: Resnet50): torchvision's names under `model.`.
        "feature_extractor.backbone.model.": ("",),
        "feature_extractor.backbone.model.fc.": (),  # the ImageNet classifier
        # GoogLeNet (Googlenet): torchvision's names; DINO ViT-S/16 (DINO): DINO's, which are
        # timm's.
        "feature_extractor.backbone.": ("",),
        "feature_extractor.backbone.fc.": (),  # GoogLeNet's ImageNet classifier
        "feature_extractor.backbone.aux1.": (),  # GoogLeNet's auxiliary heads (kept by a model
        "feature_extractor.backbone.aux2.": (),  # built without ImageNet weights)
        "feature_extractor.backbone.head.": (),  # a ViT classifier (DINO's is an Identity)
    },
    "embedding head": {
        "feature_extractor.fc.0.": ("0.",),  # BatchNorm1d
        "feature_extractor.fc.1.": ("1.",),  # Linear
    },
    "correlation net": {
        "gnn.dim_red.": ("lin_in.",),
        "gnn.bottleneck1.0.": ("edge_norm.",),
        "gnn.bottleneck2.0.": ("node_norm.",),
        "gnn.fc.0.": ("lin_fusion.",),
        "gnn.cls.0.": ("lin_classifier.",),
    },
    "correlation net layers": {
        "gnn.gnn.{layer}.node_model.layers.0.att.q_linear.": ("lin_query.",),
        "gnn.gnn.{layer}.node_model.layers.0.att.k_linear.": ("lin_key.",),
        "gnn.gnn.{layer}.node_model.layers.0.att.v_linear.": ("lin_value.",),
        "gnn.gnn.{layer}.node_model.layers.0.att.out.": ("lin_out.",),
        "gnn.gnn.{layer}.node_model.layers.0.edge_to_node.": ("lin_edge_to_node.",),
        "gnn.gnn.{layer}.node_model.layers.0.linear1.": ("node_ffn.0.",),
        "gnn.gnn.{layer}.node_model.layers.0.linear2.": ("node_ffn.2.",),
        "gnn.gnn.{layer}.node_model.layers.0.norm.1.": (
            "norm_attention.",
            "norm_edge_to_node.",
            "norm_node_ffn.",
        ),
        "gnn.gnn.{layer}.node_model.layers.0.update_node.": (),  # defined, never called
        "gnn.gnn.{layer}.edge_model.node_to_edge.": ("lin_node_to_edge.",),
        "gnn.gnn.{layer}.edge_model.att.q_linear.": ("lin_edge_query.",),
        "gnn.gnn.{layer}.edge_model.att.k_linear.": ("lin_edge_key.",),
        "gnn.gnn.{layer}.edge_model.att.v_linear.": ("lin_edge_value.",),
        "gnn.gnn.{layer}.edge_model.norm.1.": ("norm_edge_attention.", "norm_edge_ffn."),
        "gnn.gnn.{layer}.edge_model.linear.0.": ("edge_ffn.0.",),
        "gnn.gnn.{layer}.edge_model.linear.2.": ("edge_ffn.2.",),  # the LayerNorm of FFN_e
        "gnn.gnn.{layer}.edge_model.linear.3.": ("edge_ffn.3.",),
    },
    "classifier": {"softmax_classifier.": ("",)},
}

#: Their backbones, recognised by a key only each has, with the name their configs give.
THEIR_BACKBONES = {
    "resnet50": ("feature_extractor.backbone.model.layer4.", "ResNet-50 (BACKBONE: Resnet50)"),
    "googlenet": ("feature_extractor.backbone.inception5b.", "GoogLeNet (BACKBONE: Googlenet)"),
    "vit": ("feature_extractor.backbone.blocks.0.", "DINO ViT (BACKBONE: DINO)"),
}
#: The components a file of their metric model alone lacks.
_GENERATOR_PARTS = ("correlation net", "correlation net layers", "classifier")
_REPOSITORY = "PWenJay/GCA-HNG"


class ReferenceFormatError(GcaError, ValueError):
    """A file is not a state dict of the authors' ``GCA_HNG``, or does not fit the config."""


def convert_state_dict(
    state_dict: dict[str, Tensor],
    model: torch.nn.Module,
    source: str = "the state dict",
    *,
    other_classes: bool = False,
) -> tuple[dict[str, Tensor], list[str]]:
    """Maps a state dict of the authors' ``GCA_HNG`` onto `model`, a
    :class:`~gca_pyg.model.GCAHNG` built for the same network (backbone, embedding size, layers).

    Args:
        state_dict: What their ``train.py`` saved (``module.`` prefixes are removed).
        model: The model to fill; its state dict gives the target names and shapes.
        source: How to name `state_dict` in errors (its file).
        other_classes: Accept classifiers of another number of classes than `model`'s (their
            tensors are returned as they are; ``model.init`` leaves those out).

    Returns:
        ``(weights, notes)``: a complete state dict for ``model.load_state_dict``, and what the
        user should know (e.g. that a metric-model file left the correlation net fresh).

    Raises:
        ReferenceFormatError: If `state_dict` is not theirs, or its backbone, embedding size,
            number of layers or any tensor's shape does not fit `model`.
    """
    state = their_state(state_dict, source)
    targets = tensors(model)
    layers = sorted({int(key.split(".")[2]) for key in state if key.startswith("gnn.gnn.")})
    rules = sorted(_rules(layers), key=lambda rule: -len(rule[0]))
    weights: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unknown = []
    for key, value in state.items():
        prefix, ours = next(((p, o) for p, o in rules if key.startswith(p)), (None, ()))
        if prefix is None:
            unknown.append(key)
        for target in ours:
            weights[target + key[len(prefix) :]] = value
            origin[target + key[len(prefix) :]] = key
    if unknown:
        raise ReferenceFormatError(
            f"{source} is not a state dict of the authors' GCA_HNG ({_REPOSITORY}): unexpected "
            f"key {unknown[0]}" + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "")
        )
    _fit_position_embedding(weights, targets)
    for key, value in weights.items():
        if key in targets and other_classes and class_rows(key, value, weights, targets):
            continue
        if key not in targets or value.shape != targets[key].shape:
            expected = list(targets[key].shape) if key in targets else "no such tensor"
            raise ReferenceFormatError(
                f"{source}: their {origin[key]} {list(value.shape)} does not fit {key} "
                f"({expected}) of the config's network; the config must have their backbone, "
                "embedding size and layers (the recipe of their data set and backbone)"
            )
    notes = []
    missing = [key for key in targets if key not in weights]
    generator = tuple(OUR_PREFIXES[part].split("{")[0] for part in _GENERATOR_PARTS)
    if missing and not any(key.startswith(("gnn.", "softmax_classifier.")) for key in state):
        if all(key.startswith(generator) for key in missing):
            notes.append(
                f"{source} holds only the authors' metric model (backbone and embedding head): "
                "the correlation net and the classifiers start from a fresh initialisation "
                "(evaluation does not use them)"
            )
            weights.update({key: targets[key] for key in missing})
            missing = []
    own = [key for key in missing if key.startswith(METRIC_LOSS_PREFIX)]
    if own:  # their released code trains N-pair, which has no parameters
        notes.append(
            f"{source} holds no parameters of the metric loss (Proxy-Anchor's proxies): they "
            "start from a fresh initialisation"
        )
        weights.update({key: targets[key] for key in own})
        missing = [key for key in missing if key not in own]
    if missing:
        raise ReferenceFormatError(
            f"{source} lacks what {missing[0]} of the config's network needs"
            + (f" (and {len(missing) - 1} more tensors)" if len(missing) > 1 else "")
            + f"; is it a complete GCA_HNG state dict of {_REPOSITORY} for this backbone?"
        )
    return {**model.state_dict(), **{key: weights[key] for key in targets}}, notes


def tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors of `model`'s state dict: what a conversion fills (the generator's schedule
    state, which is not a tensor, keeps the model's fresh value)."""
    return {key: value for key, value in model.state_dict().items() if isinstance(value, Tensor)}


def class_rows(key: str, value: Tensor, weights: dict, targets: dict) -> bool:
    """Whether `value` differs from our tensor `key` only in having a row per class of another
    number of classes (the softmax and node classifiers)."""
    classifier = OUR_PREFIXES["classifier"] + "weight"
    if classifier not in weights:  # a metric-model file: no classifier to differ
        return False
    before, now = weights[classifier].shape[0], targets[classifier].shape[0]
    target = targets[key]
    if value.dim() == 0 or value.shape[1:] != target.shape[1:]:
        return False
    return (value.shape[0], target.shape[0]) == (before, now) and before != now


def _rules(layers: list[int]) -> list[tuple[str, tuple[str, ...]]]:
    """:data:`KEY_TABLE` with our full prefixes, its layer rows repeated for every layer."""
    rules = []
    for part, table in KEY_TABLE.items():
        for layer in layers if "{layer}" in OUR_PREFIXES[part] else [None]:
            base = OUR_PREFIXES[part].format(layer=layer)
            for theirs, ours in table.items():
                rules.append((theirs.format(layer=layer), tuple(base + suffix for suffix in ours)))
    return rules


def their_state(state_dict, source: str) -> dict[str, Tensor]:
    """`state_dict` checked to be theirs, without DataParallel's ``module.`` prefix."""
    if not isinstance(state_dict, dict) or not all(
        isinstance(value, Tensor) for value in state_dict.values()
    ):
        if isinstance(state_dict, dict) and "format_version" in state_dict:
            raise ReferenceFormatError(
                f"{source} is already a gca_pyg checkpoint: evaluate it with python -m "
                "gca_pyg.evaluate --checkpoint, or start from it with --set model.init=PATH"
            )
        raise ReferenceFormatError(
            f"{source} is not a state dict (a mapping of names to tensors) such as the authors' "
            f"train.py saves ({_REPOSITORY})"
        )
    state = dict(state_dict)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    if not any(key.startswith("feature_extractor.") for key in state):
        raise ReferenceFormatError(
            f"{source} is not a state dict of the authors' GCA_HNG ({_REPOSITORY}): it has no "
            "feature_extractor.* tensors"
        )
    return state


def their_backbone(state: dict[str, Tensor]) -> Optional[str]:
    """``"resnet50"``, ``"googlenet"`` or ``"vit"``: the backbone of their state dict."""
    return next(
        (
            name
            for name, (key, _) in THEIR_BACKBONES.items()
            if any(k.startswith(key) for k in state)
        ),
        None,
    )


def check_fits(state_dict: dict[str, Tensor], config: Config, source: str):
    """Raises a one-line :class:`ReferenceFormatError` if their state dict's backbone, embedding
    size or number of correlation-net layers differs from `config`'s."""
    state = their_state(state_dict, source)
    kind = their_backbone(state)
    ours = config.model.backbone
    if kind is None:
        raise ReferenceFormatError(
            f"{source} holds a backbone the authors' code does not build (none of ResNet-50, "
            "GoogLeNet, DINO ViT)"
        )
    fits = ours == kind if kind != "vit" else timm_model_name(ours) is not None
    if not fits:
        recipe = {"resnet50": "cub", "googlenet": "cub_googlenet", "vit": "cub_dino"}[kind]
        backbone = {"vit": "dino_vits16"}.get(kind, kind)
        raise ReferenceFormatError(
            f"{source} holds the authors' {THEIR_BACKBONES[kind][1]} backbone but model.backbone "
            f"is {ours}; use the recipe of that backbone (e.g. --config {recipe}) or "
            f"--set model.backbone={backbone}"
        )
    head = state.get("feature_extractor.fc.1.weight")
    if head is not None and head.shape[0] != config.model.embedding_size:
        raise ReferenceFormatError(
            f"{source} has {head.shape[0]}-d embeddings but model.embedding_size is "
            f"{config.model.embedding_size}; --set model.embedding_size={head.shape[0]}"
        )
    layers = {int(key.split(".")[2]) for key in state if key.startswith("gnn.gnn.")}
    if layers and len(layers) != config.net.num_layers:
        raise ReferenceFormatError(
            f"{source} has {len(layers)} correlation-net layers (their MODEL.GNN_LAYER) but "
            f"net.num_layers is {config.net.num_layers}; --set net.num_layers={len(layers)}"
        )


def their_classes(state_dict: dict[str, Tensor]) -> Optional[int]:
    """The number of training classes of their classifier, or None for a metric-model file."""
    weight = state_dict.get("softmax_classifier.weight", state_dict.get("gnn.cls.0.weight"))
    return None if weight is None else weight.shape[0]


def _fit_position_embedding(weights: dict[str, Tensor], targets: dict[str, Tensor]):
    """Their DINO ViT interpolates its position embedding for the image size at every forward
    pass (``VisionTransformer.interpolate_pos_encoding`` of the DINO hub code); ours is built for
    ``data.image_size``: do the same interpolation once."""
    key = OUR_PREFIXES["backbone"] + "pos_embed"
    if key not in weights or key not in targets:
        return
    theirs, ours = weights[key], targets[key]
    if theirs.shape == ours.shape or theirs.shape[::2] != ours.shape[::2]:
        return  # equal, or a mismatch to report
    positions, dim = theirs.shape[1] - 1, theirs.shape[2]
    side, grid = math.isqrt(positions), math.isqrt(ours.shape[1] - 1)
    if side * side != positions or grid * grid != ours.shape[1] - 1:
        return
    patches = theirs[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # DINO: w0 = w // patch_size + 0.1, scale_factor = w0 / sqrt(N), bicubic.
    scale = (grid + 0.1) / math.sqrt(positions)
    patches = F.interpolate(patches.float(), scale_factor=(scale, scale), mode="bicubic")
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(theirs.dtype)
    weights[key] = torch.cat([theirs[:, :1], patches], dim=1)


#: Training classes of the official splits, for a metric-model file (their eval.py's numbers).
OFFICIAL_TRAIN_CLASSES = {"cub": 100, "cars": 98, "sop": 11318, "inshop": 3997}
