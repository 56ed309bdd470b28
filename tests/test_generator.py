"""HardNegativeGenerator: its schedule state, which a checkpoint must carry exactly."""

import copy
import math

import pytest
import torch

from gca_pyg.generator import INITIAL_MEAN_LOSS, HardNegativeGenerator


def make(**kwargs):
    torch.manual_seed(0)
    return HardNegativeGenerator(8, 5, num_layers=1, heads=2, **kwargs)


def test_the_schedules_start_easy_and_follow_the_running_means():
    generator = make(alpha=2.0, beta=3.0)
    assert generator.hardness == pytest.approx(math.exp(-2.0 / INITIAL_MEAN_LOSS))
    assert generator.synthetic_weight == pytest.approx(1 - math.exp(-3.0 / INITIAL_MEAN_LOSS))
    for metric_loss, generator_loss in [(0.5, 4.0), (1.5, 2.0), (0.0, 3.0)]:
        generator.record(metric_loss=metric_loss, generator_loss=generator_loss)
    generator.end_epoch()
    assert generator.mean_metric_loss == pytest.approx((0.5 + 1.5 + 1e-6) / 3)  # floored steps
    assert generator.hardness == pytest.approx(math.exp(-2.0 / ((2.0 + 1e-6) / 3)))
    assert generator.synthetic_weight == pytest.approx(1 - math.exp(-3.0 / 3.0))
    generator.record(metric_loss=0.25)  # an epoch without generator steps keeps its J̄_gen
    generator.end_epoch()
    assert generator.mean_metric_loss == 0.25 and generator.mean_generator_loss == 3.0
    generator.end_epoch(mean_metric_loss=0.125)  # a mean given from outside (the PML front-end)
    assert generator.mean_metric_loss == 0.125 and generator.mean_generator_loss == 3.0


def test_the_schedule_state_travels_with_the_state_dict_mid_epoch():
    generator = make()
    generator.record(metric_loss=0.7, generator_loss=30.0)
    generator.end_epoch()
    generator.record(metric_loss=0.3, generator_loss=20.0)  # one step into the next epoch
    state = copy.deepcopy(generator.state_dict())
    assert "_extra_state" in state
    restored = make()
    restored.load_state_dict(state)
    assert (restored.hardness, restored.synthetic_weight) == (
        generator.hardness,
        generator.synthetic_weight,
    )
    for module in (generator, restored):
        module.record(metric_loss=0.1, generator_loss=10.0)
        module.end_epoch()
    assert restored.mean_metric_loss == generator.mean_metric_loss == pytest.approx(0.2)
    assert restored.mean_generator_loss == generator.mean_generator_loss == pytest.approx(15.0)


def test_a_state_dict_without_the_schedule_is_refused():
    state = make().state_dict()
    del state["_extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        make().load_state_dict(state)


def test_the_schedule_keeps_double_precision_whatever_the_module_dtype():
    generator = make()
    generator.record(metric_loss=1 / 3)
    generator.end_epoch()
    generator.to(torch.bfloat16)  # parameters in bf16; the running means are not tensors
    assert generator.mean_metric_loss == 1 / 3


def test_the_relative_hardness_reads_the_metric_loss_against_its_first_epoch():
    absolute, relative = make(alpha=1.5), make(alpha=1.5, hardness_scale="relative")
    assert relative.hardness == absolute.hardness  # ~1 until an epoch has ended
    for mean in (12.0, 6.0, 3.0):
        for generator in (absolute, relative):
            generator.record(metric_loss=mean)
            generator.end_epoch()
        assert relative.first_mean_metric_loss == 12.0
        assert absolute.hardness == pytest.approx(math.exp(-1.5 / mean))
        assert relative.hardness == pytest.approx(math.exp(-1.5 * 12.0 / mean))
    # The same fall on another scale gives the same schedule.
    scaled = make(alpha=1.5, hardness_scale="relative")
    for mean in (1.2, 0.6, 0.3):
        scaled.record(metric_loss=mean)
        scaled.end_epoch()
    assert scaled.hardness == pytest.approx(relative.hardness)
    restored = make(alpha=1.5, hardness_scale="relative")
    restored.load_state_dict(copy.deepcopy(relative.state_dict()))
    assert restored.hardness == relative.hardness
    with pytest.raises(ValueError, match="hardness_scale"):
        make(hardness_scale="log")


def test_a_schedule_state_from_before_the_relative_hardness_loads():
    generator = make(hardness_scale="relative")
    state = generator.state_dict()
    extra = dict(state["_extra_state"])
    del extra["first_mean_metric_loss"]
    extra["mean_metric_loss"] = 4.0
    state["_extra_state"] = extra
    generator.load_state_dict(state)
    assert generator.first_mean_metric_loss is None
    generator.end_epoch()  # the first mean known from now on is the reference
    assert generator.first_mean_metric_loss == 4.0
