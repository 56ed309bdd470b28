"""Reusable graph layers of GCA-HNG."""

from gca_pyg.nn.correlation_net import CorrelationNet
from gca_pyg.nn.edge_node_conv import (
    EDGE_ATTENTION,
    EdgeNodeConv,
    softmax_with_sink,
)
from gca_pyg.nn.models import EdgeNodeGNN
from gca_pyg.nn.norm import L2Normalize, WeightedBatchNorm1d
from gca_pyg.utils import correlation_edge_features

__all__ = [
    "EdgeNodeConv",
    "EDGE_ATTENTION",
    "EdgeNodeGNN",
    "CorrelationNet",
    "WeightedBatchNorm1d",
    "L2Normalize",
    "softmax_with_sink",
    "correlation_edge_features",
]
