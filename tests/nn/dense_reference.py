"""A literal, dense re-statement of one EdgeNodeConv (docs/method.md, "One layer"), used to check
the layer.

It shares no code with gca_pyg.nn: every step follows the documented formulas on dense [N, N]
tensors (including the per-edge query projection that the layer folds into the node keys).
"""

import math

import torch
import torch.nn.functional as F


def linear(layer, x):
    return x @ layer.weight.T + layer.bias


def skip(layer, x):
    """A residual projection without bias, or the identity where the layer has none."""
    return x if layer is None else x @ layer.weight.T


def reference_edge_node_conv(conv, x, edge_dense, adjacency, attention):
    """One layer in eval mode, with any of its ``edge_attention`` options.

    Args:
        conv: an EdgeNodeConv (its parameters are used).
        x: [N, F_in] node features.
        edge_dense: [N, N, F_e], edge_dense[i, j] the features of edge i -> j (source i, target j).
        adjacency: [N, N] bool, adjacency[i, j] True where edge i -> j exists.
        attention: [N, N] bool, True where edge i -> j carries attention.
    Returns:
        (h [N, F_out], edge_dense_new [N, N, F_out]); entries of absent edges are meaningless.
    """
    num_nodes, channels = x.size(0), conv.out_channels
    heads = conv.heads
    head = channels // heads
    q = linear(conv.lin_query, x).view(num_nodes, heads, head)
    k = linear(conv.lin_key, x).view(num_nodes, heads, head)
    v = linear(conv.lin_value, x).view(num_nodes, heads, head)
    # score[h, target i, source j]
    score = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(head)
    option = getattr(conv, "edge_attention", "none")
    if option == "key_value":  # k_j + W e_ji and v_j + W e_ji, W without bias
        projected = (edge_dense @ conv.lin_edge_attention.weight.T).view(
            num_nodes, num_nodes, heads, head
        )  # projected[j, i]: edge j -> i
        score = score + torch.einsum("ihd,jihd->hij", q, projected) / math.sqrt(head)
    elif option == "bias":  # + w_h . e_ji + b_h
        score = score + linear(conv.lin_edge_attention, edge_dense).permute(2, 1, 0)
    allowed = (adjacency & attention).T  # [target, source]
    weight = torch.where(allowed, score.exp(), torch.zeros_like(score))
    alpha = weight / (1.0 + weight.sum(dim=-1, keepdim=True))
    if option == "gate":  # alpha_ji * sigmoid(w_h . e_ji + b_h)
        alpha = alpha * torch.sigmoid(linear(conv.lin_edge_attention, edge_dense)).permute(2, 1, 0)
    message = torch.einsum("hij,jhd->ihd", alpha, v)
    if option == "key_value":
        message = message + torch.einsum("hij,jihd->ihd", alpha, projected)
    message = message.reshape(num_nodes, channels)
    h = conv.norm_attention(F.gelu(skip(conv.lin_skip, x) + linear(conv.lin_out, message)))

    to_node = F.gelu(edge_dense @ conv.lin_edge_to_node.weight.T + conv.lin_edge_to_node.bias)
    outgoing = (to_node * adjacency.unsqueeze(-1)).sum(dim=1)  # sum over targets j of edges i -> j
    h = conv.norm_edge_to_node(F.gelu(h + outgoing))
    h = conv.norm_node_ffn(F.gelu(h + conv.node_ffn(h)))

    u = F.gelu(linear(conv.lin_node_to_edge, h))
    key = linear(conv.lin_edge_key, u)
    value = linear(conv.lin_edge_value, u)
    query = edge_dense @ conv.lin_edge_query.weight.T + conv.lin_edge_query.bias  # [N, N, F]
    logit_source = (query * key[:, None, :]).sum(-1) / math.sqrt(channels)  # key of i for i -> j
    logit_target = (query * key[None, :, :]).sum(-1) / math.sqrt(channels)
    a = torch.softmax(torch.stack([logit_source, logit_target], dim=-1), dim=-1)
    mixed = a[..., :1] * value[:, None, :] + a[..., 1:] * value[None, :, :]
    e = conv.norm_edge_attention(F.gelu(mixed + skip(conv.lin_edge_skip, edge_dense)))
    e = conv.norm_edge_ffn(F.gelu(e + conv.edge_ffn(e)))
    return h, e


def densify(num_nodes, edge_index, edge_attr, attn_mask):
    """The dense inputs of reference_edge_node_conv from a graph with one edge per pair."""
    adjacency = torch.zeros(num_nodes, num_nodes, dtype=torch.bool, device=edge_index.device)
    adjacency[edge_index[0], edge_index[1]] = True
    attention = torch.zeros_like(adjacency)
    attention[edge_index[0], edge_index[1]] = attn_mask
    dense = edge_attr.new_zeros(num_nodes, num_nodes, edge_attr.size(1))
    dense[edge_index[0], edge_index[1]] = edge_attr
    return dense, adjacency, attention
