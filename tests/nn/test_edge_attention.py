"""EdgeNodeConv's ``edge_attention`` options: node attention that reads the edges, checked against
the dense statement in every storage mode the layer accepts."""

import pytest
import torch
from torch_geometric.utils import to_torch_coo_tensor

from gca_pyg.graph import build_batch_graph
from gca_pyg.nn import EDGE_ATTENTION, EdgeNodeConv

from dense_reference import densify, reference_edge_node_conv

OPTIONS = [option for option in EDGE_ATTENTION if option != "none"]
CHANNELS = 16


def make_conv(edge_attention, in_channels=CHANNELS, edge_dim=CHANNELS, device="cpu"):
    torch.manual_seed(3)
    conv = EdgeNodeConv(
        in_channels, CHANNELS, edge_dim=edge_dim, heads=4, edge_attention=edge_attention
    )
    with torch.no_grad():  # a trained look: biases away from their zero initialisation
        for name, parameter in conv.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.5, 0.5)
    return conv.to(device, torch.float64).eval()


def sparse_graph(num_nodes=9, num_edges=30, edge_dim=CHANNELS, device="cpu"):
    generator = torch.Generator().manual_seed(num_nodes)
    edge_index = torch.unique(torch.randint(num_nodes, (2, num_edges), generator=generator), dim=1)
    x = torch.randn(num_nodes, CHANNELS, generator=generator, dtype=torch.float64)
    edge_attr = torch.randn(edge_index.size(1), edge_dim, generator=generator, dtype=torch.float64)
    attn_mask = torch.rand(edge_index.size(1), generator=generator) < 0.7
    return x.to(device), edge_index.to(device), edge_attr.to(device), attn_mask.to(device)


@pytest.mark.parametrize("in_channels, edge_dim", [(CHANNELS, CHANNELS), (8, 4)])
@pytest.mark.parametrize("option", OPTIONS)
def test_sparse_graph_matches_the_dense_statement(option, in_channels, edge_dim, device):
    conv = make_conv(option, in_channels, edge_dim, device=device)
    x, edge_index, edge_attr, attn_mask = sparse_graph(edge_dim=edge_dim, device=device)
    x = x[:, :in_channels].contiguous()
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    h_ref, e_ref = reference_edge_node_conv(
        conv, x, *densify(x.size(0), edge_index, edge_attr, attn_mask)
    )
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(e, e_ref[edge_index[0], edge_index[1]], rtol=0, atol=1e-10)


@pytest.mark.parametrize("option", OPTIONS)
def test_the_complete_graph_and_undirected_storage_match_the_dense_statement(option, device):
    # Undirected storage of the complete graph takes the dense-matmul path; directed storage the
    # message-passing one. Both against the statement, with symmetric edge features.
    conv = make_conv(option, device=device)
    z = torch.randn(9, CHANNELS, device=device, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2], device=device)
    directed = build_batch_graph(z, y)
    stored = build_batch_graph(z, y, undirected=True)
    full = torch.ones(9, 9, dtype=torch.bool, device=device)
    attention = directed.neg_mask.view(9, 9)
    features = directed.edge_attr.view(9, 9, CHANNELS)
    h_ref, e_ref = reference_edge_node_conv(conv, directed.x, features, full, attention)
    (h, e), (index, alpha) = conv(
        directed.x, directed.edge_index, directed.edge_attr, directed.neg_mask,
        return_attention_weights=True,
    )  # fmt: skip
    (h_u, e_u), (index_u, alpha_u) = conv(
        stored.x, stored.edge_index, stored.edge_attr, stored.neg_mask,
        undirected=True, return_attention_weights=True,
    )  # fmt: skip
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(h_u, h_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(e, e_ref.view(-1, CHANNELS), rtol=0, atol=1e-10)
    i, j = stored.edge_index
    torch.testing.assert_close(e_u, e_ref[i, j], rtol=0, atol=1e-10)
    # The weights returned are the ones used (after the gate), the same in both storages.
    alpha_dense = torch.zeros(9, 9, 4, dtype=alpha.dtype, device=device)
    alpha_dense[index[0], index[1]] = alpha
    torch.testing.assert_close(alpha_u, alpha_dense[index_u[0], index_u[1]], rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha_dense, reference_alpha(conv, directed, attention))


def reference_alpha(conv, graph, attention):
    """alpha[source, target, head] of the complete graph, from the layer's outputs: the message
    sum_j alpha_ji (v_j + ...) is not observable alone, so the statement is re-derived here."""
    num_nodes, heads = graph.num_nodes, conv.heads
    q = conv.lin_query(graph.x).view(num_nodes, heads, -1)
    k = conv.lin_key(graph.x).view(num_nodes, heads, -1)
    features = graph.edge_attr.view(num_nodes, num_nodes, -1)  # [source, target]
    score = torch.einsum("thd,shd->sth", q, k)
    if conv.edge_attention == "key_value":
        projected = (features @ conv.lin_edge_attention.weight.T).view(
            num_nodes, num_nodes, heads, -1
        )
        score = score + torch.einsum("thd,sthd->sth", q, projected)
    score = score / q.size(-1) ** 0.5
    if conv.edge_attention == "bias":
        score = score + conv.lin_edge_attention(features)
    weight = score.exp() * attention.unsqueeze(-1)
    alpha = weight / (1 + weight.sum(dim=0, keepdim=True))
    if conv.edge_attention == "gate":
        alpha = alpha * torch.sigmoid(conv.lin_edge_attention(features))
    return alpha


@pytest.mark.parametrize("option", OPTIONS)
def test_sparse_adjacency_with_edge_features_equals_edge_index(option):
    conv = make_conv(option)
    x, edge_index, edge_attr, attn_mask = sparse_graph()
    order = torch.argsort(edge_index[1] * x.size(0) + edge_index[0])  # row-major (target, source)
    edge_index, edge_attr, attn_mask = edge_index[:, order], edge_attr[order], attn_mask[order]
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    size = (x.size(0), x.size(0), CHANNELS)
    for adjacency, features in [
        (torch.sparse_coo_tensor(edge_index.flip(0), edge_attr, size), None),
        (to_torch_coo_tensor(edge_index.flip(0), size=x.size(0)), edge_attr),
    ]:
        h_sparse, e_sparse = conv(x, adjacency, features, attn_mask)
        torch.testing.assert_close(h_sparse, h, rtol=0, atol=1e-12)
        torch.testing.assert_close(e_sparse, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("option", OPTIONS)
def test_nodes_now_read_their_edges(option):
    # With the paper's layer, the node update sees edge features only through the sum of a
    # node's outgoing edges: swapping the features of two edges that leave the same node changes
    # nothing for their targets' attention. With an option the targets see the swap.
    x, _, _, _ = sparse_graph()
    edge_index = torch.tensor([[0, 0, 1, 2], [1, 2, 2, 1]])
    edge_attr = torch.randn(4, CHANNELS, dtype=torch.float64)
    swapped = edge_attr[[1, 0, 2, 3]]
    for edge_attention, changes in [("none", False), (option, True)]:
        conv = make_conv(edge_attention)
        h = conv.update_nodes(x, edge_index, edge_attr)
        h_swapped = conv.update_nodes(x, edge_index, swapped)
        assert torch.allclose(h[0], h_swapped[0], atol=1e-12)  # its outgoing sum is unchanged
        assert torch.allclose(h[1:3], h_swapped[1:3], atol=1e-12) is not changes, edge_attention


def test_none_is_the_paper_layer_bit_for_bit():
    torch.manual_seed(0)
    default = EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS)
    torch.manual_seed(0)
    none = EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS, edge_attention=None)
    assert none.edge_attention == "none" and none.lin_edge_attention is None
    assert default.state_dict().keys() == none.state_dict().keys()
    for name, value in default.state_dict().items():
        assert torch.equal(value, none.state_dict()[name]), name
    x, edge_index, edge_attr, attn_mask = sparse_graph()
    default.double().eval(), none.double().eval()
    for out, out_none in zip(default(x, edge_index, edge_attr), none(x, edge_index, edge_attr)):
        assert torch.equal(out, out_none)


@pytest.mark.parametrize("option", OPTIONS)
def test_parameters_repr_and_gradients(option, device):
    conv = EdgeNodeConv(8, CHANNELS, edge_dim=4, heads=4, edge_attention=option).to(device)
    extra = sum(p.numel() for p in conv.lin_edge_attention.parameters())
    assert extra == {"key_value": 4 * CHANNELS, "bias": 4 * 4 + 4, "gate": 4 * 4 + 4}[option]
    assert f"edge_attention={option}" in repr(conv)
    x, edge_index, edge_attr, attn_mask = (
        t.float() if t.is_floating_point() else t for t in sparse_graph(edge_dim=4, device=device)
    )
    h, e = conv.train()(x[:, :8], edge_index, edge_attr, attn_mask)
    (h.square().sum() + e.square().sum()).backward()
    for name, parameter in conv.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    conv.reset_parameters()


@pytest.mark.parametrize("option", OPTIONS)
def test_lazy_edge_width(option):
    conv = EdgeNodeConv(-1, CHANNELS, edge_dim=-1, heads=4, edge_attention=option)
    x, edge_index, edge_attr, attn_mask = sparse_graph(edge_dim=5)
    h, e = conv.double()(x.float().double(), edge_index, edge_attr, attn_mask)
    assert h.shape == (x.size(0), CHANNELS) and e.shape == (edge_index.size(1), CHANNELS)
    assert conv.lin_edge_attention.weight.shape[1] == 5


def test_an_unknown_option_is_one_clear_error():
    with pytest.raises(
        ValueError, match="edge_attention must be one of none, key_value, bias, gate"
    ):
        EdgeNodeConv(CHANNELS, CHANNELS, edge_attention="mult_attr")
