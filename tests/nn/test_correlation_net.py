import pytest
import torch

from gca_pyg.graph import build_batch_graph, to_dense_edges
from gca_pyg.nn import CorrelationNet, WeightedBatchNorm1d

CHANNELS = 16


def class_balanced(num_classes=4, per_class=3, dtype=torch.float64, device="cpu"):
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    z = torch.randn(y.numel(), CHANNELS, dtype=dtype, device=device)
    return z, y


def test_shapes_range_and_repr():
    net = CorrelationNet(CHANNELS, num_classes=5, num_layers=2, heads=4)
    assert str(net) == "CorrelationNet(16, num_classes=5, num_layers=2)"
    z, y = class_balanced(dtype=torch.float32)
    data = build_batch_graph(z, y)
    logits, fusion = net(data.x, data.edge_index, data.edge_attr, data.neg_mask)
    assert logits.shape == (12, 5)
    assert fusion.shape == (144, CHANNELS)
    assert (fusion > 0).all() and (fusion < 1).all()


def test_needs_a_layer():
    with pytest.raises(ValueError, match="at least one layer"):
        CorrelationNet(CHANNELS, 3, num_layers=0)


@pytest.mark.parametrize("training", [False, True])
def test_fast_undirected_path_equals_generic_path(training, device):
    generic = CorrelationNet(CHANNELS, 4, num_layers=2, heads=4, dropout=0.0)
    generic = generic.to(device=device, dtype=torch.float64)
    fast = CorrelationNet(CHANNELS, 4, num_layers=2, heads=4, dropout=0.0)
    fast = fast.to(device=device, dtype=torch.float64)
    fast.load_state_dict(generic.state_dict())
    generic.train(training)
    fast.train(training)
    z, y = class_balanced(device=device)
    z.requires_grad_(True)
    directed = build_batch_graph(z, y)
    undirected = build_batch_graph(z, y, undirected=True)

    logits, fusion = generic(directed.x, directed.edge_index, directed.edge_attr, directed.neg_mask)
    logits_u, fusion_u = fast(
        undirected.x,
        undirected.edge_index,
        undirected.edge_attr,
        undirected.neg_mask,
        undirected=True,
    )
    assert torch.allclose(logits_u, logits, atol=1e-10)
    dense_fusion = to_dense_edges(fusion, directed.edge_index, 12)
    dense_fusion_u = to_dense_edges(fusion_u, undirected.edge_index, 12, undirected=True)
    assert torch.allclose(dense_fusion_u, dense_fusion, atol=1e-10)

    # Same loss on the dense weights -> same gradients everywhere, running statistics included.
    weight = torch.randn_like(dense_fusion)
    grad = torch.autograd.grad(
        (dense_fusion * weight).sum() + logits.square().sum(), [z, *generic.parameters()]
    )
    grad_u = torch.autograd.grad(
        (dense_fusion_u * weight).sum() + logits_u.square().sum(), [z, *fast.parameters()]
    )
    for g, g_u in zip(grad, grad_u):
        assert torch.allclose(g_u, g, atol=1e-9)
    for name, buffer in generic.named_buffers():
        assert torch.allclose(dict(fast.named_buffers())[name], buffer, atol=1e-12), name


def test_every_parameter_receives_a_gradient(device):
    net = CorrelationNet(CHANNELS, 4, num_layers=2, heads=4).to(device).train()
    z, y = class_balanced(dtype=torch.float32, device=device)
    data = build_batch_graph(z, y, undirected=True)
    logits, fusion = net(data.x, data.edge_index, data.edge_attr, data.neg_mask, undirected=True)
    (logits.square().sum() + fusion.square().sum()).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("momentum", [0.1, None])
def test_weighted_batch_norm_equals_repeated_rows(momentum):
    rows = torch.randn(5, 3, dtype=torch.float64)
    multiplicity = torch.tensor([1, 2, 2, 1, 3])
    weighted = WeightedBatchNorm1d(3, momentum=momentum).double()
    plain = WeightedBatchNorm1d(3, momentum=momentum).double()
    with torch.no_grad():
        weighted.weight.uniform_(0.5, 1.5)
        weighted.bias.uniform_(-1, 1)
    plain.load_state_dict(weighted.state_dict())
    for _ in range(2):
        out = weighted(rows, multiplicity.double())
        expected = plain(rows.repeat_interleave(multiplicity, dim=0))
        first_copy = torch.cumsum(multiplicity, 0) - multiplicity
        assert torch.allclose(out, expected[first_copy], atol=1e-12)
    assert torch.allclose(weighted.running_mean, plain.running_mean, atol=1e-12)
    assert torch.allclose(weighted.running_var, plain.running_var, atol=1e-12)
    weighted.eval()
    plain.eval()
    assert torch.allclose(weighted(rows, multiplicity.double()), plain(rows), atol=1e-12)


def test_detach_fusion_keeps_values_and_node_gradients():
    net = CorrelationNet(CHANNELS, 4, num_layers=2, heads=4, dropout=0.0).double().eval()
    z, y = class_balanced()
    z.requires_grad_(True)
    data = build_batch_graph(z, y, undirected=True)
    args = (data.x, data.edge_index, data.edge_attr, data.neg_mask)
    logits, fusion = net(*args, undirected=True)
    logits_d, fusion_d = net(*args, undirected=True, detach_fusion=True)
    assert fusion.requires_grad and not fusion_d.requires_grad
    assert torch.equal(fusion_d, fusion.detach()) and torch.equal(logits_d, logits)
    grad = torch.autograd.grad(logits.square().sum(), z, retain_graph=True)[0]
    grad_d = torch.autograd.grad(logits_d.square().sum(), z)[0]
    assert torch.equal(grad_d, grad)
