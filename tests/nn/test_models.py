"""EdgeNodeGNN, the ready stack: the layers it says, node and edge outputs, PyG's loaders."""

import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader
from torch_geometric.nn import global_mean_pool

from gca_pyg.nn import EdgeNodeGNN


def graph(num_nodes=7, num_edges=20, in_channels=6, edge_dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    edge_index = torch.randint(num_nodes, (2, num_edges), generator=generator)
    return Data(
        x=torch.randn(num_nodes, in_channels, generator=generator),
        edge_index=edge_index,
        edge_attr=torch.randn(num_edges, edge_dim, generator=generator),
    )


def test_it_is_its_layers_then_its_heads():
    torch.manual_seed(0)
    model = EdgeNodeGNN(6, 8, 3, out_channels=5, edge_dim=3, edge_out_channels=2, heads=2).eval()
    data = graph()
    x, edge_attr = model(data.x, data.edge_index, data.edge_attr)
    h, e = data.x, data.edge_attr
    for conv in model.convs:
        h, e = conv(h, data.edge_index, e)
    torch.testing.assert_close(x, model.lin(h), rtol=0, atol=0)
    torch.testing.assert_close(edge_attr, model.edge_lin(e), rtol=0, atol=0)
    assert x.shape == (7, 5) and edge_attr.shape == (20, 2)
    assert [conv.edge_attention for conv in model.convs] == ["bias"] * 3
    assert [conv.edge_dim for conv in model.convs] == [3, 8, 8]


@pytest.mark.parametrize("jk", [None, "last", "cat", "max", "lstm"])
def test_jumping_knowledge_over_node_and_edge_features(jk):
    torch.manual_seed(0)
    model = EdgeNodeGNN(6, 8, 2, edge_dim=3, jk=jk, heads=2).eval()
    data = graph()
    x, edge_attr = model(data.x, data.edge_index, data.edge_attr)
    assert x.shape == (7, 8) and edge_attr.shape == (20, 8)
    assert model.out_channels == model.edge_out_channels == 8
    if jk == "max":  # the elementwise maximum of the layers' features
        h1, e1 = model.convs[0](data.x, data.edge_index, data.edge_attr)
        h2, e2 = model.convs[1](h1, data.edge_index, e1)
        torch.testing.assert_close(x, torch.maximum(h1, h2))
        torch.testing.assert_close(edge_attr, torch.maximum(e1, e2))
    if jk == "cat":
        assert model.lin.in_channels == model.edge_lin.in_channels == 16
    if jk == "lstm":  # nodes and edges each have their own LSTM
        assert model.edge_jk is not model.jk
        assert not set(map(id, model.jk.parameters())) & set(map(id, model.edge_jk.parameters()))


def test_without_edge_outputs_the_last_edge_update_is_skipped():
    torch.manual_seed(0)
    with_edges = EdgeNodeGNN(6, 8, 2, out_channels=3, edge_dim=3, heads=2)
    torch.manual_seed(0)
    nodes_only = EdgeNodeGNN(6, 8, 2, out_channels=3, edge_dim=3, edge_out_channels=0, heads=2)
    assert nodes_only.edge_lin is None and nodes_only.edge_out_channels == 0
    data = graph()
    x, edge_attr = nodes_only.eval()(data.x, data.edge_index, data.edge_attr)
    assert edge_attr is None
    torch.testing.assert_close(x, with_edges.eval()(data.x, data.edge_index, data.edge_attr)[0])

    def edge_update(*args):
        raise AssertionError("the last layer's edge update ran")

    nodes_only.convs[-1]._update_edges = edge_update
    nodes_only(data.x, data.edge_index, data.edge_attr)


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    model = EdgeNodeGNN(6, 8, 2, edge_dim=3, dropout=0.5, heads=2, attention_dropout=0.0)
    assert all(conv.dropout == 0.0 for conv in model.convs)  # attention_dropout reached them
    data = graph()
    eval_out = model.eval()(data.x, data.edge_index, data.edge_attr)
    first, second = model.convs
    h, e = first(data.x, data.edge_index, data.edge_attr)
    torch.testing.assert_close(eval_out[1], second(h, data.edge_index, e)[1], rtol=0, atol=0)
    # Training: nodes, then edges, dropped between the layers (not after the last).
    model.train()
    torch.manual_seed(1)
    train_out = model(data.x, data.edge_index, data.edge_attr)
    torch.manual_seed(1)
    h, e = first(data.x, data.edge_index, data.edge_attr)
    h, e = torch.nn.functional.dropout(h, 0.5), torch.nn.functional.dropout(e, 0.5)
    expected = second(h, data.edge_index, e)
    torch.testing.assert_close(train_out[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(train_out[1], expected[1], rtol=0, atol=0)
    assert not torch.allclose(train_out[1], eval_out[1])


def test_graph_and_edge_tasks_through_the_dataloader():
    torch.manual_seed(0)
    graphs = [graph(seed=seed) for seed in range(4)]
    for data in graphs:
        data.y = torch.tensor([1])
    batch = next(iter(DataLoader(graphs, batch_size=4)))
    model = EdgeNodeGNN(6, 8, 2, out_channels=3, edge_dim=3, edge_out_channels=4, heads=2)
    x, edge_attr = model(batch.x, batch.edge_index, batch.edge_attr)
    assert global_mean_pool(x, batch.batch).shape == (4, 3)
    assert edge_attr.shape == (batch.num_edges, 4)
    loss = torch.nn.functional.cross_entropy(global_mean_pool(x, batch.batch), batch.y)
    (loss + edge_attr.square().mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name


def test_lazy_inputs_and_correlation_edges():
    model = EdgeNodeGNN(-1, 8, 2, heads=2)  # edge_dim None: correlation edge features
    data = graph(in_channels=8)
    x, edge_attr = model(data.x, data.edge_index)
    assert x.shape == (7, 8) and edge_attr.shape == (20, 8)
    lazy = EdgeNodeGNN(-1, 8, 2, edge_dim=-1, heads=2)
    x, _ = lazy(data.x[:, :5], data.edge_index, data.edge_attr)
    assert lazy.convs[0].in_channels == -1 and x.shape == (7, 8)


def test_reset_parameters_and_repr():
    model = EdgeNodeGNN(6, 8, 2, out_channels=3, edge_dim=3, jk="lstm", heads=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(3.0)
    model.reset_parameters()
    for name, parameter in model.named_parameters():
        assert not torch.all(parameter == 3.0), name
    assert repr(model) == (
        "EdgeNodeGNN(6, 3, num_layers=2, edge_dim=3, edge_out_channels=8, edge_attention=bias)"
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_layers": 0}, "num_layers must be a positive int"),
        ({"jk": "sum"}, "jk must be one of None, last, cat, max, lstm"),
        ({"out_channels": 0}, "out_channels must be None or positive"),
        ({"edge_out_channels": -1}, "edge_out_channels must be None or an int >= 0"),
        ({"edge_attention": "mult"}, "edge_attention must be one of"),
        ({"hidden_channels": 10}, "divisible by heads"),
    ],
)
def test_wrong_arguments_are_one_clear_error(kwargs, message):
    arguments = {"in_channels": 6, "hidden_channels": 8, "num_layers": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        EdgeNodeGNN(**arguments)
