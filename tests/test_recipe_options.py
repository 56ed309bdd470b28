"""The authors' schedule and model options: optim.lr_policy, optim.grad_clip: null,
model.normalize, model.head_init, model.pooling, data.crop_scale; and the DINO recipes."""

import math

import pytest
import torch
from torchvision.transforms import v2

import gca_pyg.pipeline as pipeline
from gca_pyg.config import load_config
from gca_pyg.errors import ConfigError
from gca_pyg.model import GCAHNG, build_model
from gca_pyg.schema import NetConfig, OptimConfig
from gca_pyg.trainer import AlternatingTrainer

from tiny_model import TinyBackbone, batch

DINO_RECIPES = ["cub_dino", "cars_dino", "sop_dino", "inshop_dino"]

# The schedule tests step the schedules without optimiser steps in between.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")


def make_trainer(normalize=False, **optim):
    torch.manual_seed(0)
    model = GCAHNG(
        TinyBackbone(),
        num_classes=6,
        embedding_size=16,
        net=NetConfig(num_layers=1, heads=2),
        normalize=normalize,
    )
    return AlternatingTrainer(model, OptimConfig(warmup_epochs=0, epochs=40, **optim))


def metric_lrs(trainer, epochs):
    """The metric learning rate of each of `epochs` epochs (the schedule alone: no steps)."""
    rates = []
    for _ in range(epochs):
        rates.append([group["lr"] for group in trainer.metric_optimizer.param_groups])
        trainer.end_epoch()
    return torch.tensor(rates)


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("step", lambda t: 0.5 ** (t // 4)),
        ("cos", lambda t: 0.5 * (1 + math.cos(math.pi * t / 4))),  # period 4 epochs, not 40
        ("exp", lambda t: 0.9**t),  # the reference's factor, whatever metric_lr_gamma says
        ("none", lambda t: 1.0),
    ],
)
def test_lr_policy_schedules_the_metric_learning_rates_as_the_reference(policy, expected):
    trainer = make_trainer(
        lr_policy=policy, metric_lr=1e-3, embedding_lr_ratio=2.0, metric_lr_step=4, net_lr=1e-3
    )
    rates = metric_lrs(trainer, 12)
    factors = torch.tensor([expected(t) for t in range(12)], dtype=rates.dtype)
    torch.testing.assert_close(
        rates, factors[:, None] * torch.tensor([1e-3, 2e-3]), atol=1e-12, rtol=1e-6
    )
    # The net's schedule does not depend on the policy: a cosine over all 40 epochs.
    lr_net = trainer.net_optimizer.param_groups[0]["lr"]
    assert lr_net == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 12 / 40)))


def test_a_resumed_schedule_continues_where_it_stopped():
    trainer = make_trainer(lr_policy="cos", metric_lr_step=5)
    metric_lrs(trainer, 3)
    state = trainer.state_dict()
    resumed = make_trainer(lr_policy="cos", metric_lr_step=5)
    resumed.load_state_dict(state)
    torch.testing.assert_close(metric_lrs(resumed, 6), metric_lrs(trainer, 6))


@pytest.mark.parametrize("grad_clip", [None, 1e-4])
def test_grad_clip_null_leaves_gradients_unclipped(grad_clip, monkeypatch):
    trainer = make_trainer(grad_clip=grad_clip)
    clips, largest = [], []
    clip = torch.nn.utils.clip_grad_value_

    def recorded_clip(parameters, clip_value):
        clips.append(clip_value)
        return clip(parameters, clip_value)

    def recorded_step(*args, **kwargs):
        groups = trainer.net_optimizer.param_groups
        grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        largest.append(max(grad.abs().max().item() for grad in grads))
        return step(*args, **kwargs)

    step = trainer.net_optimizer.step
    monkeypatch.setattr(torch.nn.utils, "clip_grad_value_", recorded_clip)
    monkeypatch.setattr(trainer.net_optimizer, "step", recorded_step)
    images, labels = batch()
    trainer.training_step(images, labels)
    if grad_clip is None:
        assert clips == [] and max(largest) > 1e-4  # the gradients as computed
    else:
        assert clips == [1e-4, 1e-4] and max(largest) <= 1e-4  # metric and generator updates


def test_normalize_gives_unit_embeddings_in_training():
    trainer = make_trainer(normalize=True)
    images, labels = batch()
    embeddings = trainer.model(images)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(len(images)))
    plain = make_trainer(normalize=False)
    plain.model.load_state_dict(trainer.model.state_dict())  # same weights, no extra parameters
    torch.testing.assert_close(
        torch.nn.functional.normalize(plain.model(images), dim=1), embeddings
    )
    logs = trainer.training_step(images, labels)
    assert all(math.isfinite(value) for value in logs.values())


def build(name, *overrides):
    config = load_config(
        name,
        [
            "model.pretrained=none",
            "train.precision=fp32",
            "train.memory_format=contiguous",
            "data.image_size=32",
            "model.embedding_size=16",
            "net.heads=2",
            *overrides,
        ],
    )
    return config, build_model(config, 7, torch.device("cpu"))


def test_head_init_orthogonal_gives_orthonormal_rows_and_zero_bias():
    _, model = build("demo", "model.head_init=orthogonal")
    weight, bias = model.embedding[1].weight, model.embedding[1].bias
    torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)
    assert torch.equal(bias, torch.zeros(16))
    _, default = build("demo")
    assert not torch.allclose(
        default.embedding[1].weight @ default.embedding[1].weight.T, torch.eye(16), atol=0.1
    )


def test_config_options_reach_the_model_and_the_transforms():
    config, model = build("demo", "model.normalize=true", "model.pooling=avg")
    assert isinstance(model.embedding[-1], torch.nn.Module) and len(model.embedding) == 3
    assert isinstance(model.backbone.trunk[-1][0], torch.nn.AdaptiveAvgPool2d)
    cub = load_config("cub", ["data.crop_scale=[0.25, 0.9]"])
    train, _ = pipeline._transforms(cub)
    crop = next(t for t in train.transforms if isinstance(t, v2.RandomResizedCrop))
    assert tuple(crop.scale) == (0.25, 0.9)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr_policy=linear", r"'optim.lr_policy' .* valid values: step, cos, exp, none"),
        ("optim.grad_clip=0", r"'optim.grad_clip' .* positive .* or null"),
        ("model.pooling=max", r"'model.pooling' .* valid values: auto, avgmax, avg"),
        ("model.head_init=xavier", r"'model.head_init' .* valid values: default, orthogonal"),
        ("model.backbone=vit", r"'model.backbone' .* valid values: .*dino_vits16.*timm:<"),
        ("data.crop_scale=[0.5]", r"'data.crop_scale' .* \[min, max\]"),
        ("data.crop_scale=[0.9, 0.5]", r"'data.crop_scale' .* 0 < min <= max <= 1"),
    ],
)
def test_bad_option_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cub", [override])


def test_pooling_of_a_timm_backbone_is_timms():
    with pytest.raises(ConfigError, match=r"'model.pooling' .* timm model"):
        load_config("cub_dino", ["model.pooling=avgmax"])
    assert load_config("cub", ["optim.grad_clip=null"]).optim.grad_clip is None


def test_the_defaults_are_todays_behaviour():
    demo = load_config("demo")
    assert (demo.optim.lr_policy, demo.optim.grad_clip) == ("step", 10.0)
    assert (demo.model.pooling, demo.model.normalize, demo.model.head_init) == (
        "auto",
        False,
        "default",
    )
    assert demo.model.init is None and demo.data.crop_scale == [0.08, 1.0]
    for name in ("cub", "cars", "sop", "inshop"):
        assert load_config(name).model.pooling == "avgmax"
        assert load_config(f"{name}_googlenet").model.pooling == "avg"


@pytest.mark.parametrize("name", DINO_RECIPES)
def test_dino_recipes_are_the_authors_dino_configs(name):
    config = load_config(name)
    assert (config.model.backbone, config.model.embedding_size) == ("dino_vits16", 384)
    assert (config.model.head_init, config.model.pooling) == ("orthogonal", "auto")
    assert not config.model.normalize and not config.model.frozen_bn
    assert (config.optim.lr_policy, config.optim.grad_clip) == ("step", 10.0)
    assert (config.optim.net_lr, config.optim.classifier_lr) == (3e-4, 1e-3)
    assert config.data.image_size == 224 and config.loss.generator_ce_scale == 20
