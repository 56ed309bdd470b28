import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.nn import GELU, LayerNorm, Sequential
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.dense.linear import Linear
from torch_geometric.utils import scatter

from gca_pyg.distributed import all_reduce_max, all_reduce_sum


def _layer_norm(x: Tensor, norm: LayerNorm, affine: bool = True) -> Tensor:
    r"""`norm` applied in the dtype of `x` (its affine map too, unless `affine` is False).

    Autocast on CUDA runs ``layer_norm`` in fp32 and returns fp32 (the CPU's keeps the input's
    dtype): on the :math:`|\mathcal{E}| \times F` edge features that would pull the rest of the
    edge update out of bf16. The kernels keep their statistics in fp32 either way.
    """
    weight = bias = None
    if affine:
        weight, bias = norm.weight.to(x.dtype), norm.bias.to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)


def softmax_with_sink(
    src: Tensor, index: Tensor, num_nodes: int, process_group: Optional[ProcessGroup] = None
) -> Tensor:
    r"""Sparse softmax over the edges entering each node, plus one constant zero logit.

    .. math::
        \alpha_{ji} = \frac{\exp(s_{ji})}{1 + \sum_{j'} \exp(s_{j'i})}

    The extra :math:`\exp(0) = 1` in the denominator is an "attend to nothing" sink: a node whose
    incoming scores are all low receives a small message instead of being forced to average its
    neighbours. Logits of :math:`-\infty` (masked edges) get weight 0; a node without (unmasked)
    incoming edges gets none. Computed stably by subtracting :math:`\max(0, \max_j s_{ji})`.

    Args:
        src (torch.Tensor): Edge logits of shape :math:`(|\mathcal{E}|, \ast)`.
        index (torch.Tensor): Target node of every edge, shape :math:`(|\mathcal{E}|,)`.
        num_nodes (int): Number of target nodes.
        process_group (torch.distributed.ProcessGroup, optional): A process group whose processes
            hold the other edges of the graph: the maximum and the denominator are then taken over
            all of them. (default: :obj:`None`)
    """
    src_max = scatter(src.detach(), index, 0, dim_size=num_nodes, reduce="max").clamp_min(0.0)
    src_max = all_reduce_max(src_max, process_group)
    out = (src - src_max[index]).exp()
    denominator = scatter(out, index, 0, dim_size=num_nodes, reduce="sum")
    denominator = all_reduce_sum(denominator, process_group)
    denominator = denominator + (-src_max).exp()
    return out / denominator[index]


class EdgeNodeConv(MessagePassing):
    r"""The joint node and edge update of GCA-HNG, from the `"Globally Correlation-Aware Hard
    Negative Generation" <https://arxiv.org/abs/2411.13145>`_ paper (IJCV 2025).

    The node update comes first. Node :math:`i` attends, with :math:`H` heads of size
    :math:`d = F/H`, over the sources :math:`j` of its incoming edges that carry attention
    (:obj:`attn_mask`), with a constant zero logit as an "attend to nothing" sink; then it adds the
    sum
    of its outgoing edges and a feed-forward block:

    .. math::
        \alpha_{ji} &= \frac{\exp(\mathbf{q}_i^\top \mathbf{k}_j / \sqrt{d})}
            {1 + \sum_{j' \in \mathcal{N}_{\mathrm{att}}(i)}
            \exp(\mathbf{q}_i^\top \mathbf{k}_{j'} / \sqrt{d})}

        \mathbf{h}_i &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{h}_i + \mathbf{W}_o
            \,\Vert_{h=1}^{H} \textstyle\sum_{j} \alpha^{h}_{ji} \mathbf{v}^{h}_j)\big)

        \mathbf{h}_i &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{h}_i +
            \textstyle\sum_{(i \to j) \in \mathcal{E}} \mathrm{GELU}(\mathbf{W}_{en}
            \mathbf{e}_{ij}))\big)

        \mathbf{h}_i &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{h}_i +
            \mathrm{FFN}(\mathbf{h}_i))\big)

    Then every edge attends over its two end points, using the updated node features
    :math:`\mathbf{u} = \mathrm{GELU}(\mathbf{W}_{ne} \mathbf{h})`:

    .. math::
        (a_i, a_j) &= \mathrm{softmax}\big((\mathbf{W}'_q \mathbf{e}_{ij})^\top
            \mathbf{W}'_k \mathbf{u}_i / \sqrt{F},\;
            (\mathbf{W}'_q \mathbf{e}_{ij})^\top \mathbf{W}'_k \mathbf{u}_j / \sqrt{F}\big)

        \mathbf{e}_{ij} &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(a_i \mathbf{W}'_v \mathbf{u}_i +
            a_j \mathbf{W}'_v \mathbf{u}_j + \mathbf{e}_{ij})\big)

        \mathbf{e}_{ij} &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{e}_{ij} +
            \mathrm{FFN}_e(\mathbf{e}_{ij}))\big)

    with :math:`\mathrm{FFN}_e = \mathrm{Linear} \to \mathrm{GELU} \to \mathrm{LN} \to
    \mathrm{Linear}`. All projections are applied to the :math:`|\mathcal{V}|` nodes and then
    gathered
    to the edges; the edge query is folded into the node keys
    (:math:`(\mathbf{W}'_q \mathbf{e})^\top \mathbf{k} = \mathbf{e}^\top (\mathbf{W}'^\top_q
    \mathbf{k})`), so no per-edge projection is spent on it.

    The update keeps symmetric edge features symmetric: if :math:`\mathbf{e}_{ij} = \mathbf{e}_{ji}`
    for every edge of an undirected graph, it still holds afterwards (with dropout applied to both
    directions alike). :obj:`undirected=True` exploits this exactly: each unordered pair is stored
    and
    updated once and acts as both of its directions, which halves the edge work.

    Args:
        channels (int): Size :math:`F` of node and edge features.
        heads (int, optional): Number of node-attention heads; must divide :obj:`channels`.
            (default: :obj:`4`)
        dropout (float, optional): Dropout probability of the two-way edge attention coefficients.
            (default: :obj:`0.1`)
        ffn_ratio (int, optional): Hidden size of both feed-forward blocks, as a multiple of
            :obj:`channels`. (default: :obj:`4`)
        process_group (torch.distributed.ProcessGroup, optional): Bound once, as
            :class:`torch.nn.SyncBatchNorm` binds its group: a process group whose processes each
            hold a share of the edges of one graph (and the same node features). The attention
            normalisation and the edge-to-node sums are then combined over them, so every process
            gets the node features of the whole graph and its own share of the updated edges.
            :obj:`None` for a graph held whole. (default: :obj:`None`)
        **kwargs (optional): Additional arguments of
            :class:`torch_geometric.nn.conv.MessagePassing`.

    Shapes:
        - **input:**
          node features :math:`(|\mathcal{V}|, F)`,
          edge indices :math:`(2, |\mathcal{E}|)`,
          edge features :math:`(|\mathcal{E}|, F)`,
          attention mask :math:`(|\mathcal{E}|)` *(optional)*
        - **output:** node features :math:`(|\mathcal{V}|, F)`,
          edge features :math:`(|\mathcal{E}|, F)`
    """

    def __init__(
        self,
        channels: int,
        heads: int = 4,
        dropout: float = 0.1,
        ffn_ratio: int = 4,
        *,
        process_group: Optional[ProcessGroup] = None,
        **kwargs,
    ):
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        if channels % heads != 0:
            raise ValueError(
                f"EdgeNodeConv: channels ({channels}) must be divisible by heads ({heads})"
            )
        self.in_channels = channels
        self.out_channels = channels
        self.heads = heads
        self.dropout = dropout
        self.ffn_ratio = ffn_ratio
        self.process_group = process_group
        hidden = ffn_ratio * channels

        def attention_linear() -> Linear:
            return Linear(channels, channels, weight_initializer="glorot", bias_initializer="zeros")

        # Node update.
        self.lin_query = attention_linear()
        self.lin_key = attention_linear()
        self.lin_value = attention_linear()
        self.lin_out = attention_linear()
        self.lin_edge_to_node = Linear(channels, channels)
        self.node_ffn = Sequential(Linear(channels, hidden), GELU(), Linear(hidden, channels))
        self.norm_attention = LayerNorm(channels)
        self.norm_edge_to_node = LayerNorm(channels)
        self.norm_node_ffn = LayerNorm(channels)

        # Edge update.
        self.lin_node_to_edge = Linear(channels, channels)
        self.lin_edge_query = attention_linear()
        self.lin_edge_key = attention_linear()
        self.lin_edge_value = attention_linear()
        self.edge_ffn = Sequential(
            Linear(channels, hidden), GELU(), LayerNorm(hidden), Linear(hidden, channels)
        )
        self.norm_edge_attention = LayerNorm(channels)
        self.norm_edge_ffn = LayerNorm(channels)

        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
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
    ) -> tuple[Tensor, Tensor]:
        r"""Runs one joint node and edge update.

        Args:
            x (torch.Tensor): Node features :math:`(|\mathcal{V}|, F)`.
            edge_index (torch.Tensor): Edge indices :math:`(2, |\mathcal{E}|)`; row 0 sources,
                row 1 targets (reversed for ``flow="target_to_source"``).
            edge_attr (torch.Tensor): Edge features :math:`(|\mathcal{E}|, F)`.
            attn_mask (torch.Tensor, optional): Bool :math:`(|\mathcal{E}|)`, True for the edges
                that carry attention messages (in GCA-HNG: the negatives). :obj:`None` means all.
            undirected (bool, optional): Each column :math:`(i, j)` of :obj:`edge_index` with
                :math:`i \ne j` stands for both :math:`i \to j` and :math:`j \to i`, sharing one
                feature row (which must then be symmetric); a self-loop stands once. Exactly equal
                to
                running on the directed graph with both directions stored. (default: :obj:`False`)

        Returns:
            The updated node features and edge features.
        """
        h = self.update_nodes(x, edge_index, edge_attr, attn_mask, undirected=undirected)
        return h, self.update_edges(h, edge_index, edge_attr)

    def update_nodes(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor,
        attn_mask: Optional[Tensor] = None,
        *,
        undirected: bool = False,
    ) -> Tensor:
        """The node half of :meth:`forward` (same arguments); returns the new node features."""
        num_nodes = x.size(0)
        source, target = self._source_target(edge_index)

        head_size = self.out_channels // self.heads
        query = self.lin_query(x).view(num_nodes, self.heads, head_size)
        key = self.lin_key(x).view(num_nodes, self.heads, head_size)
        value = self.lin_value(x).view(num_nodes, self.heads, head_size)
        off_diagonal = source != target
        process_group = self.process_group
        if process_group is None and undirected and self._is_complete(source, target, num_nodes):
            # The complete graph: attention as small dense matmuls instead of N^2 gathers.
            message = self._dense_attention(query, key, value, source, target, attn_mask)
        else:
            directed_index, directed_mask = edge_index, attn_mask
            if undirected:  # expand the cheap O(|E| F) attention to both directions
                directed_index = torch.cat([edge_index, edge_index[:, off_diagonal].flip(0)], 1)
                if attn_mask is not None:
                    directed_mask = torch.cat([attn_mask, attn_mask[off_diagonal]])
            message = self.propagate(
                directed_index,
                query=query,
                key=key,
                value=value,
                attn_mask=directed_mask,
                size=(num_nodes, num_nodes),
            )
            message = all_reduce_sum(message, process_group)
        h = self.norm_attention(F.gelu(x + self.lin_out(message.reshape(num_nodes, -1))))

        edge_to_node = F.gelu(self.lin_edge_to_node(edge_attr))
        outgoing = scatter(edge_to_node, source, 0, dim_size=num_nodes, reduce="sum")
        if undirected:  # both end points, then the self-loops (which stand once) taken back
            loops = (~off_diagonal).nonzero().view(-1)
            outgoing = outgoing + scatter(edge_to_node, target, 0, dim_size=num_nodes, reduce="sum")
            outgoing = outgoing.index_add(0, source[loops], edge_to_node[loops], alpha=-1)
        outgoing = all_reduce_sum(outgoing, process_group)
        h = self.norm_edge_to_node(F.gelu(h + outgoing))
        return self.norm_node_ffn(F.gelu(h + self.node_ffn(h)))

    @staticmethod
    def _is_complete(source: Tensor, target: Tensor, num_nodes: int) -> bool:
        """Whether undirected storage holds every pair {i, j}, self-loops included, exactly once."""
        if source.numel() != num_nodes * (num_nodes + 1) // 2:
            return False
        covered = torch.zeros(num_nodes, num_nodes, dtype=torch.bool, device=source.device)
        covered[source, target] = True
        covered[target, source] = True
        return bool(covered.all())

    def _dense_attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        source: Tensor,
        target: Tensor,
        attn_mask: Optional[Tensor],
    ) -> Tensor:
        """Attention with the sink on a complete undirected graph, as dense [H, N, N] scores."""
        num_nodes = query.size(0)
        allowed = torch.ones(num_nodes, num_nodes, dtype=torch.bool, device=query.device)
        if attn_mask is not None:  # allowed[i, j]: node i may attend to node j
            allowed[target, source] = attn_mask
            allowed[source, target] = attn_mask
        score = torch.einsum("ihd,jhd->hij", query, key) / math.sqrt(query.size(-1))
        score = score.masked_fill(~allowed, float("-inf"))
        score_max = score.detach().amax(dim=-1, keepdim=True).clamp_min(0.0)
        weight = (score - score_max).exp()
        alpha = weight / (weight.sum(dim=-1, keepdim=True) + (-score_max).exp())
        return torch.einsum("hij,jhd->ihd", alpha, value)

    def update_edges(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        r"""The edge half of :meth:`forward`, from the node features :meth:`update_nodes` returned.

        It treats both end points alike, so directed and undirected storage need no distinction.
        Under autocast, the edge features are cast to the autocast dtype once here and the whole
        edge
        update, and its result, stays in it: the :math:`|\mathcal{E}| \times F` activations are the
        bulk of the work, and an fp32 residual would otherwise pull every later edge op back to
        fp32 and cast at every matmul.
        """
        num_nodes = h.size(0)
        if torch.is_autocast_enabled(h.device.type):
            edge_attr = edge_attr.to(torch.get_autocast_dtype(h.device.type))
        u = F.gelu(self.lin_node_to_edge(h))
        edge_key = self.lin_edge_key(u)
        # Fold the edge query projection into the N node keys instead of the |E| edges.
        key_in_edge_space = edge_key @ self.lin_edge_query.weight
        key_bias_score = edge_key @ self.lin_edge_query.bias
        return self.edge_updater(
            edge_index,
            edge_attr=edge_attr,
            key=key_in_edge_space,
            key_bias=key_bias_score,
            value=self.lin_edge_value(u),
            size=(num_nodes, num_nodes),
        )

    def _source_target(self, edge_index: Tensor) -> tuple[Tensor, Tensor]:
        if self.flow == "source_to_target":
            return edge_index[0], edge_index[1]
        return edge_index[1], edge_index[0]

    def message(
        self,
        query_i: Tensor,
        key_j: Tensor,
        value_j: Tensor,
        attn_mask: Optional[Tensor],
        index: Tensor,
        size_i: int,
    ) -> Tensor:
        score = (query_i * key_j).sum(dim=-1) / math.sqrt(query_i.size(-1))
        if attn_mask is not None:
            score = score.masked_fill(~attn_mask.view(-1, 1), float("-inf"))
        alpha = softmax_with_sink(score, index, size_i, self.process_group)
        return alpha.unsqueeze(-1) * value_j

    def edge_update(
        self,
        edge_attr: Tensor,
        key_i: Tensor,
        key_j: Tensor,
        key_bias_i: Tensor,
        key_bias_j: Tensor,
        value_i: Tensor,
        value_j: Tensor,
    ) -> Tensor:
        # A softmax over two logits is the sigmoid of their difference: one dot product per edge.
        score_difference = torch.linalg.vecdot(edge_attr, key_i - key_j) + (key_bias_i - key_bias_j)
        attention_i = torch.sigmoid(score_difference / math.sqrt(self.out_channels)).unsqueeze(-1)
        attention = torch.cat([attention_i, 1.0 - attention_i], dim=-1)
        attention = F.dropout(attention, p=self.dropout, training=self.training)
        residual = torch.addcmul(edge_attr, attention[:, :1], value_i)
        residual = torch.addcmul(residual, attention[:, 1:], value_j)
        edge_attr = _layer_norm(F.gelu(residual), self.norm_edge_attention)
        return _layer_norm(F.gelu(edge_attr + self._edge_ffn(edge_attr)), self.norm_edge_ffn)

    def _edge_ffn(self, edge_attr: Tensor) -> Tensor:
        r""":obj:`self.edge_ffn` with the affine map of its :class:`~torch.nn.LayerNorm` folded into
        the last linear layer, :math:`\mathbf{W}(\boldsymbol{\gamma} \odot \mathbf{n} +
        \boldsymbol{\beta}) + \mathbf{b} = (\mathbf{W} \operatorname{diag}
        \boldsymbol{\gamma})\,\mathbf{n} + (\mathbf{W}\boldsymbol{\beta} + \mathbf{b})`: the
        same function, but the :math:`|\mathcal{E}| \times` :obj:`ffn_ratio` :math:`\cdot F` hidden
        units are neither scaled and shifted nor reduced for the gradients of
        :math:`\boldsymbol{\gamma}, \boldsymbol{\beta}`; only :math:`F \times` :obj:`ffn_ratio`
        :math:`\cdot F` weights are.
        """
        lin_hidden, activation, norm, lin_out = self.edge_ffn
        hidden = _layer_norm(activation(lin_hidden(edge_attr)), norm, affine=False)
        return F.linear(
            hidden,
            lin_out.weight * norm.weight,
            torch.addmv(lin_out.bias, lin_out.weight, norm.bias),
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, heads={self.heads}, "
            f"dropout={self.dropout}, ffn_ratio={self.ffn_ratio})"
        )
