"""SyncBatchNorm under several CUDA processes: the trainer converts the backbone, so a library user
who builds an AlternatingTrainer under torchrun gets it as the training command does."""

import pytest
import torch

from gca_pyg.backbones import build_backbone
from gca_pyg.distributed import Context
from gca_pyg.model import GCAHNG
from gca_pyg.trainer import AlternatingTrainer, OptimConfig, sync_batch_norm

CUDA_PAIR = Context(rank=0, world_size=2, device=torch.device("cuda"))


def model(frozen_bn=False):
    backbone = build_backbone("small_cnn", pretrained="none", frozen_bn=frozen_bn)
    return GCAHNG(backbone, num_classes=4, embedding_size=16)


def norms(module):
    return [type(m).__name__ for m in module.modules() if "BatchNorm" in type(m).__name__]


def test_the_trainer_converts_the_backbone_of_several_cuda_processes():
    gcahng = model()
    weights = [p for p in gcahng.backbone.parameters()]
    AlternatingTrainer(gcahng, OptimConfig(), context=CUDA_PAIR)  # no group: collectives idle
    assert set(norms(gcahng.backbone)) == {"SyncBatchNorm"}
    # The same parameters, so the optimisers built after the conversion train the model in use.
    assert [p for p in gcahng.backbone.parameters()] == weights
    # The embedding head's BatchNorm1d normalises the gathered batch already: left alone.
    assert norms(gcahng.embedding) == ["BatchNorm1d"]


@pytest.mark.parametrize(
    "context, frozen_bn",
    [
        (Context(rank=0, world_size=1, device=torch.device("cuda")), False),  # one process
        (Context(rank=0, world_size=2, device=torch.device("cpu")), False),  # no SyncBN on CPU
        (CUDA_PAIR, True),  # frozen statistics stay frozen BatchNorm2d
    ],
)
def test_nothing_is_converted_where_it_does_not_apply(context, frozen_bn):
    gcahng = model(frozen_bn)
    assert not sync_batch_norm(gcahng, context)
    assert set(norms(gcahng.backbone)) == {"BatchNorm2d"}
