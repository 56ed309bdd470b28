from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import ModuleList
from torch_geometric.nn import JumpingKnowledge
from torch_geometric.nn.dense.linear import Linear

from gca_pyg.nn.edge_node_conv import EdgeNodeConv

JK_MODES = (None, "last", "cat", "max", "lstm")


class EdgeNodeGNN(torch.nn.Module):
    r"""A ready stack of :class:`~gca_pyg.nn.EdgeNodeConv` layers with node *and* edge outputs, in
    the manner of PyG's basic models (:class:`~torch_geometric.nn.models.GAT`,
    :class:`~torch_geometric.nn.models.GIN`).

    :obj:`num_layers` layers of width :obj:`hidden_channels` update node and edge features
    together; dropout acts on both between layers. The node and the edge features of the layers
    are then combined by jumping knowledge (:obj:`jk`, one
    :class:`~torch_geometric.nn.models.JumpingKnowledge` for each) and, where asked, projected by
    a linear head each: node classification or regression reads the first output, edge
    classification or regression the second, graph-level tasks pool the first (e.g. with
    :func:`~torch_geometric.nn.global_mean_pool`).

    Args:
        in_channels (int): Size of the input node features, or :obj:`-1` (lazy).
        hidden_channels (int): Width of every layer (node and edge features alike); a multiple of
            :obj:`heads`.
        num_layers (int): Number of :class:`~gca_pyg.nn.EdgeNodeConv` layers.
        out_channels (int, optional): Size of the node output: a linear head from the (jumping
            knowledge of the) last node features. :obj:`None` returns those features as they are
            (width :obj:`hidden_channels`, or :obj:`num_layers` times it with ``jk="cat"``, which
            then gets a head to :obj:`hidden_channels`). (default: :obj:`None`)
        edge_dim (int, optional): Size of the input edge features (:obj:`-1`: lazy); :obj:`None`
            builds them from the nodes as GCA-HNG does
            (:func:`~gca_pyg.nn.correlation_edge_features`). (default: :obj:`None`)
        edge_out_channels (int, optional): Size of the edge output, as :obj:`out_channels` for
            the nodes; :obj:`0` for no edge output at all, which also spares the last layer its
            edge update (a node- or graph-level task). (default: :obj:`None`)
        dropout (float, optional): Dropout of node and edge features between layers.
            (default: :obj:`0.0`)
        jk (str, optional): Jumping knowledge over the layers' outputs: :obj:`None` or
            ``"last"`` (the last layer), ``"cat"``, ``"max"`` or ``"lstm"``. (default: :obj:`None`)
        heads (int, optional): Node-attention heads per layer. (default: :obj:`4`)
        edge_attention (str, optional): How the nodes read their edges
            (:class:`~gca_pyg.nn.EdgeNodeConv`): ``"bias"``, an edge-dependent logit per head,
            learned the most reliably in our measurements on tasks whose answer lies in the edges;
            ``"none"`` is the paper's layer. (default: :obj:`"bias"`)
        **kwargs (optional): Further arguments of every :class:`~gca_pyg.nn.EdgeNodeConv`
            (:obj:`ffn_ratio`, the attention :obj:`dropout` as :obj:`attention_dropout`, ...).

    Shapes:
        - **input:** node features :math:`(|\mathcal{V}|, F_{in})`, edge indices
          :math:`(2, |\mathcal{E}|)` or a sparse adjacency, edge features
          :math:`(|\mathcal{E}|, F_e)` *(with an edge_dim)*, attention mask
          :math:`(|\mathcal{E}|)` *(optional)*
        - **output:** node features :math:`(|\mathcal{V}|, F_{out})` and edge features
          :math:`(|\mathcal{E}|, F_{e,out})` (:obj:`None` with :obj:`edge_out_channels=0`)
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        num_layers: int,
        out_channels: Optional[int] = None,
        edge_dim: Optional[int] = None,
        edge_out_channels: Optional[int] = None,
        dropout: float = 0.0,
        jk: Optional[str] = None,
        heads: int = 4,
        edge_attention: str = "bias",
        **kwargs,
    ):
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"EdgeNodeGNN: num_layers must be a positive int, got {num_layers!r}")
        if jk not in JK_MODES:
            raise ValueError(
                f"EdgeNodeGNN: jk must be one of None, last, cat, max, lstm, got {jk!r}"
            )
        for name, width in (
            ("out_channels", out_channels),
            ("edge_out_channels", edge_out_channels),
        ):
            if width is not None and (not isinstance(width, int) or width < 0):
                raise ValueError(f"EdgeNodeGNN: {name} must be None or an int >= 0, got {width!r}")
        if out_channels == 0:
            raise ValueError("EdgeNodeGNN: out_channels must be None or positive, got 0")
        if "attention_dropout" in kwargs:
            kwargs["dropout"] = kwargs.pop("attention_dropout")
        self.in_channels, self.hidden_channels = in_channels, hidden_channels
        self.num_layers, self.edge_dim = num_layers, edge_dim
        self.dropout, self.jk_mode = dropout, jk
        self.edge_outputs = edge_out_channels != 0
        self.convs = ModuleList(
            EdgeNodeConv(
                in_channels if layer == 0 else hidden_channels,
                hidden_channels,
                edge_dim=edge_dim if layer == 0 else hidden_channels,
                heads=heads,
                edge_attention=edge_attention,
                **kwargs,
            )
            for layer in range(num_layers)
        )
        self.jk = self._jumping_knowledge(jk)
        self.edge_jk = self._jumping_knowledge(jk) if self.edge_outputs else None
        self.lin = self._head(out_channels, jk)
        self.edge_lin = self._head(edge_out_channels, jk) if self.edge_outputs else None
        self.out_channels = hidden_channels if self.lin is None else self.lin.out_channels
        self.edge_out_channels = 0
        if self.edge_outputs:
            self.edge_out_channels = (
                hidden_channels if self.edge_lin is None else self.edge_lin.out_channels
            )

    def _jumping_knowledge(self, jk: Optional[str]) -> Optional[JumpingKnowledge]:
        if jk in (None, "last"):
            return None
        return JumpingKnowledge(jk, self.hidden_channels, self.num_layers)

    def _head(self, width: Optional[int], jk: Optional[str]) -> Optional[Linear]:
        in_width = self.hidden_channels * (self.num_layers if jk == "cat" else 1)
        if width is None and jk != "cat":
            return None
        return Linear(in_width, self.hidden_channels if width is None else width)

    def reset_parameters(self):
        for module in (*self.convs, self.jk, self.edge_jk, self.lin, self.edge_lin):
            if module is not None:
                module.reset_parameters()

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_attr: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
        *,
        undirected: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        r"""Returns the node outputs and the edge outputs (:obj:`None` without edge outputs).

        Args:
            x (torch.Tensor): Node features.
            edge_index (torch.Tensor): Edge indices or a sparse adjacency, as for
                :class:`~gca_pyg.nn.EdgeNodeConv` (a hybrid sparse adjacency may carry the edge
                features).
            edge_attr (torch.Tensor, optional): Edge features; with an :obj:`edge_dim` only.
            attn_mask (torch.Tensor, optional): Bool, the edges that carry node attention.
            undirected (bool, optional): Undirected storage: every stored pair stands for both
                directions (see :class:`~gca_pyg.nn.EdgeNodeConv`). (default: :obj:`False`)
        """
        nodes, edges = [], []
        for layer, conv in enumerate(self.convs):
            last = layer == self.num_layers - 1
            if last and not self.edge_outputs:
                x = conv.update_nodes(x, edge_index, edge_attr, attn_mask, undirected=undirected)
            else:
                x, edge_attr = conv(x, edge_index, edge_attr, attn_mask, undirected=undirected)
                edges.append(edge_attr)
            nodes.append(x)
            if not last and self.dropout > 0:
                x = F.dropout(x, p=self.dropout, training=self.training)
                edge_attr = F.dropout(edge_attr, p=self.dropout, training=self.training)
        x = nodes[-1] if self.jk is None else self.jk(nodes)
        if self.lin is not None:
            x = self.lin(x)
        if not self.edge_outputs:
            return x, None
        edge_attr = edges[-1] if self.edge_jk is None else self.edge_jk(edges)
        if self.edge_lin is not None:
            edge_attr = self.edge_lin(edge_attr)
        return x, edge_attr

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
            f"num_layers={self.num_layers}, edge_dim={self.edge_dim}, "
            f"edge_out_channels={self.edge_out_channels}, "
            f"edge_attention={self.convs[0].edge_attention})"
        )
