"""EdgeNodeConv as a PyG user meets it: widths, lazy init, attention weights, shape errors, sparse
adjacency, Batch/DataLoader, Sequential and torch.compile (in the style of PyG's conv tests)."""

import pytest
import torch
from torch_geometric.datasets import FakeDataset
from torch_geometric.loader import DataLoader
from torch_geometric.nn import Sequential, global_mean_pool
from torch_geometric.utils import softmax, to_torch_coo_tensor, to_torch_csr_tensor

from gca_pyg.authors import KEY_TABLE
from gca_pyg.graph import build_batch_graph
from gca_pyg.nn import EdgeNodeConv, correlation_edge_features

from dense_reference import reference_edge_node_conv

WIDTHS = [  # in_channels, out_channels, edge_dim, heads
    (16, 16, 16, 4),  # GCA-HNG's own use: one width
    (8, 16, 4, 2),
    (16, 8, None, 4),  # edge features built from the nodes
    (12, 12, 3, 3),  # nodes keep their width, edges grow
]


def graph(num_nodes, num_edges, in_channels, edge_dim, device="cpu", dtype=torch.float64):
    edge_index = torch.unique(torch.randint(num_nodes, (2, num_edges)), dim=1).to(device)
    x = torch.randn(num_nodes, in_channels, device=device, dtype=dtype)
    edge_attr = None
    if edge_dim is not None:
        edge_attr = torch.randn(edge_index.size(1), edge_dim, device=device, dtype=dtype)
    attn_mask = torch.rand(edge_index.size(1), device=device) < 0.7
    return x, edge_index, edge_attr, attn_mask


def dense_edges(num_nodes, edge_index, values):
    dense = values.new_zeros(num_nodes, num_nodes, *values.shape[1:])
    dense[edge_index[0], edge_index[1]] = values
    return dense


@pytest.mark.parametrize("in_channels,out_channels,edge_dim,heads", WIDTHS)
def test_widths_match_the_dense_statement(in_channels, out_channels, edge_dim, heads, device):
    conv = EdgeNodeConv(in_channels, out_channels, edge_dim, heads=heads)
    conv = conv.to(device=device, dtype=torch.float64).eval()
    assert str(conv) == (
        f"EdgeNodeConv({in_channels}, {out_channels}, edge_dim={edge_dim}, heads={heads}, "
        "dropout=0.1, ffn_ratio=4)"
    )
    x, edge_index, edge_attr, attn_mask = graph(9, 30, in_channels, edge_dim, device)
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    assert h.shape == (9, out_channels) and e.shape == (edge_index.size(1), out_channels)

    if edge_attr is None:  # what the layer builds, checked below against Pearson's correlation
        edge_attr = correlation_edge_features(x, edge_index)
    adjacency = dense_edges(9, edge_index, torch.ones_like(attn_mask))
    attention = dense_edges(9, edge_index, attn_mask)
    h_ref, e_ref = reference_edge_node_conv(
        conv, x, dense_edges(9, edge_index, edge_attr), adjacency, attention
    )
    assert torch.allclose(h, h_ref, atol=1e-10)
    assert torch.allclose(e, e_ref[edge_index[0], edge_index[1]], atol=1e-10)


def test_residual_projections_exist_only_where_widths_differ():
    assert EdgeNodeConv(16, 16, 16).lin_skip is None
    assert EdgeNodeConv(16, 16, 16).lin_edge_skip is None
    assert EdgeNodeConv(16, 16).lin_edge_skip is None  # edges built from the 16-wide nodes
    assert EdgeNodeConv(8, 16, 16).lin_skip.weight.shape == (16, 8)
    assert EdgeNodeConv(16, 16, 4).lin_edge_skip.weight.shape == (16, 4)


def test_same_width_parameters_keep_the_names_the_converter_maps():
    # The converter of the authors' checkpoints names every parameter of a GCA-HNG layer.
    conv = EdgeNodeConv(16, 16, edge_dim=16, heads=4)
    prefixes = {prefix for ours in KEY_TABLE["correlation net layers"].values() for prefix in ours}
    names = [name for name, _ in conv.named_parameters()]
    assert all(any(name.startswith(prefix) for prefix in prefixes) for name in names), names
    assert all(any(name.startswith(prefix) for name in names) for prefix in prefixes)


def test_correlation_edge_features_sum_to_pearson_correlation():
    x = torch.randn(5, 16, dtype=torch.float64)
    edge_index = torch.tensor([[0, 1, 2, 4], [1, 0, 3, 4]])
    e = correlation_edge_features(x, edge_index)
    pearson = torch.corrcoef(x)[edge_index[0], edge_index[1]]
    assert torch.allclose(e.sum(dim=1), pearson, atol=1e-12)
    assert torch.equal(e[0], e[1])  # symmetric
    z, y = torch.randn(6, 16), torch.tensor([0, 0, 1, 1, 2, 2])
    batch_graph = build_batch_graph(z, y)
    assert torch.equal(batch_graph.edge_attr, correlation_edge_features(z, batch_graph.edge_index))


def test_edge_dim_none_equals_passing_the_correlation_features():
    x, edge_index, _, attn_mask = graph(8, 30, 16, None)
    built = EdgeNodeConv(16, 16, heads=4).double().eval()
    given = EdgeNodeConv(16, 16, edge_dim=16, heads=4).double().eval()
    given.load_state_dict(built.state_dict())
    expected = given(x, edge_index, correlation_edge_features(x, edge_index), attn_mask)
    actual = built(x, edge_index, attn_mask=attn_mask)
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("edge_dim,edge_width", [(-1, 5), (None, 10)])
def test_lazy_widths_materialise_on_the_first_call(edge_dim, edge_width, device):
    conv = EdgeNodeConv(-1, 12, edge_dim=edge_dim, heads=3).to(device)
    x, edge_index, edge_attr, attn_mask = graph(7, 20, 10, edge_dim and 5, device, torch.float32)
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    assert h.shape == (7, 12) and e.shape == (edge_index.size(1), 12)
    assert conv.lin_query.weight.shape == (12, 10)
    # lin_edge_query's weight is read, never called: materialised all the same.
    assert conv.lin_edge_query.weight.shape == (12, edge_width)
    assert conv.lin_edge_skip.weight.shape == (12, edge_width)
    conv.eval()
    again = conv(x, edge_index, edge_attr, attn_mask)
    assert torch.equal(again[0], conv(x, edge_index, edge_attr, attn_mask)[0])


@pytest.mark.parametrize("in_channels,out_channels,edge_dim,heads", WIDTHS[1:])
def test_every_parameter_receives_a_gradient(in_channels, out_channels, edge_dim, heads, device):
    conv = EdgeNodeConv(in_channels, out_channels, edge_dim, heads=heads).to(device).train()
    x, edge_index, edge_attr, attn_mask = graph(8, 40, in_channels, edge_dim, device, torch.float32)
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    (h.square().sum() + e.square().sum()).backward()
    for name, parameter in conv.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def attention_by_hand(conv, x, edge_index, attn_mask):
    """PyG's own softmax over each target's unmasked in-edges plus one zero-logit sink edge per
    target (a virtual node): returns (alpha of the edges, alpha of each target's sink)."""
    num_nodes, heads = x.size(0), conv.heads
    query = conv.lin_query(x).view(num_nodes, heads, -1)
    key = conv.lin_key(x).view(num_nodes, heads, -1)
    source, target = edge_index[:, attn_mask]
    score = (query[target] * key[source]).sum(-1) / query.size(-1) ** 0.5
    score = torch.cat([score, score.new_zeros(num_nodes, heads)])  # the sinks
    index = torch.cat([target, torch.arange(num_nodes)])
    weight = softmax(score, index, num_nodes=num_nodes)
    alpha = weight.new_zeros(edge_index.size(1), heads)
    alpha[attn_mask] = weight[: source.numel()]
    return alpha, weight[source.numel() :]


def test_attention_weights_with_the_sink_sum_to_one_per_target_and_head():
    conv = EdgeNodeConv(8, 16, edge_dim=4, heads=4).double().eval()
    x, edge_index, edge_attr, attn_mask = graph(9, 40, 8, 4)
    (h, e), (returned_index, alpha) = conv(
        x, edge_index, edge_attr, attn_mask, return_attention_weights=True
    )
    assert torch.equal(returned_index, edge_index) and alpha.shape == (edge_index.size(1), 4)
    assert torch.equal((h, e)[0], conv(x, edge_index, edge_attr, attn_mask)[0])
    expected, sink = attention_by_hand(conv, x, edge_index, attn_mask)
    assert torch.allclose(alpha, expected, atol=1e-12)
    assert torch.all(alpha[~attn_mask] == 0)
    # "Sums to one": over a target's in-edges *and* its sink; the edges alone get less.
    per_target = torch.zeros(9, 4, dtype=alpha.dtype).index_add_(0, edge_index[1], alpha)
    assert torch.allclose(per_target + sink, torch.ones(9, 4, dtype=alpha.dtype), atol=1e-12)
    assert torch.all(per_target < 1)


def test_attention_weights_of_undirected_storage_are_the_directed_ones(device):
    conv = EdgeNodeConv(16, 16, edge_dim=16, heads=4).to(device, torch.float64).eval()
    z = torch.randn(6, 16, device=device, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2], device=device)
    directed, stored = build_batch_graph(z, y), build_batch_graph(z, y, undirected=True)
    _, (index, alpha) = conv(
        directed.x, directed.edge_index, directed.edge_attr, directed.neg_mask,
        return_attention_weights=True,
    )  # fmt: skip
    _, (index_u, alpha_u) = conv(
        stored.x, stored.edge_index, stored.edge_attr, stored.neg_mask,
        undirected=True, return_attention_weights=True,
    )  # fmt: skip
    assert index_u.size(1) == 36 and alpha_u.shape == (36, 4)  # both directions, loops once
    dense = dense_edges(6, index, alpha)
    assert torch.allclose(alpha_u, dense[index_u[0], index_u[1]], atol=1e-12)
    assert torch.allclose(dense_edges(6, index_u, alpha_u), dense, atol=1e-12)


def test_sparse_adjacency_equals_edge_index(device):
    conv = EdgeNodeConv(8, 16, edge_dim=4, heads=2).to(device, torch.float64).eval()
    x, edge_index, edge_attr, attn_mask = graph(9, 40, 8, 4, device)
    # A sparse adjacency lists its edges row-major over (target, source): sort ours that way.
    order = torch.argsort(edge_index[1] * 9 + edge_index[0])
    edge_index, edge_attr, attn_mask = edge_index[:, order], edge_attr[order], attn_mask[order]
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    coo_with_features = torch.sparse_coo_tensor(edge_index.flip(0), edge_attr, (9, 9, 4))
    for adjacency, features in [
        (coo_with_features, None),
        (to_torch_coo_tensor(edge_index.flip(0), size=9), edge_attr),
        (to_torch_csr_tensor(edge_index.flip(0), size=9), edge_attr),
    ]:
        h_sparse, e_sparse = conv(x, adjacency, features, attn_mask)
        assert torch.allclose(h_sparse, h, atol=1e-12)
        assert torch.allclose(e_sparse, e, atol=1e-12)


def test_the_issue_example_through_dataloader_and_batch():
    # FakeDataset(num_channels=16, edge_dim=4): 4-wide edge features into a 16-wide layer.
    dataset = FakeDataset(num_graphs=3, avg_num_nodes=12, num_channels=16, edge_dim=4)
    conv = EdgeNodeConv(16, 16, edge_dim=4, heads=4).double().eval()
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    h, e = conv(batch.x.double(), batch.edge_index, batch.edge_attr.double())
    assert h.shape == (batch.num_nodes, 16) and e.shape == (batch.num_edges, 16)
    assert global_mean_pool(h, batch.batch).shape == (3, 16)
    for index, data in enumerate(batch.to_data_list()):
        h_alone, e_alone = conv(data.x.double(), data.edge_index, data.edge_attr.double())
        edges = slice(*batch._slice_dict["edge_index"][index : index + 2].tolist())
        assert torch.allclose(h[batch.batch == index], h_alone, atol=1e-12)
        assert torch.allclose(e[edges], e_alone, atol=1e-12)


def test_in_pyg_sequential():
    x, edge_index, edge_attr, attn_mask = graph(8, 30, 16, 4)
    first = EdgeNodeConv(16, 32, edge_dim=4, heads=4).double().eval()
    second = EdgeNodeConv(32, 32, edge_dim=32, heads=4).double().eval()
    model = Sequential(
        "x, edge_index, edge_attr, attn_mask",
        [
            (first, "x, edge_index, edge_attr, attn_mask -> x, edge_attr"),
            (second, "x, edge_index, edge_attr, attn_mask -> x, edge_attr"),
        ],
    )
    h, e = model(x, edge_index, edge_attr, attn_mask)
    h_1, e_1 = first(x, edge_index, edge_attr, attn_mask)
    expected = second(h_1, edge_index, e_1, attn_mask)
    assert torch.equal(h, expected[0]) and torch.equal(e, expected[1])


def test_compiles_with_other_widths_and_attention_weights():
    torch._dynamo.reset()
    conv = EdgeNodeConv(8, 12, edge_dim=4, heads=3).eval()
    x, edge_index, edge_attr, attn_mask = graph(6, 20, 8, 4, dtype=torch.float32)
    (h, e), (_, alpha) = conv(x, edge_index, edge_attr, attn_mask, return_attention_weights=True)
    compiled = torch.compile(conv, backend="aot_eager")
    (h_c, e_c), (_, alpha_c) = compiled(
        x, edge_index, edge_attr, attn_mask, return_attention_weights=True
    )
    assert torch.allclose(h_c, h, atol=1e-5) and torch.allclose(e_c, e, atol=1e-5)
    assert torch.allclose(alpha_c, alpha, atol=1e-6)


def wrong_inputs():
    x, edge_index, edge_attr, attn_mask = graph(6, 20, 8, 4, dtype=torch.float32)
    num_edges = edge_index.size(1)
    out_of_range = edge_index.clone()
    out_of_range[1, 0] = 6
    negative = edge_index.clone()
    negative[0, 0] = -1
    return [
        ("edge_attr width", (x, edge_index, edge_attr[:, :3], attn_mask),
         rf"edge_attr must have shape \({num_edges}, 4\), one row per edge, got \({num_edges}, 3"),
        ("edge_attr rows", (x, edge_index, edge_attr[1:], attn_mask),
         rf"edge_attr must have shape \({num_edges}, 4\)"),
        ("edge_attr missing", (x, edge_index, None, attn_mask),
         rf"edge_attr of shape \({num_edges}, 4\) is required"),
        ("edge_index out of range", (x, out_of_range, edge_attr, attn_mask),
         r"edge_index must index the 6 rows of x \(0 to 5\), but it holds 0 to 6"),
        ("edge_index negative", (x, negative, edge_attr, attn_mask),
         r"edge_index must index the 6 rows of x \(0 to 5\), but it holds -1 to"),
        ("edge_index shape", (x, edge_index.t(), edge_attr, attn_mask),
         r"edge_index must be a torch.long tensor of shape \(2, num_edges\)"),
        ("edge_index dtype", (x, edge_index.float(), edge_attr, attn_mask),
         r"edge_index must be a torch.long tensor .* got torch.float32"),
        ("attn_mask length", (x, edge_index, edge_attr, attn_mask[1:]),
         rf"attn_mask must be a bool tensor of shape \({num_edges},\), one entry per edge"),
        ("attn_mask dtype", (x, edge_index, edge_attr, attn_mask.long()),
         rf"attn_mask must be a bool tensor of shape \({num_edges},\).*got torch.int64"),
        ("x width", (x[:, :5], edge_index, edge_attr, attn_mask),
         r"x must have shape \(num_nodes, 8\), got \(6, 5\)"),
        ("bipartite x", ((x, x), edge_index, edge_attr, attn_mask),
         r"x must be one tensor of node features.*bipartite \(x_source, x_target\) pairs"),
        ("sparse adjacency size", (x, to_torch_coo_tensor(edge_index, size=7), edge_attr, None),
         r"the sparse adjacency must have shape \(6, 6\) to match x, got \(7, 7\)"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", wrong_inputs(), ids=lambda case: case[0])
def test_wrong_inputs_raise_one_clear_error(case):
    _, args, message = case
    conv = EdgeNodeConv(8, 16, edge_dim=4, heads=4)
    with pytest.raises(ValueError, match="^EdgeNodeConv: " + message):
        conv(*args)


def test_edge_attr_without_edge_dim_is_refused():
    x, edge_index, edge_attr, _ = graph(6, 20, 8, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="built with edge_dim=None.*edge_dim=4"):
        EdgeNodeConv(8, 16)(x, edge_index, edge_attr)


def test_update_edges_checks_its_node_features():
    conv = EdgeNodeConv(8, 16, edge_dim=4, heads=4)
    x, edge_index, edge_attr, _ = graph(6, 20, 8, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"h must have shape \(num_nodes, 16\)"):
        conv.update_edges(x, edge_index, edge_attr)


@pytest.mark.parametrize(
    "args,message",
    [
        ((16, 12, None, 5), r"out_channels \(12\) must be divisible by heads \(5\)"),
        ((0, 16), "in_channels must be a positive int, or -1"),
        ((16, -1), "out_channels must be a positive int, got -1"),
        ((16, 16, 0), "edge_dim must be a positive int, or -1"),
    ],
)
def test_wrong_constructor_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        EdgeNodeConv(*args)
