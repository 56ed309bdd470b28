from typing import Optional

import torch
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.nn import BatchNorm1d, ModuleList
from torch_geometric.nn.dense.linear import Linear

from gca_pyg.nn.edge_node_conv import EdgeNodeConv
from gca_pyg.nn.norm import WeightedBatchNorm1d
from gca_pyg.schema import NetConfig  # the paper's net: its defaults are the net section's


class CorrelationNet(torch.nn.Module):
    r"""The correlation network of GCA-HNG, from the `"Globally Correlation-Aware Hard Negative
    Generation" <https://arxiv.org/abs/2411.13145>`_ paper (IJCV 2025).

    An input projection of the nodes, :obj:`num_layers` :class:`EdgeNodeConv` layers, and two heads
    on the final graph (docs/method.md, "Heads"): per-channel fusion weights for every edge and
    class logits for
    every node,

    .. math::
        \boldsymbol{\lambda}_{ij} = \sigma\big(\mathbf{W}_\lambda\,\mathrm{BN}(\mathbf{e}_{ij})\big)
        \in (0, 1)^F, \qquad
        \mathrm{logits}_i = \mathbf{W}_{cls}\,\mathrm{BN}(\mathbf{h}_i).

    Args:
        channels (int): Size :math:`F` of node and edge features (the embedding size).
        num_classes (int): Number of training classes of the node classifier.
        num_layers (int, optional): Number of :class:`EdgeNodeConv` layers. (default: :obj:`2`)
        heads (int, optional): Node-attention heads per layer. (default: :obj:`4`)
        dropout (float, optional): Dropout of the two-way edge attention. (default: :obj:`0.1`)
        ffn_ratio (int, optional): Hidden size of the feed-forward blocks, as a multiple of
            :obj:`channels`. (default: :obj:`4`)
        edge_attention (str, optional): How the layers' node attention reads the edges
            (:class:`EdgeNodeConv`); ``"none"`` is the paper's layer. (default: :obj:`"none"`)
        process_group (torch.distributed.ProcessGroup, optional): A process group whose processes
            each hold a share of the edges of one graph and the same nodes (see
            :class:`EdgeNodeConv`); the edge batch norm then takes its statistics over all of
            them. Bound once, here. (default: :obj:`None`)

    Shapes:
        - **input:**
          node features :math:`(|\mathcal{V}|, F)`,
          edge indices :math:`(2, |\mathcal{E}|)`,
          edge features :math:`(|\mathcal{E}|, F)`,
          attention mask :math:`(|\mathcal{E}|)` *(optional)*
        - **output:** node logits :math:`(|\mathcal{V}|, C)`,
          fusion weights :math:`(|\mathcal{E}|, F)`
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        num_layers: int = NetConfig.num_layers,
        heads: int = NetConfig.heads,
        dropout: float = NetConfig.dropout,
        ffn_ratio: int = 4,
        edge_attention: str = NetConfig.edge_attention,
        *,
        process_group: Optional[ProcessGroup] = None,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(
                f"CorrelationNet needs at least one layer, got num_layers={num_layers}"
            )
        self.channels = channels
        self.num_classes = num_classes
        self.num_layers = num_layers
        self.lin_in = Linear(channels, channels)
        self.convs = ModuleList(
            EdgeNodeConv(
                channels,
                channels,
                edge_dim=channels,
                heads=heads,
                dropout=dropout,
                ffn_ratio=ffn_ratio,
                edge_attention=edge_attention,
                process_group=process_group,
            )
            for _ in range(num_layers)
        )
        self.edge_norm = WeightedBatchNorm1d(channels, process_group=process_group)
        self.lin_fusion = Linear(channels, channels)
        self.node_norm = BatchNorm1d(channels)
        self.lin_classifier = Linear(channels, num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor,
        attn_mask: Optional[Tensor] = None,
        *,
        undirected: bool = False,
        detach_fusion: bool = False,
    ) -> tuple[Tensor, Tensor]:
        r"""Computes node logits and per-channel fusion weights.

        Args:
            x (torch.Tensor): Node features :math:`(|\mathcal{V}|, F)`.
            edge_index (torch.Tensor): Edge indices :math:`(2, |\mathcal{E}|)`.
            edge_attr (torch.Tensor): Edge features :math:`(|\mathcal{E}|, F)`.
            attn_mask (torch.Tensor, optional): Bool :math:`(|\mathcal{E}|)`, True for the edges
                that
                carry node-attention messages (the negatives). :obj:`None` means all.
            undirected (bool, optional): Undirected edge storage, as in :class:`EdgeNodeConv`; the
                edge batch norm then counts every off-diagonal pair twice, so the result equals the
                directed graph's exactly. (default: :obj:`False`)
            detach_fusion (bool, optional): Compute the fusion weights without autograd, for callers
                that only need gradients through the node logits: the last edge update then stores
                no activations. (default: :obj:`False`)

        Returns:
            ``(node_logits, fusion_weights)``; the fusion weights are in :math:`(0, 1)` and, with
            :obj:`undirected`, given per stored pair.
        """
        h = self.lin_in(x)
        if torch.is_autocast_enabled(x.device.type):  # one cast serves every layer's edge work
            edge_attr = edge_attr.to(torch.get_autocast_dtype(x.device.type))
        for conv in self.convs[:-1]:
            h, edge_attr = conv(h, edge_index, edge_attr, attn_mask, undirected=undirected)
        last = self.convs[-1]
        h = last.update_nodes(h, edge_index, edge_attr, attn_mask, undirected=undirected)
        node_logits = self.lin_classifier(self.node_norm(h))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_fusion):
            edge_attr = last.update_edges(h, edge_index, edge_attr)
            row_weight = None
            if undirected:
                row_weight = 2.0 - (edge_index[0] == edge_index[1]).to(edge_attr.dtype)
            fusion_weights = torch.sigmoid(self.lin_fusion(self.edge_norm(edge_attr, row_weight)))
        return node_logits, fusion_weights

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.channels}, num_classes={self.num_classes}, "
            f"num_layers={self.num_layers})"
        )
