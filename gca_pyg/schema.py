"""The configuration's sections and their choices: plain dataclasses that import nothing from
gca_pyg.

A recipe (``configs/*.yaml``) has one mapping per section; every key is optional and falls back to
the default here. :mod:`gca_pyg.config` reads, validates and overrides recipes into a
:class:`~gca_pyg.config.Config` of these sections; the library's modules take the section they
need (the model its :class:`NetConfig` and :class:`LossConfig`, the trainer its
:class:`OptimConfig`, the batch graph its :class:`GraphConfig`).
"""

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "DataConfig",
    "ModelConfig",
    "GraphConfig",
    "NetConfig",
    "LossConfig",
    "OptimConfig",
    "TrainConfig",
    "EvalConfig",
    "HEAD_INITS",
    "HARDNESS_SCALES",
    "SYNTHETIC_PROXIES",
    "LR_POLICIES",
    "PRECISIONS",
    "MEMORY_FORMATS",
    "DIST_BACKENDS",
]

#: Initialisations of the embedding head's Linear (``model.head_init``): torch's default, or an
#: orthogonal weight and a zero bias (the authors' DINO models).
HEAD_INITS = ("default", "orthogonal")
#: The scales :math:`\bar{J}_m` is read on by the hardness schedule (``loss.hardness_scale``).
HARDNESS_SCALES = ("absolute", "relative")
#: The roles of a synthetic negative in Proxy-Anchor's :math:`J_{syn}` (``loss.synthetic_proxies``,
#: :func:`~gca_pyg.losses.synthetic_proxy_anchor_loss`).
SYNTHETIC_PROXIES = ("anchor", "others", "relative", "proxy_positive", "class")
#: Schedules of the metric learning rates (``optim.lr_policy``), named as in the authors' code.
LR_POLICIES = ("step", "cos", "exp", "none")
#: ``train.precision``, ``train.memory_format`` and ``train.dist_backend``.
PRECISIONS = ("auto", "fp32", "bf16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
DIST_BACKENDS = ("auto", "gloo", "nccl")


@dataclass
class DataConfig:
    dataset: str = "demo"
    root: Optional[str] = None  # the extracted archive (or its parent); --data-root sets it
    classes_per_batch: int = 27
    samples_per_class: int = 3
    image_size: int = 224  # train crop and test centre crop
    resize: int = 256  # test resize before the centre crop
    num_workers: int = 4
    # balanced: each sample about once an epoch | uniform: C classes drawn uniformly for each batch
    class_sampling: str = "balanced"
    # Range of the area of a training crop, as a fraction of the image (RandomResizedCrop's scale)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    pretrained: str = "imagenet"  # imagenet | none | a .pt/.pth file of backbone weights
    frozen_bn: bool = True  # BatchNorm2d running statistics frozen, gamma/beta train (CUB/Cars)
    embedding_size: int = 512
    # auto (ResNet-50 avg+max, GoogLeNet avg, timm models timm's) | avgmax | avg (the CNNs)
    pooling: str = "auto"
    normalize: bool = False  # L2-normalise the embeddings in training too (always for retrieval)
    head_init: str = "default"  # default | orthogonal (weight; zero bias) of the embedding Linear
    # A checkpoint to start from (python -m gca_pyg.train or gca_pyg.convert): every weight is
    # loaded from it; the classifiers start afresh if its number of classes differs
    init: Optional[str] = None


@dataclass
class GraphConfig:
    """The batch graph: complete (``neighbors: null``), or each node joined to its ``neighbors``
    most similar samples and to its classmates (:func:`~gca_pyg.graph.knn_pairs`), for large
    batches; with ``memory: M`` (needs ``neighbors``) the last :math:`M` training embeddings are
    searched too and join the graph as memory nodes (:func:`~gca_pyg.graph.knn_memory_pairs`)
    after ``memory_start`` epochs."""

    neighbors: Optional[int] = None
    memory: int = 0  # embeddings kept from past batches; 0: no memory
    memory_start: int = 0  # epochs before the memory is filled and read
    # neighbours of a batch node searched in the memory apart from its `neighbors` in the batch;
    # null: one search of `neighbors` over batch and memory together
    memory_neighbors: Optional[int] = None


@dataclass
class NetConfig:
    """The correlation net: 2 layers × 4 heads for CUB/Cars, 1 × 2 for SOP/InShop."""

    num_layers: int = 2
    heads: int = 4
    dropout: float = 0.1
    # none (the paper's layer) | key_value | bias | gate: how node attention reads the edges
    edge_attention: str = "none"


@dataclass
class LossConfig:
    """Loss weights (ResNet-50 CUB values as defaults; docs/method.md, "Losses")."""

    alpha: float = 5.0  # hardness h = exp(-alpha / J̄_m)
    # absolute: J̄_m as it is; relative: J̄_m divided by its first epoch's mean
    hardness_scale: str = "absolute"
    beta: float = 20.0  # J_syn weight 1 - exp(-beta / J̄_gen)
    w_sim: float = 20.0
    w_div: float = 60.0
    generator_ce_scale: float = 20.0
    classifier_scale: float = 10.0
    l2_reg: float = 3e-3  # N-pair's embedding-norm penalty
    synthesis: bool = True  # False: J_metric = J_m + J_gce, no generator update (ablation)
    # J_gce's gradient reaches the embeddings through the batch graph (the authors' code); False:
    # it trains the correlation net alone
    node_loss_to_embeddings: bool = True
    # The metric loss of J_m and J_syn: npair | proxy_anchor | pml:<LossName> (any loss of
    # pytorch-metric-learning, e.g. pml:MultiSimilarityLoss; needs the pml extra)
    metric: str = "npair"
    # Keyword arguments of the metric loss's constructor, e.g. {alpha: 2, beta: 50} for
    # pml:MultiSimilarityLoss; for npair and proxy_anchor they override the keys below
    metric_kwargs: dict[str, Any] = field(default_factory=dict)
    proxy_margin: float = 0.1  # Proxy-Anchor's margin delta
    proxy_alpha: float = 32.0  # Proxy-Anchor's scale alpha
    # Proxy-Anchor: the role of a synthetic negative in J_syn: a negative of its anchor's class
    # proxy (anchor), of every proxy but its own class's (others), compared with its anchor by the
    # anchor's proxy (relative), compared with that proxy by the anchor (proxy_positive), or a
    # sample of its class (class); docs/method.md
    synthetic_proxies: str = "relative"


@dataclass
class OptimConfig:
    """Optimisers and schedules (ResNet-50 CUB values as defaults; docs/method.md,
    "Optimisation")."""

    epochs: int = 100
    metric_lr: float = 1.5e-4
    embedding_lr_ratio: float = 1.0  # embedding head lr = metric_lr × this
    proxy_lr_ratio: float = 100.0  # the metric loss's own parameters (proxies): metric_lr × this
    net_lr: float = 1.5e-4
    classifier_lr: float = 1e-3
    weight_decay: float = 1e-4
    classifier_weight_decay: float = 1e-2  # the reference leaves AdamW's default here
    metric_lr_step: int = 10  # StepLR period in epochs of the metric lr
    metric_lr_gamma: float = 0.5
    warmup_epochs: int = 2  # backbone frozen for the first epochs
    grad_clip: Optional[float] = 10.0  # clip gradients by value, backbone and net; null: no clip
    # Metric lr schedule: step (x metric_lr_gamma every metric_lr_step epochs) | cos (cosine of
    # period metric_lr_step epochs) | exp (x 0.9 every epoch) | none (constant)
    lr_policy: str = "step"


@dataclass
class TrainConfig:
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 where native, else fp32) | fp32 | bf16
    memory_format: str = "auto"  # auto (channels_last with bf16) | contiguous | channels_last
    seed: int = 0
    # Deterministic kernels (torch.use_deterministic_algorithms): bit-for-bit repeatable runs and
    # resumes on CUDA too, where sums by atomic adds otherwise vary in their last bits
    deterministic: bool = False
    eval_every: int = 5  # epochs; the last epoch is always evaluated
    # Log how J_syn meets J_m with each step's losses (gradient norms, cosines to class centres;
    # docs/method.md): one more backward pass through the losses a step
    diagnostics: bool = False
    output_dir: str = "runs"
    # Under torchrun: auto (NCCL on CUDA, gloo on the CPU) | gloo | nccl
    dist_backend: str = "auto"
    # Seconds a process waits in a collective for another before failing (a process that died)
    dist_timeout: float = 600.0


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 128
