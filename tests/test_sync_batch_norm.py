"""SyncBatchNorm under several CUDA processes: the trainer converts the backbone, so a library user
who builds an AlternatingTrainer under torchrun gets it as the training command does."""

import pytest
import torch

import gca_pyg.trainer
from gca_pyg.backbones import build_backbone
from gca_pyg.model import GCAHNG
from gca_pyg.schema import OptimConfig
from gca_pyg.trainer import AlternatingTrainer, sync_batch_norm

CUDA = torch.device("cuda")


def model(frozen_bn=False):
    backbone = build_backbone("small_cnn", pretrained="none", frozen_bn=frozen_bn)
    return GCAHNG(backbone, num_classes=4, embedding_size=16)


def norms(module):
    return [type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__]


def test_the_trainer_converts_the_backbone_of_several_cuda_processes(monkeypatch):
    # A model bound to a process group of 2 on CUDA, as far as the trainer can tell (the group's
    # size and the model's device), without the processes or the GPU.
    group = object()
    monkeypatch.setattr(gca_pyg.trainer, "rank_and_size", lambda g: (0, 2 if g is group else 1))
    monkeypatch.setattr(gca_pyg.trainer, "broadcast_parameters", lambda model, g: None)
    monkeypatch.setattr(GCAHNG, "device", property(lambda self: CUDA))
    gcahng = model()
    gcahng.process_group = group
    weights = [p for p in gcahng.backbone.parameters()]
    AlternatingTrainer(gcahng, OptimConfig())
    assert set(norms(gcahng.backbone)) == {"SyncBatchNorm"}
    # The same parameters, so the optimisers built after the conversion train the model in use.
    assert [p for p in gcahng.backbone.parameters()] == weights
    # The embedding head's BatchNorm1d normalises the gathered batch already: left alone.
    assert norms(gcahng.embedding) == ["BatchNorm1d"]


@pytest.mark.parametrize(
    "world_size, device, frozen_bn",
    [
        (1, CUDA, False),  # one process
        (2, torch.device("cpu"), False),  # no SyncBatchNorm on the CPU
        (2, CUDA, True),  # frozen statistics stay frozen BatchNorm2d
    ],
)
def test_nothing_is_converted_where_it_does_not_apply(world_size, device, frozen_bn):
    gcahng = model(frozen_bn)
    assert not sync_batch_norm(gcahng, world_size, device)
    assert set(norms(gcahng.backbone)) == {"BatchNorm2d"}
