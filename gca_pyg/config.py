"""YAML → typed, validated configuration, with command-line overrides.

A config file has the sections of :class:`Config`; every key is optional and falls back to the
dataclass default. ``python -m gca_pyg.train NAME_OR_PATH`` looks NAME up among the shipped
configs (``configs/NAME.yaml``). ``--set section.key=value`` overrides one key (the value is read as
YAML). An unknown key or a value of the wrong type is one :class:`~gca_pyg.errors.ConfigError` that
names the key and lists the valid ones.
"""

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from gca_pyg.backbones import (
    BACKBONE_NAMES,
    POOLING_CHOICES,
    PRETRAINED_CHOICES,
    TIMM_PREFIX,
    is_backbone_name,
    is_weights_file,
    timm_model_name,
)
from gca_pyg.data import CLASS_SAMPLING, DATASETS
from gca_pyg.errors import ConfigError
from gca_pyg.nn.edge_node_conv import EDGE_ATTENTION
from gca_pyg.schema import (
    DIST_BACKENDS,
    HARDNESS_SCALES,
    HEAD_INITS,
    LR_POLICIES,
    MEMORY_FORMATS,
    PRECISIONS,
    SYNTHETIC_PROXIES,
    DataConfig,
    EvalConfig,
    GraphConfig,
    LossConfig,
    ModelConfig,
    NetConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "ModelConfig",
    "GraphConfig",
    "TrainConfig",
    "EvalConfig",
    "load_config",
    "apply_overrides",
    "config_dirs",
    "available_configs",
]


@dataclass
class Config:
    name: str = "config"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    net: NetConfig = field(default_factory=NetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "Config":
        config = _build(cls, data, prefix="", source=source)
        _check_values(config, source)
        return config


def config_dirs() -> list[Path]:
    """Where shipped configs live: inside the installed package, or the checkout's ``configs/``."""
    package = Path(__file__).resolve().parent
    return [path for path in (package / "configs", package.parent / "configs") if path.is_dir()]


def available_configs() -> list[str]:
    return sorted({path.stem for folder in config_dirs() for path in folder.glob("*.yaml")})


def load_config(
    name_or_path: str, overrides: Sequence[str] = (), data_root: Optional[str] = None
) -> Config:
    """Reads a shipped config by name or a YAML file by path, then applies overrides.

    Args:
        name_or_path: ``cub``, ``demo``, ... (:func:`available_configs`) or a path to a YAML file.
        overrides: ``section.key=value`` strings, applied in order.
        data_root: Sets ``data.root`` (the ``--data-root`` option).
    """
    path = _resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{path} is not valid YAML ({_first_line(error)}); fix the file"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a mapping of sections (data:, model:, ...), "
            f"not a {type(data).__name__}"
        )
    data.setdefault("name", path.stem)
    source = str(path)
    if overrides:  # a bad value may come from the command line, not from the file
        source += " with " + " ".join(f"--set {override}" for override in overrides)
    return Config.from_dict(apply_overrides(data, overrides, data_root), source=source)


def add_override_argument(parser, help: str = "override one config key (repeatable)"):
    """The ``--set SECTION.KEY=VALUE`` option every command shares (read by
    :func:`apply_overrides`)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=help,
    )


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str] = (), data_root: Optional[str] = None
) -> dict[str, Any]:
    """Applies ``section.key=value`` strings and ``data_root`` to a config mapping (in place)."""
    for override in overrides:
        _apply_override(data, override)
    if data_root is not None:
        _set(data, "data", "root", data_root, origin=f"--data-root {data_root}")
    return data


def _resolve(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    for folder in config_dirs():
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no config named '{name_or_path}' and no such file; shipped configs: "
        f"{', '.join(available_configs()) or 'none found'} (or pass a path to a YAML file)"
    )


def _apply_override(data: dict[str, Any], override: str):
    key, sep, raw = override.partition("=")
    if not sep or "." not in key:
        raise ConfigError(
            f"--set '{override}' must look like section.key=value, e.g. --set optim.epochs=10"
        )
    section, _, name = key.partition(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    _set(data, section, name, value, origin=f"--set '{override}'")


def _set(data: dict[str, Any], section: str, name: str, value: Any, origin: str):
    target = data.setdefault(section, {})
    if not isinstance(target, dict):
        raise ConfigError(f"{origin}: '{section}' is not a section")
    target[name] = value


def _build(cls, data: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(
            f"'{where}' in {source} must be a mapping of keys, got {type(data).__name__}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(
            f"unknown key '{prefix}{unknown[0]}' in {source}; valid keys of "
            f"{where}: {', '.join(fields)}"
        )
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{prefix}{key}.", source)
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}", source)
    return cls(**values)


def _coerce(value: Any, kind, key: str, source: str):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        kind = next(arg for arg in args if arg is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            expected = "a mapping of names to values, e.g. {margin: 0.2}"
            raise _type_error(key, value, expected, source)
        return dict(value)
    if origin in (list, list):
        items = value if isinstance(value, list) else None
        if items is None:
            raise _type_error(key, value, f"a list of {_KIND_PLURALS[args[0]]}", source)
        return [_coerce(item, args[0], key, source) for item in items]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    raise _type_error(key, value, _KIND_NAMES[kind], source)


_KIND_NAMES = {int: "an int", float: "a number", bool: "a bool (true or false)", str: "a string"}
_KIND_PLURALS = {int: "ints", float: "numbers", bool: "bools", str: "strings"}


def _type_error(key: str, value: Any, expected: str, source: str) -> ConfigError:
    return ConfigError(
        f"'{key}' in {source} must be {expected}, got {value!r} ({type(value).__name__})"
    )


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def _check_values(config: Config, source: str):
    """Checks that need more than a type: choices and ranges."""
    choices = {
        "data.dataset": (config.data.dataset, tuple(DATASETS)),
        "data.class_sampling": (config.data.class_sampling, CLASS_SAMPLING),
        "model.pretrained": (
            config.model.pretrained,
            (config.model.pretrained,)
            if is_weights_file(config.model.pretrained)
            else PRETRAINED_CHOICES,
        ),
        "model.pooling": (config.model.pooling, POOLING_CHOICES),
        "model.head_init": (config.model.head_init, HEAD_INITS),
        "optim.lr_policy": (config.optim.lr_policy, LR_POLICIES),
        "train.precision": (config.train.precision, PRECISIONS),
        "train.memory_format": (config.train.memory_format, MEMORY_FORMATS),
        "train.dist_backend": (config.train.dist_backend, DIST_BACKENDS),
        "loss.synthetic_proxies": (config.loss.synthetic_proxies, SYNTHETIC_PROXIES),
        "loss.hardness_scale": (config.loss.hardness_scale, HARDNESS_SCALES),
        "net.edge_attention": (config.net.edge_attention, EDGE_ATTENTION),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"'{key}' in {source} is '{value}'; valid values: {', '.join(valid)}")
    model = config.model
    if not is_backbone_name(model.backbone):
        raise ConfigError(
            f"'model.backbone' in {source} is '{model.backbone}'; valid values: "
            f"{', '.join(BACKBONE_NAMES)}, {TIMM_PREFIX}<timm model name>"
        )
    if model.pooling != "auto" and timm_model_name(model.backbone) is not None:
        raise ConfigError(
            f"'model.pooling' in {source} is '{model.pooling}' but backbone {model.backbone} is a "
            "timm model, pooled as timm pools it; set it to auto"
        )
    scale = config.data.crop_scale
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(
            f"'data.crop_scale' in {source} must be [min, max] with 0 < min <= max <= 1 (the "
            f"area of a training crop as a fraction of the image), got {scale}"
        )
    if config.optim.grad_clip is not None and config.optim.grad_clip <= 0:
        raise ConfigError(
            f"'optim.grad_clip' in {source} must be positive (clip gradients by value) or null "
            f"(no clipping), got {config.optim.grad_clip}"
        )
    device = config.train.device
    if not (
        device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        raise ConfigError(
            f"'train.device' in {source} is '{device}'; valid values: auto, cpu, cuda, cuda:N"
        )
    positive = {
        "data.classes_per_batch": config.data.classes_per_batch,
        "data.image_size": config.data.image_size,
        "data.resize": config.data.resize,
        "model.embedding_size": config.model.embedding_size,
        "net.num_layers": config.net.num_layers,
        "net.heads": config.net.heads,
        "optim.epochs": config.optim.epochs,
        "optim.metric_lr_step": config.optim.metric_lr_step,
        "train.eval_every": config.train.eval_every,
        "eval.batch_size": config.eval.batch_size,
        "train.dist_timeout": config.train.dist_timeout,
        "loss.proxy_alpha": config.loss.proxy_alpha,
        "optim.proxy_lr_ratio": config.optim.proxy_lr_ratio,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"'{key}' in {source} must be positive, got {value}")
    if config.data.classes_per_batch < 2 or config.data.samples_per_class < 2:
        raise ConfigError(
            f"'data.classes_per_batch' and 'data.samples_per_class' in {source} must "
            "both be at least 2: GCA-HNG needs positives and negatives in a batch"
        )
    if config.model.embedding_size % config.net.heads:
        raise ConfigError(
            f"'model.embedding_size' ({config.model.embedding_size}) in {source} must "
            f"be divisible by 'net.heads' ({config.net.heads})"
        )
    neighbors = config.graph.neighbors
    if neighbors is not None and neighbors < 1:
        raise ConfigError(
            f"'graph.neighbors' in {source} must be a positive int (neighbours per "
            f"node of a sparse batch graph) or null (the complete graph), got "
            f"{neighbors}"
        )
    if config.graph.memory < 0 or config.graph.memory_start < 0:
        raise ConfigError(
            f"'graph.memory' and 'graph.memory_start' in {source} cannot be negative, got "
            f"{config.graph.memory} and {config.graph.memory_start}"
        )
    memory_neighbors = config.graph.memory_neighbors
    if memory_neighbors is not None and (memory_neighbors < 1 or not config.graph.memory):
        raise ConfigError(
            f"'graph.memory_neighbors' in {source} must be a positive int (neighbours searched in "
            "the memory apart from the batch's graph.neighbors) with 'graph.memory' set, or null; "
            f"got {memory_neighbors} with graph.memory {config.graph.memory}"
        )
    if config.graph.memory and neighbors is None:
        raise ConfigError(
            f"'graph.memory' in {source} needs 'graph.neighbors' (e.g. 16): memory nodes join "
            "the sparse batch graph, where each node keeps its k nearest; the complete graph "
            "over batch and memory would grow as (N + M)^2"
        )
    if not config.loss.metric.strip():
        raise ConfigError(
            f"'loss.metric' in {source} is empty; name a metric loss: npair, proxy_anchor or "
            "pml:<LossName>"
        )
    if not config.eval.ks or min(config.eval.ks) < 1:
        raise ConfigError(f"'eval.ks' in {source} must be a non-empty list of positive ints")
    if config.data.num_workers < 0 or config.optim.warmup_epochs < 0:
        raise ConfigError(
            f"'data.num_workers' and 'optim.warmup_epochs' in {source} cannot be negative"
        )
