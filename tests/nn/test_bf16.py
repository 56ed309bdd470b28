import pytest
import torch
from torch.overrides import TorchFunctionMode

from gca_pyg.graph import build_batch_graph
from gca_pyg.nn import EDGE_ATTENTION, CorrelationNet, EdgeNodeConv

CHANNELS = 32


def relative_error(value, reference):
    reference = reference.detach()
    return float((value.detach().float() - reference).norm() / reference.norm())


class EdgeDtypes(TorchFunctionMode):
    """Records the dtype of every floating tensor with a row per edge that a torch call returns."""

    def __init__(self, num_edges):
        super().__init__()
        self.num_edges = num_edges
        self.dtypes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        for tensor in outputs:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.is_floating_point()
                and tensor.dim() > 0
                and tensor.size(0) == self.num_edges
            ):
                self.dtypes.append((getattr(func, "__name__", str(func)), tensor.dtype))
        return out


def test_edge_update_stays_in_bf16_under_autocast(device):
    conv = EdgeNodeConv(CHANNELS, CHANNELS, edge_dim=CHANNELS, heads=4).to(device)
    z = torch.randn(15, CHANNELS, device=device)
    labels = torch.arange(5, device=device).repeat_interleave(3)
    graph = build_batch_graph(z, labels, undirected=True)
    num_edges = graph.edge_index.size(1)
    assert graph.edge_attr.dtype == torch.float32
    with torch.autocast(device.type, dtype=torch.bfloat16):
        h = conv.update_nodes(
            graph.x, graph.edge_index, graph.edge_attr, graph.neg_mask, undirected=True
        )
        with EdgeDtypes(num_edges) as recorded:
            edge_attr = conv.update_edges(h, graph.edge_index, graph.edge_attr)
    assert edge_attr.dtype == torch.bfloat16
    assert len(recorded.dtypes) > 10  # every edge op of the update was seen
    assert {dtype for _, dtype in recorded.dtypes} == {torch.bfloat16}, recorded.dtypes
    # Without autocast nothing changes.
    assert conv.update_edges(h.float(), graph.edge_index, graph.edge_attr).dtype == torch.float32


@pytest.mark.parametrize("edge_attention", EDGE_ATTENTION)
@pytest.mark.parametrize("undirected", [False, True])
def test_edge_node_conv_in_bf16_matches_fp32_within_bf16_tolerance(
    undirected, edge_attention, device
):
    conv = EdgeNodeConv(
        CHANNELS, CHANNELS, edge_dim=CHANNELS, heads=4, dropout=0.0, edge_attention=edge_attention
    ).to(device)
    graph = build_batch_graph(
        torch.randn(15, CHANNELS, device=device),
        torch.arange(5, device=device).repeat_interleave(3),
        undirected=undirected,
    )
    x = graph.x.clone().requires_grad_()
    # Edge features as large as the node features, so that their own rounding counts.
    edge_attr = torch.randn_like(graph.edge_attr).requires_grad_()
    node_weight, edge_weight = torch.randn_like(x), torch.randn_like(edge_attr)

    def run(enabled):
        conv.zero_grad()
        x.grad = edge_attr.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            h, e = conv(x, graph.edge_index, edge_attr, graph.neg_mask, undirected=undirected)
        ((h.float() * node_weight).sum() + (e.float() * edge_weight).sum()).backward()
        parameter_grad = torch.cat([p.grad.flatten() for p in conv.parameters()])
        return h.detach(), e.detach(), x.grad, edge_attr.grad, parameter_grad

    reference = [t.clone() for t in run(False)]
    h, e, x_grad, edge_grad, parameter_grad = run(True)
    assert e.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (2^-9 relative rounding); one layer of it measures 0.5 to 1.3%.
    assert relative_error(h, reference[0]) < 0.015
    assert relative_error(e, reference[1]) < 0.015
    assert relative_error(x_grad, reference[2]) < 0.025
    assert relative_error(edge_grad, reference[3]) < 0.025
    assert relative_error(parameter_grad, reference[4]) < 0.025


@pytest.mark.parametrize("undirected", [False, True])
def test_correlation_net_in_bf16_matches_fp32_within_bf16_tolerance(undirected, device):
    net = CorrelationNet(CHANNELS, num_classes=5, num_layers=2, heads=4, dropout=0.0)
    net = net.to(device)
    z = torch.randn(15, CHANNELS, device=device)
    y = torch.arange(5, device=device).repeat_interleave(3)

    def run(enabled):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
            graph = build_batch_graph(z, y, undirected=undirected)
            return net(
                graph.x, graph.edge_index, graph.edge_attr, graph.neg_mask, undirected=undirected
            )

    logits_reference, fusion_reference = run(False)
    logits, fusion = run(True)
    assert relative_error(logits, logits_reference) < 0.04
    assert relative_error(fusion, fusion_reference) < 0.02
