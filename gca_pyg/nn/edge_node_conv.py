import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.nn import GELU, LayerNorm, Sequential
from torch_geometric.nn import MessagePassing
from torch_geometric.nn.dense.linear import Linear, is_uninitialized_parameter
from torch_geometric.utils import is_torch_sparse_tensor, scatter, to_edge_index

from gca_pyg.distributed import all_reduce_max, all_reduce_sum
from gca_pyg.utils import correlation_edge_features

EDGE_ATTENTION = ("none", "key_value", "bias", "gate")


def _check_width(name: str, width: int, lazy: bool):
    if not isinstance(width, int) or not (width > 0 or (lazy and width == -1)):
        allowed = "a positive int, or -1 for lazy initialization" if lazy else "a positive int"
        raise ValueError(f"EdgeNodeConv: {name} must be {allowed}, got {width!r}")


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

    Node features of width :math:`F_{in}` and edge features of width :math:`F_e` are both updated
    to width :math:`F_{out}`, so layers stack on :obj:`(x, edge_attr)` alike. The node update comes
    first. Node :math:`i` attends, with :math:`H` heads of size :math:`d = F_{out}/H`, over the
    sources :math:`j` of its incoming edges that carry attention (:obj:`attn_mask`), with a
    constant zero logit as an "attend to nothing" sink; then it adds the sum of its outgoing edges
    and a feed-forward block:

    .. math::
        \alpha_{ji} &= \frac{\exp(\mathbf{q}_i^\top \mathbf{k}_j / \sqrt{d})}
            {1 + \sum_{j' \in \mathcal{N}_{\mathrm{att}}(i)}
            \exp(\mathbf{q}_i^\top \mathbf{k}_{j'} / \sqrt{d})}

        \mathbf{h}_i &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{W}_s \mathbf{x}_i +
            \mathbf{W}_o \,\Vert_{h=1}^{H} \textstyle\sum_{j} \alpha^{h}_{ji} \mathbf{v}^{h}_j)\big)

        \mathbf{h}_i &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{h}_i +
            \textstyle\sum_{(i \to j) \in \mathcal{E}} \mathrm{GELU}(\mathbf{W}_{en}
            \mathbf{e}_{ij}))\big)

        \mathbf{h}_i &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{h}_i +
            \mathrm{FFN}(\mathbf{h}_i))\big)

    with :math:`\mathbf{q}, \mathbf{k}, \mathbf{v} = \mathbf{W}_q \mathbf{x}, \mathbf{W}_k
    \mathbf{x}, \mathbf{W}_v \mathbf{x}`. Then every edge attends over its two end points, using
    the updated node features :math:`\mathbf{u} = \mathrm{GELU}(\mathbf{W}_{ne} \mathbf{h})`:

    .. math::
        (a_i, a_j) &= \mathrm{softmax}\big((\mathbf{W}'_q \mathbf{e}_{ij})^\top
            \mathbf{W}'_k \mathbf{u}_i / \sqrt{F_{out}},\;
            (\mathbf{W}'_q \mathbf{e}_{ij})^\top \mathbf{W}'_k \mathbf{u}_j / \sqrt{F_{out}}\big)

        \mathbf{e}_{ij} &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(a_i \mathbf{W}'_v \mathbf{u}_i +
            a_j \mathbf{W}'_v \mathbf{u}_j + \mathbf{W}'_s \mathbf{e}_{ij})\big)

        \mathbf{e}_{ij} &\leftarrow \mathrm{LN}\big(\mathrm{GELU}(\mathbf{e}_{ij} +
            \mathrm{FFN}_e(\mathbf{e}_{ij}))\big)

    with :math:`\mathrm{FFN}_e = \mathrm{Linear} \to \mathrm{GELU} \to \mathrm{LN} \to
    \mathrm{Linear}`. The residual projections :math:`\mathbf{W}_s` (:obj:`lin_skip`) and
    :math:`\mathbf{W}'_s` (:obj:`lin_edge_skip`, both without bias) exist only where the widths
    differ (:math:`F_{in} \ne F_{out}`, :math:`F_e \ne F_{out}`, or a lazy :obj:`-1` width);
    otherwise they are the identity and the layer holds no parameters for them. All projections
    are applied to the :math:`|\mathcal{V}|` nodes and then gathered to the edges; the edge query
    is folded into the node keys (:math:`(\mathbf{W}'_q \mathbf{e})^\top \mathbf{k} =
    \mathbf{e}^\top (\mathbf{W}'^\top_q \mathbf{k})`), so no per-edge projection is spent on it.

    In the paper's layer (:obj:`edge_attention="none"`) the node attention reads node features
    only; the edges reach a node only as the sum of its outgoing edges, so a node cannot weigh its
    neighbours by the edges that join them. :obj:`edge_attention` lets it, for the edge
    :math:`j \to i` with features :math:`\mathbf{e}_{ji}`:

    - ``"key_value"``, as :class:`~torch_geometric.nn.conv.TransformerConv` with an
      :obj:`edge_dim`: :math:`\mathbf{W}_e \mathbf{e}_{ji}` (no bias) is added to the key and to the
      value of :math:`j`, :math:`\mathbf{k}_j + \mathbf{W}_e \mathbf{e}_{ji}` and
      :math:`\mathbf{v}_j + \mathbf{W}_e \mathbf{e}_{ji}`;
    - ``"bias"``: one logit per head is added to the score, :math:`\mathbf{q}_i^\top
      \mathbf{k}_j / \sqrt{d} + \mathbf{w}_h^\top \mathbf{e}_{ji} + b_h`;
    - ``"gate"``, after the multiplied attention of the authors' code (``mult_attr``): the weight
      is gated after the softmax, :math:`\alpha_{ji} \, \sigma(\mathbf{w}_h^\top \mathbf{e}_{ji}
      + b_h)`, so an edge can silence a neighbour but not single it out.

    With :obj:`edge_dim=None` the layer builds its edge features from the nodes, as GCA-HNG does:
    :math:`\mathbf{e}_{ij} = \hat{\mathbf{x}}_i \odot \hat{\mathbf{x}}_j` with
    :math:`\hat{\mathbf{x}}` each node's features centred by their own mean and scaled to unit
    norm, so that the channels of :math:`\mathbf{e}_{ij}` sum to the Pearson correlation of the
    two end points (:func:`correlation_edge_features`; :math:`F_e = F_{in}`).

    The update keeps symmetric edge features symmetric: if :math:`\mathbf{e}_{ij} = \mathbf{e}_{ji}`
    for every edge of an undirected graph, it still holds afterwards (with dropout applied to both
    directions alike). The :obj:`undirected=True` storage mode of :meth:`forward` exploits this
    exactly: each unordered pair is stored and updated once and acts as both of its directions,
    which halves the edge work.

    Args:
        in_channels (int): Size :math:`F_{in}` of the input node features, or :obj:`-1` to take it
            from the first input (lazy initialization).
        out_channels (int): Size :math:`F_{out}` of the output node *and* edge features.
        edge_dim (int, optional): Size :math:`F_e` of the input edge features (:obj:`-1`: lazy).
            :obj:`None` builds them from the nodes (see above) and takes no :obj:`edge_attr`.
            (default: :obj:`None`)
        heads (int, optional): Number of node-attention heads; must divide :obj:`out_channels`.
            (default: :obj:`4`)
        dropout (float, optional): Dropout probability of the two-way edge attention coefficients.
            (default: :obj:`0.1`)
        ffn_ratio (int, optional): Hidden size of both feed-forward blocks, as a multiple of
            :obj:`out_channels`. (default: :obj:`4`)
        edge_attention (str, optional): How the node attention reads the edges: ``"none"`` (the
            paper's layer, no extra parameters), ``"key_value"`` (:math:`F_e \cdot F_{out}` more
            parameters), ``"bias"`` or ``"gate"`` (:math:`(F_e + 1) H` more); see above.
            (default: :obj:`"none"`)
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
          node features :math:`(|\mathcal{V}|, F_{in})`,
          edge indices :math:`(2, |\mathcal{E}|)` or a sparse adjacency
          :math:`(|\mathcal{V}|, |\mathcal{V}|)`,
          edge features :math:`(|\mathcal{E}|, F_e)` *(only with an edge_dim)*,
          attention mask :math:`(|\mathcal{E}|)` *(optional)*
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})`,
          edge features :math:`(|\mathcal{E}|, F_{out})`, and with
          :obj:`return_attention_weights=True` also :math:`((2, |\mathcal{E}'|),
          (|\mathcal{E}'|, H))`
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        edge_dim: Optional[int] = None,
        heads: int = 4,
        dropout: float = 0.1,
        ffn_ratio: int = 4,
        edge_attention: Optional[str] = "none",
        *,
        process_group: Optional[ProcessGroup] = None,
        **kwargs,
    ):
        kwargs.setdefault("aggr", "add")
        super().__init__(node_dim=0, **kwargs)
        _check_width("in_channels", in_channels, lazy=True)
        _check_width("out_channels", out_channels, lazy=False)
        if edge_dim is not None:
            _check_width("edge_dim", edge_dim, lazy=True)
        if heads < 1 or out_channels % heads != 0:
            raise ValueError(
                f"EdgeNodeConv: out_channels ({out_channels}) must be divisible by heads ({heads})"
            )
        edge_attention = "none" if edge_attention is None else edge_attention
        if edge_attention not in EDGE_ATTENTION:
            raise ValueError(
                f"EdgeNodeConv: edge_attention must be one of {', '.join(EDGE_ATTENTION)}, got "
                f"{edge_attention!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.edge_dim = edge_dim
        self.heads = heads
        self.dropout = dropout
        self.ffn_ratio = ffn_ratio
        self.edge_attention = edge_attention
        self.process_group = process_group
        edge_channels = in_channels if edge_dim is None else edge_dim
        hidden = ffn_ratio * out_channels

        def attention_linear(in_width: int = out_channels) -> Linear:
            return Linear(
                in_width, out_channels, weight_initializer="glorot", bias_initializer="zeros"
            )

        # Node update.
        self.lin_query = attention_linear(in_channels)
        self.lin_key = attention_linear(in_channels)
        self.lin_value = attention_linear(in_channels)
        self.lin_out = attention_linear()
        self.lin_edge_to_node = Linear(edge_channels, out_channels)
        self.node_ffn = Sequential(
            Linear(out_channels, hidden), GELU(), Linear(hidden, out_channels)
        )
        self.norm_attention = LayerNorm(out_channels)
        self.norm_edge_to_node = LayerNorm(out_channels)
        self.norm_node_ffn = LayerNorm(out_channels)
        # How the node attention reads the edges (none: the paper's layer, no parameters).
        self.lin_edge_attention = None
        if edge_attention == "key_value":
            self.lin_edge_attention = Linear(
                edge_channels, out_channels, bias=False, weight_initializer="glorot"
            )
        elif edge_attention in ("bias", "gate"):
            self.lin_edge_attention = Linear(
                edge_channels, heads, weight_initializer="glorot", bias_initializer="zeros"
            )

        # Edge update.
        self.lin_node_to_edge = Linear(out_channels, out_channels)
        self.lin_edge_query = attention_linear(edge_channels)
        self.lin_edge_key = attention_linear()
        self.lin_edge_value = attention_linear()
        self.edge_ffn = Sequential(
            Linear(out_channels, hidden), GELU(), LayerNorm(hidden), Linear(hidden, out_channels)
        )
        self.norm_edge_attention = LayerNorm(out_channels)
        self.norm_edge_ffn = LayerNorm(out_channels)

        # Residual projections, where the widths differ (identity, and no parameters, otherwise).
        self.lin_skip = None
        if in_channels != out_channels:
            self.lin_skip = Linear(in_channels, out_channels, bias=False)
        self.lin_edge_skip = None
        if edge_channels != out_channels:
            self.lin_edge_skip = Linear(edge_channels, out_channels, bias=False)

        self._alpha: Optional[Tensor] = None
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
        edge_attr: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        *,
        undirected: bool = False,
        return_attention_weights: Optional[bool] = None,
    ):
        r"""Runs one joint node and edge update.

        Args:
            x (torch.Tensor): Node features :math:`(|\mathcal{V}|, F_{in})`.
            edge_index (torch.Tensor): Edge indices :math:`(2, |\mathcal{E}|)`; row 0 sources,
                row 1 targets (reversed for ``flow="target_to_source"``). Or a
                :obj:`torch.sparse` adjacency (COO or CSR) :math:`(|\mathcal{V}|, |\mathcal{V}|)`
                in PyG's transposed form: entry :math:`(i, j)` is the edge :math:`j \to i`. Its
                entries are then the edges, in row-major order (as
                :func:`torch_geometric.utils.to_edge_index` lists them), and if it holds one
                feature vector per entry (a hybrid tensor of shape
                :math:`(|\mathcal{V}|, |\mathcal{V}|, F_e)`) and the layer has an :obj:`edge_dim`,
                those are the edge features.
            edge_attr (torch.Tensor, optional): Edge features :math:`(|\mathcal{E}|, F_e)`; required
                with an :obj:`edge_dim`, not accepted without one.
            attn_mask (torch.Tensor, optional): Bool :math:`(|\mathcal{E}|)`, True for the edges
                that carry attention messages (in GCA-HNG: the negatives). :obj:`None` means all.
            undirected (bool, optional): An optional storage mode, for symmetric graphs stored
                once: each column :math:`(i, j)` of :obj:`edge_index` with :math:`i \ne j` stands
                for both :math:`i \to j` and :math:`j \to i`, sharing one feature row (which must
                then be symmetric); a self-loop stands once. Exactly equal to running on the
                directed graph with both directions stored, at half the edge work; the output
                edge features are then given per stored pair. (default: :obj:`False`)
            return_attention_weights (bool, optional): If :obj:`True`, also returns the node
                attention as :obj:`(edge_index, alpha)`: :obj:`alpha` of shape
                :math:`(|\mathcal{E}'|, H)` holds :math:`\alpha^h_{ji}` of every directed edge of
                :obj:`edge_index` (both directions of every stored pair with :obj:`undirected`,
                which the returned :obj:`edge_index` then lists), 0 on masked edges; with
                ``edge_attention="gate"`` the gated weights, the ones the messages use. With the
                sink, the weights of the edges entering a node sum to *less* than one: to
                :math:`1 - 1/(1 + \sum_{j'} \exp(s_{j'i}))`, the rest going to "nothing".
                (default: :obj:`None`)

        Returns:
            The updated node features and edge features, ``(x, edge_attr)``; with
            :obj:`return_attention_weights`, ``((x, edge_attr), (edge_index, alpha))``.
        """
        edge_index, edge_attr = self._check_inputs(x, edge_index, edge_attr, attn_mask)
        h, attention = self._update_nodes(
            x, edge_index, edge_attr, attn_mask, undirected, bool(return_attention_weights)
        )
        out = h, self._update_edges(h, edge_index, edge_attr)
        if return_attention_weights:
            return out, attention
        return out

    def update_nodes(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        *,
        undirected: bool = False,
    ) -> Tensor:
        """The node half of :meth:`forward` (same arguments); returns the new node features."""
        edge_index, edge_attr = self._check_inputs(x, edge_index, edge_attr, attn_mask)
        return self._update_nodes(x, edge_index, edge_attr, attn_mask, undirected, False)[0]

    def update_edges(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        r"""The edge half of :meth:`forward`, from the node features :meth:`update_nodes` returned.

        :obj:`edge_attr` is the same input edge features that :meth:`update_nodes` used; for a
        layer without an :obj:`edge_dim`, :func:`correlation_edge_features` of its input nodes.
        It treats both end points alike, so directed and undirected storage need no distinction.
        Under autocast, the edge features are cast to the autocast dtype once here and the whole
        edge update, and its result, stays in it: the :math:`|\mathcal{E}| \times F` activations
        are the bulk of the work, and an fp32 residual would otherwise pull every later edge op
        back to fp32 and cast at every matmul.
        """
        if h.dim() != 2 or h.size(1) != self.out_channels:
            raise ValueError(
                f"EdgeNodeConv: h must have shape (num_nodes, {self.out_channels}) (the output of "
                f"update_nodes), got {tuple(h.shape)}"
            )
        edge_index = self._edge_index_of(edge_index, h.size(0))[0]
        edge_width = self.in_channels if self.edge_dim is None else self.edge_dim
        self._check_edge_attr(edge_attr, edge_index.size(1), edge_width)
        return self._update_edges(h, edge_index, edge_attr)

    def _check_inputs(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Optional[Tensor],
        attn_mask: Optional[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Checks the shapes of the inputs; returns the edge indices and the edge features."""
        if not isinstance(x, Tensor):
            raise ValueError(
                "EdgeNodeConv: x must be one tensor of node features (num_nodes, in_channels); "
                "bipartite (x_source, x_target) pairs are not supported, since every node is "
                "both attended to and updated in one feature space"
            )
        if x.dim() != 2 or (self.in_channels != -1 and x.size(1) != self.in_channels):
            width = "in_channels" if self.in_channels == -1 else self.in_channels
            raise ValueError(
                f"EdgeNodeConv: x must have shape (num_nodes, {width}), got {tuple(x.shape)}"
            )
        num_nodes = x.size(0)
        edge_index, adjacency_values = self._edge_index_of(edge_index, num_nodes)
        num_edges = edge_index.size(1)
        hybrid = adjacency_values is not None and adjacency_values.dim() == 2
        if edge_attr is None and self.edge_dim is not None and hybrid:
            edge_attr = adjacency_values
        if self.edge_dim is None:
            if edge_attr is not None:
                raise ValueError(
                    "EdgeNodeConv: got edge_attr, but the layer was built with edge_dim=None, "
                    "which builds the edge features from the nodes; build it with "
                    f"edge_dim={edge_attr.size(-1)} (or -1) to use edge_attr"
                )
            edge_attr = correlation_edge_features(x, edge_index)
        else:
            if edge_attr is not None and edge_attr.dim() == 1:
                edge_attr = edge_attr.view(-1, 1)
            self._check_edge_attr(edge_attr, num_edges, self.edge_dim)
        if attn_mask is not None and (
            attn_mask.dtype != torch.bool or attn_mask.shape != (num_edges,)
        ):
            raise ValueError(
                f"EdgeNodeConv: attn_mask must be a bool tensor of shape ({num_edges},), one "
                f"entry per edge, got {attn_mask.dtype} of shape {tuple(attn_mask.shape)}"
            )
        return edge_index, edge_attr

    @staticmethod
    def _check_edge_attr(edge_attr: Optional[Tensor], num_edges: int, edge_dim: int):
        width = "edge_dim" if edge_dim == -1 else edge_dim
        if edge_attr is None:
            raise ValueError(
                f"EdgeNodeConv: edge_attr of shape ({num_edges}, {width}) is required, since the "
                f"layer was built with edge_dim={edge_dim}; build it with edge_dim=None to derive "
                "the edge features from the nodes"
            )
        if (
            edge_attr.dim() != 2
            or edge_attr.size(0) != num_edges
            or (edge_dim != -1 and edge_attr.size(1) != edge_dim)
        ):
            raise ValueError(
                f"EdgeNodeConv: edge_attr must have shape ({num_edges}, {width}), one row per "
                f"edge, got {tuple(edge_attr.shape)}"
            )

    def _edge_index_of(self, edge_index: Tensor, num_nodes: int) -> tuple[Tensor, Optional[Tensor]]:
        """Checks `edge_index`, or converts a sparse adjacency (and returns its values too)."""
        values = None
        if is_torch_sparse_tensor(edge_index):
            if self.flow != "source_to_target":
                raise ValueError(
                    'EdgeNodeConv: a sparse adjacency needs flow="source_to_target"; pass an '
                    "edge_index for the other flow"
                )
            if tuple(edge_index.shape[:2]) != (num_nodes, num_nodes):
                raise ValueError(
                    f"EdgeNodeConv: the sparse adjacency must have shape ({num_nodes}, "
                    f"{num_nodes}) to match x, got {tuple(edge_index.shape)}"
                )
            if edge_index.layout == torch.sparse_coo:
                edge_index = edge_index.coalesce()
            target_source, values = to_edge_index(edge_index)
            return target_source.flip(0), values
        if (
            not isinstance(edge_index, Tensor)
            or edge_index.dim() != 2
            or edge_index.size(0) != 2
            or edge_index.dtype != torch.long
        ):
            raise ValueError(
                "EdgeNodeConv: edge_index must be a torch.long tensor of shape (2, num_edges) or "
                f"a torch.sparse adjacency, got {getattr(edge_index, 'dtype', type(edge_index))} "
                f"of shape {tuple(getattr(edge_index, 'shape', ()))}"
            )
        if edge_index.numel() > 0 and not torch.compiler.is_compiling():
            low, high = torch.stack(edge_index.aminmax()).tolist()
            if low < 0 or high >= num_nodes:
                raise ValueError(
                    f"EdgeNodeConv: edge_index must index the {num_nodes} rows of x (0 to "
                    f"{num_nodes - 1}), but it holds {low} to {high}"
                )
        return edge_index, values

    def _update_nodes(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Tensor,
        attn_mask: Optional[Tensor],
        undirected: bool,
        return_attention: bool,
    ) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
        num_nodes = x.size(0)
        source, target = self._source_target(edge_index)

        head_size = self.out_channels // self.heads
        query = self.lin_query(x).view(num_nodes, self.heads, head_size)
        key = self.lin_key(x).view(num_nodes, self.heads, head_size)
        value = self.lin_value(x).view(num_nodes, self.heads, head_size)
        edge_term = self._edge_attention_term(edge_attr)
        off_diagonal = source != target
        process_group = self.process_group
        attention = None
        if process_group is None and undirected and self._is_complete(source, target, num_nodes):
            # The complete graph: attention as small dense matmuls instead of N^2 gathers.
            message, alpha = self._dense_attention(
                query, key, value, source, target, attn_mask, edge_term
            )
            if return_attention:
                directed_index = torch.cat([edge_index, edge_index[:, off_diagonal].flip(0)], 1)
                directed_source, directed_target = self._source_target(directed_index)
                attention = directed_index, alpha[:, directed_target, directed_source].t()
        else:
            directed_index, directed_mask, directed_term = edge_index, attn_mask, edge_term
            if undirected:  # expand the cheap O(|E| F) attention to both directions
                directed_index = torch.cat([edge_index, edge_index[:, off_diagonal].flip(0)], 1)
                if attn_mask is not None:
                    directed_mask = torch.cat([attn_mask, attn_mask[off_diagonal]])
                if edge_term is not None:
                    directed_term = torch.cat([edge_term, edge_term[off_diagonal]])
            message = self.propagate(
                directed_index,
                query=query,
                key=key,
                value=value,
                attn_mask=directed_mask,
                edge_term=directed_term,
                size=(num_nodes, num_nodes),
            )
            if return_attention:
                attention = directed_index, self._alpha
            self._alpha = None
            message = all_reduce_sum(message, process_group)
        skip = x if self.lin_skip is None else self.lin_skip(x)
        h = self.norm_attention(F.gelu(skip + self.lin_out(message.reshape(num_nodes, -1))))

        edge_to_node = F.gelu(self.lin_edge_to_node(edge_attr))
        outgoing = scatter(edge_to_node, source, 0, dim_size=num_nodes, reduce="sum")
        if undirected:  # both end points, then the self-loops (which stand once) taken back
            loops = (~off_diagonal).nonzero().view(-1)
            outgoing = outgoing + scatter(edge_to_node, target, 0, dim_size=num_nodes, reduce="sum")
            outgoing = outgoing.index_add(0, source[loops], edge_to_node[loops], alpha=-1)
        outgoing = all_reduce_sum(outgoing, process_group)
        h = self.norm_edge_to_node(F.gelu(h + outgoing))
        return self.norm_node_ffn(F.gelu(h + self.node_ffn(h))), attention

    @staticmethod
    def _is_complete(source: Tensor, target: Tensor, num_nodes: int) -> bool:
        """Whether undirected storage holds every pair {i, j}, self-loops included, exactly once."""
        if source.numel() != num_nodes * (num_nodes + 1) // 2:
            return False
        covered = torch.zeros(num_nodes, num_nodes, dtype=torch.bool, device=source.device)
        covered[source, target] = True
        covered[target, source] = True
        return bool(covered.all())

    def _edge_attention_term(self, edge_attr: Tensor) -> Optional[Tensor]:
        """What the node attention reads from every (stored) edge: its projection added to keys
        and values ``(E, H, d)`` (key_value), a logit ``(E, H)`` (bias) or a gate in (0, 1)
        ``(E, H)`` (gate); None for the paper's layer."""
        if self.lin_edge_attention is None:
            return None
        term = self.lin_edge_attention(edge_attr)
        if self.edge_attention == "key_value":
            return term.view(-1, self.heads, self.out_channels // self.heads)
        if self.edge_attention == "gate":
            return torch.sigmoid(term)
        return term

    def _dense_attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        source: Tensor,
        target: Tensor,
        attn_mask: Optional[Tensor],
        edge_term: Optional[Tensor] = None,
    ) -> tuple[Tensor, Tensor]:
        """Attention with the sink on a complete undirected graph, as dense [H, N, N] scores;
        returns the messages and the weights ``alpha[h, target, source]``. The edge terms of the
        stored pairs are written into both directions' entries."""
        num_nodes, scale = query.size(0), math.sqrt(query.size(-1))
        allowed = torch.ones(num_nodes, num_nodes, dtype=torch.bool, device=query.device)
        if attn_mask is not None:  # allowed[i, j]: node i may attend to node j
            allowed[target, source] = attn_mask
            allowed[source, target] = attn_mask
        score = torch.einsum("ihd,jhd->hij", query, key) / scale
        if self.edge_attention == "key_value":  # q_i . e_ji, for i the target and the source
            to_target = torch.linalg.vecdot(query[target], edge_term) / scale
            to_source = torch.linalg.vecdot(query[source], edge_term) / scale
            score = score + self._pair_matrix(to_target, to_source, source, target, num_nodes)
        elif self.edge_attention == "bias":
            score = score + self._pair_matrix(edge_term, edge_term, source, target, num_nodes)
        score = score.masked_fill(~allowed, float("-inf"))
        score_max = score.detach().amax(dim=-1, keepdim=True).clamp_min(0.0)
        weight = (score - score_max).exp()
        alpha = weight / (weight.sum(dim=-1, keepdim=True) + (-score_max).exp())
        if self.edge_attention == "gate":
            alpha = alpha * self._pair_matrix(edge_term, edge_term, source, target, num_nodes)
        message = torch.einsum("hij,jhd->ihd", alpha, value)
        if self.edge_attention == "key_value":  # + sum_j alpha_ji e_ji, both directions
            off = source != target
            message = message.index_add(
                0, target, alpha[:, target, source].t().unsqueeze(-1) * edge_term
            )
            message = message.index_add(
                0,
                source[off],
                alpha[:, source[off], target[off]].t().unsqueeze(-1) * edge_term[off],
            )
        return message, alpha

    @staticmethod
    def _pair_matrix(
        to_target: Tensor, to_source: Tensor, source: Tensor, target: Tensor, num_nodes: int
    ) -> Tensor:
        """[H, N, N] from per-pair values ``(E, H)``: entry [h, i, j] of the edge j -> i."""
        matrix = to_target.new_zeros(num_nodes, num_nodes, to_target.size(1))
        matrix = matrix.index_put((target, source), to_target)
        return matrix.index_put((source, target), to_source.to(matrix.dtype)).permute(2, 0, 1)

    def _update_edges(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        num_nodes = h.size(0)
        if torch.is_autocast_enabled(h.device.type):
            edge_attr = edge_attr.to(torch.get_autocast_dtype(h.device.type))
        if is_uninitialized_parameter(self.lin_edge_query.weight):
            with torch.no_grad():  # lazy: its weight is read below, never called
                self.lin_edge_query(edge_attr[:1])
        edge_skip = edge_attr if self.lin_edge_skip is None else self.lin_edge_skip(edge_attr)
        u = F.gelu(self.lin_node_to_edge(h))
        edge_key = self.lin_edge_key(u)
        # Fold the edge query projection into the N node keys instead of the |E| edges.
        key_in_edge_space = edge_key @ self.lin_edge_query.weight
        key_bias_score = edge_key @ self.lin_edge_query.bias
        return self.edge_updater(
            edge_index,
            edge_attr=edge_attr,
            edge_skip=edge_skip,
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
        edge_term: Optional[Tensor],
        index: Tensor,
        size_i: int,
    ) -> Tensor:
        if self.edge_attention == "key_value":
            key_j, value_j = key_j + edge_term, value_j + edge_term
        score = (query_i * key_j).sum(dim=-1) / math.sqrt(query_i.size(-1))
        if self.edge_attention == "bias":
            score = score + edge_term
        if attn_mask is not None:
            score = score.masked_fill(~attn_mask.view(-1, 1), float("-inf"))
        alpha = softmax_with_sink(score, index, size_i, self.process_group)
        if self.edge_attention == "gate":
            alpha = alpha * edge_term
        self._alpha = alpha
        return alpha.unsqueeze(-1) * value_j

    def edge_update(
        self,
        edge_attr: Tensor,
        edge_skip: Tensor,
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
        residual = torch.addcmul(edge_skip, attention[:, :1], value_i)
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
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"edge_dim={self.edge_dim}, heads={self.heads}, dropout={self.dropout}, "
            f"ffn_ratio={self.ffn_ratio}"
            + ("" if self.edge_attention == "none" else f", edge_attention={self.edge_attention}")
            + ")"
        )
