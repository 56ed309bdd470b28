import pytest
import torch
from torch_geometric.data import Batch, Data

from gca_pyg.graph import build_batch_graph
from gca_pyg.nn import EDGE_ATTENTION, EdgeNodeConv, softmax_with_sink

from dense_reference import densify, reference_edge_node_conv

CHANNELS = 16


def make_conv(device="cpu", dtype=torch.float64, **kwargs):
    conv = EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS, heads=4, **kwargs).to(
        device=device, dtype=dtype
    )
    return conv.eval()


def random_graph(num_nodes, num_edges, device="cpu", dtype=torch.float64):
    edge_index = torch.randint(num_nodes, (2, num_edges), device=device)
    edge_index = torch.unique(edge_index, dim=1)  # the dense reference holds one edge per pair
    x = torch.randn(num_nodes, CHANNELS, device=device, dtype=dtype)
    edge_attr = torch.randn(edge_index.size(1), CHANNELS, device=device, dtype=dtype)
    attn_mask = torch.rand(edge_index.size(1), device=device) < 0.7
    return x, edge_index, edge_attr, attn_mask


def test_repr_and_shapes():
    conv = EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS, heads=4)
    assert str(conv) == "EdgeNodeConv(16, 16, edge_dim=16, heads=4, dropout=0.1, ffn_ratio=4)"
    x, edge_index, edge_attr, attn_mask = random_graph(6, 20, dtype=torch.float32)
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    assert h.shape == x.shape and e.shape == edge_attr.shape


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match="divisible by heads"):
        EdgeNodeConv(10, 10, edge_dim=10, heads=4)


def test_softmax_with_sink_by_hand():
    score = torch.tensor([[0.0], [1.0], [2.0], [float("-inf")]])
    index = torch.tensor([0, 0, 1, 2])
    alpha = softmax_with_sink(score, index, num_nodes=4)
    e = torch.e
    expected = torch.tensor([[1 / (2 + e)], [e / (2 + e)], [e**2 / (1 + e**2)], [0.0]])
    assert torch.allclose(alpha, expected)
    # Large logits stay finite (max subtraction), and the sink keeps the sum below 1.
    alpha = softmax_with_sink(torch.tensor([[1000.0], [1000.0]]), torch.tensor([0, 0]), 1)
    assert torch.allclose(alpha, torch.full((2, 1), 0.5))


def test_matches_dense_statement_of_the_spec_on_a_sparse_graph(device):
    conv = make_conv(device)
    num_nodes = 9
    # Drawn on the CPU, whose random stream is the one this graph was chosen from.
    graph = random_graph(num_nodes, 30)
    x, edge_index, edge_attr, attn_mask = (tensor.to(device) for tensor in graph)
    # Some nodes have no in-edges at all, and node 8 has only masked in-edges.
    assert (torch.bincount(edge_index[1], minlength=num_nodes) == 0).any()
    attn_mask[edge_index[1] == 8] = False
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    dense, adjacency, attention = densify(num_nodes, edge_index, edge_attr, attn_mask)
    h_ref, e_ref = reference_edge_node_conv(conv, x, dense, adjacency, attention)
    assert torch.allclose(h, h_ref, atol=1e-10)
    assert torch.allclose(e, e_ref[edge_index[0], edge_index[1]], atol=1e-10)


def test_matches_dense_statement_with_trained_layer_norms():
    # Fresh LayerNorms are the identity map (weight 1, bias 0); the layer folds the edge FFN's
    # LayerNorm into the next linear layer, which only a non-trivial affine map checks.
    conv = make_conv()
    with torch.no_grad():
        for module in conv.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1.0, 1.0)
    num_nodes = 7
    x, edge_index, edge_attr, attn_mask = random_graph(num_nodes, 25)
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    dense, adjacency, attention = densify(num_nodes, edge_index, edge_attr, attn_mask)
    h_ref, e_ref = reference_edge_node_conv(conv, x, dense, adjacency, attention)
    assert torch.allclose(h, h_ref, atol=1e-10)
    assert torch.allclose(e, e_ref[edge_index[0], edge_index[1]], atol=1e-10)


def test_masked_edges_carry_no_attention(device):
    conv = make_conv(device)
    # 0 -> 2 masked, 1 -> 2 unmasked; node 0 reaches node 2 only through the masked edge.
    edge_index = torch.tensor([[0, 1, 2], [2, 2, 0]], device=device)
    attn_mask = torch.tensor([False, True, True], device=device)
    x = torch.randn(3, CHANNELS, dtype=torch.float64, device=device)
    edge_attr = torch.randn(3, CHANNELS, dtype=torch.float64, device=device)
    h, _ = conv(x, edge_index, edge_attr, attn_mask)

    through_masked = x.clone()
    through_masked[0] += 5.0
    h_masked, _ = conv(through_masked, edge_index, edge_attr, attn_mask)
    assert torch.equal(h_masked[2], h[2])

    through_unmasked = x.clone()
    through_unmasked[1] += 5.0
    h_unmasked, _ = conv(through_unmasked, edge_index, edge_attr, attn_mask)
    assert not torch.allclose(h_unmasked[2], h[2])


def test_node_without_attention_messages_gets_none():
    conv = make_conv()
    x = torch.randn(3, CHANNELS, dtype=torch.float64)
    masked = conv(
        x,
        torch.tensor([[0], [1]]),
        torch.randn(1, CHANNELS, dtype=torch.float64),
        torch.tensor([False]),
    )
    no_edges = conv(
        x, torch.empty(2, 0, dtype=torch.long), torch.empty(0, CHANNELS, dtype=torch.float64)
    )
    # Node 1's only in-edge is masked: it fares exactly like a node with no edges at all.
    assert torch.allclose(masked[0][1], no_edges[0][1], atol=1e-12)
    assert torch.allclose(masked[0][2], no_edges[0][2], atol=1e-12)
    assert torch.isfinite(masked[0]).all() and torch.isfinite(masked[1]).all()


def test_node_permutation_equivariance():
    conv = make_conv()
    num_nodes = 8
    x, edge_index, edge_attr, attn_mask = random_graph(num_nodes, 40)
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    perm = torch.randperm(num_nodes)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(num_nodes)
    edge_perm = torch.randperm(edge_index.size(1))
    h_p, e_p = conv(
        x[perm], inverse[edge_index][:, edge_perm], edge_attr[edge_perm], attn_mask[edge_perm]
    )
    assert torch.allclose(h_p, h[perm], atol=1e-10)
    assert torch.allclose(e_p, e[edge_perm], atol=1e-10)


def test_batch_of_two_graphs_equals_each_graph_alone(device):
    conv = make_conv(device)
    graphs = []
    for num_nodes, num_edges in [(5, 12), (7, 25)]:
        x, edge_index, edge_attr, attn_mask = random_graph(num_nodes, num_edges, device)
        graphs.append(Data(x=x, edge_index=edge_index, edge_attr=edge_attr, attn_mask=attn_mask))
    batch = Batch.from_data_list(graphs)
    h, e = conv(batch.x, batch.edge_index, batch.edge_attr, batch.attn_mask)
    for index, graph in enumerate(graphs):
        h_alone, e_alone = conv(graph.x, graph.edge_index, graph.edge_attr, graph.attn_mask)
        node_slice = batch.batch == index
        edge_slice = slice(
            batch._slice_dict["edge_index"][index], batch._slice_dict["edge_index"][index + 1]
        )
        assert torch.allclose(h[node_slice], h_alone, atol=1e-12)
        assert torch.allclose(e[edge_slice], e_alone, atol=1e-12)


def test_flow_target_to_source_equals_flipped_edges():
    x, edge_index, edge_attr, attn_mask = random_graph(6, 20)
    forward_flow = make_conv()
    reverse_flow = make_conv(flow="target_to_source")
    reverse_flow.load_state_dict(forward_flow.state_dict())
    expected = forward_flow(x, edge_index, edge_attr, attn_mask)
    actual = reverse_flow(x, edge_index.flip(0), edge_attr, attn_mask)
    assert torch.allclose(actual[0], expected[0]) and torch.allclose(actual[1], expected[1])


def test_symmetric_edges_stay_symmetric_on_the_complete_graph():
    conv = make_conv()
    z = torch.randn(6, CHANNELS, dtype=torch.float64)
    data = build_batch_graph(z, torch.tensor([0, 0, 1, 1, 2, 2]))
    h, e = data.x, data.edge_attr
    for _ in range(2):
        h, e = conv(h, data.edge_index, e, data.neg_mask)
        dense = e.view(6, 6, CHANNELS)
        assert torch.allclose(dense, dense.transpose(0, 1), atol=1e-12)


def test_undirected_storage_equals_directed(device):
    conv = make_conv(device)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2], device=device)
    z = torch.randn(9, CHANNELS, device=device, dtype=torch.float64)
    directed = build_batch_graph(z, y)
    undirected = build_batch_graph(z, y, undirected=True)
    h, e = conv(directed.x, directed.edge_index, directed.edge_attr, directed.neg_mask)
    h_u, e_u = conv(
        undirected.x,
        undirected.edge_index,
        undirected.edge_attr,
        undirected.neg_mask,
        undirected=True,
    )
    assert torch.allclose(h_u, h, atol=1e-12)
    i, j = undirected.edge_index
    dense = e.view(9, 9, CHANNELS)
    assert torch.allclose(e_u, dense[i, j], atol=1e-12)
    assert torch.allclose(e_u, dense[j, i], atol=1e-12)


def test_every_parameter_receives_a_gradient(device):
    conv = (
        EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS, heads=4, dropout=0.1).to(device).train()
    )
    x, edge_index, edge_attr, attn_mask = random_graph(8, 40, device, dtype=torch.float32)
    h, e = conv(x, edge_index, edge_attr, attn_mask)
    (h.square().sum() + e.square().sum()).backward()
    for name, parameter in conv.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_edge_attention_dropout_acts_in_training_only():
    # With p = 1 training drops both attention coefficients of every edge: the edge update keeps
    # only its residual path, e <- LN(GELU(e)), then the FFN block. Evaluation ignores dropout.
    x, edge_index, edge_attr, attn_mask = random_graph(8, 40)
    dropped = make_conv(dropout=1.0)
    kept = make_conv(dropout=0.0)
    kept.load_state_dict(dropped.state_dict())

    h_eval, e_eval = dropped(x, edge_index, edge_attr, attn_mask)
    h_kept, e_kept = kept(x, edge_index, edge_attr, attn_mask)
    assert torch.equal(h_eval, h_kept) and torch.equal(e_eval, e_kept)

    h_train, e_train = dropped.train()(x, edge_index, edge_attr, attn_mask)
    residual = dropped.norm_edge_attention(torch.nn.functional.gelu(edge_attr))
    expected = dropped.norm_edge_ffn(
        torch.nn.functional.gelu(residual + dropped.edge_ffn(residual))
    )
    assert torch.allclose(e_train, expected, atol=1e-12)
    assert not torch.allclose(e_train, e_eval, atol=1e-3)
    assert torch.equal(h_train, h_eval)  # the node update has no dropout


def test_reset_parameters_resets_every_submodule():
    conv = EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS, heads=4)
    with torch.no_grad():
        for parameter in conv.parameters():
            parameter.fill_(3.0)
    conv.reset_parameters()
    for name, parameter in conv.named_parameters():
        assert not torch.all(parameter == 3.0), name


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.cuda)])
def test_compiles(backend):
    # Inductor generates and builds kernels (Triton on CUDA): seconds to minutes, so it is timed on
    # the GPU only, where it is what a user would compile with.
    device = "cuda" if backend == "inductor" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("inductor is compiled on CUDA only")
    torch._dynamo.reset()
    conv = EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS, heads=4).to(device).eval()
    x, edge_index, edge_attr, attn_mask = random_graph(6, 20, device, dtype=torch.float32)
    expected = conv(x, edge_index, edge_attr, attn_mask)
    compiled = torch.compile(conv, backend=backend)
    actual = compiled(x, edge_index, edge_attr, attn_mask)
    assert torch.allclose(actual[0], expected[0], atol=1e-5)
    assert torch.allclose(actual[1], expected[1], atol=1e-5)


@pytest.mark.parametrize("edge_attention", EDGE_ATTENTION)
def test_undirected_storage_of_a_sparse_graph_equals_both_directions(edge_attention):
    conv = make_conv(edge_attention=edge_attention)
    num_nodes = 8
    pairs = torch.unique(torch.sort(torch.randint(num_nodes, (2, 20)), dim=0).values, dim=1)
    features = torch.randn(pairs.size(1), CHANNELS, dtype=torch.float64)
    mask = torch.rand(pairs.size(1)) < 0.7
    off_diagonal = pairs[0] != pairs[1]
    directed = torch.cat([pairs, pairs[:, off_diagonal].flip(0)], dim=1)
    x = torch.randn(num_nodes, CHANNELS, dtype=torch.float64)
    h, e = conv(
        x,
        directed,
        torch.cat([features, features[off_diagonal]]),
        torch.cat([mask, mask[off_diagonal]]),
    )
    h_u, e_u = conv(x, pairs, features, mask, undirected=True)
    assert torch.allclose(h_u, h, atol=1e-12)
    assert torch.allclose(e_u, e[: pairs.size(1)], atol=1e-12)


def test_undirected_storage_with_a_repeated_pair_is_not_taken_for_complete():
    # 4 nodes, 10 columns as in the complete graph, but {0, 1} twice and {2, 3} missing.
    conv = make_conv()
    pairs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 2, 3, 1, 2, 3, 2, 3]])
    features = torch.randn(10, CHANNELS, dtype=torch.float64)
    features[2] = features[1]
    x = torch.randn(4, CHANNELS, dtype=torch.float64)
    off_diagonal = pairs[0] != pairs[1]
    directed = torch.cat([pairs, pairs[:, off_diagonal].flip(0)], dim=1)
    h, _ = conv(x, directed, torch.cat([features, features[off_diagonal]]))
    h_u, _ = conv(x, pairs, features, undirected=True)
    assert torch.allclose(h_u, h, atol=1e-12)
