"""Several processes train on one batch graph exactly as one process does (gloo, 2 CPUs)."""

import pytest
import torch
import torch.multiprocessing as mp

from gca_pyg.distributed import Context

import distributed_helpers as helpers


@pytest.mark.parametrize(
    "neighbors, metric, memory, edge_attention",
    # The memory run's first step has an empty memory: the sparse graph without memory nodes.
    [
        (None, "npair", 0, "none"),
        (None, "proxy_anchor", 0, "none"),
        (3, "npair", 40, "none"),
        (None, "npair", 0, "key_value"),
        (3, "pml:MultiSimilarityLoss", 0, "none"),
    ],
    ids=["complete", "proxy_anchor", "sparse_and_memory", "edge_attention", "pml_loss"],
)
def test_two_processes_train_like_one_on_the_global_batch(
    tmp_path, neighbors, metric, memory, edge_attention
):
    mp.spawn(
        helpers.worker,
        args=(2, str(tmp_path), neighbors, metric, memory, edge_attention),
        nprocs=2,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        single = helpers.train(Context(), neighbors, metric, memory, edge_attention)
    finally:
        torch.set_default_dtype(default)

    if metric == "proxy_anchor":  # the proxies trained, alike everywhere
        assert not torch.equal(single["state"]["criterion.proxies"], helpers.initial_proxies())
    for name, expected in single["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(
            ranks[0]["state"][name], expected, rtol=1e-7, atol=1e-9, msg=name
        )
    for step_single, step_ranks in zip(single["losses"], ranks[0]["losses"]):
        assert step_single.keys() == step_ranks.keys()
        for name, value in step_single.items():
            assert abs(step_ranks[name] - value) <= 1e-7 * max(1.0, abs(value)), name
    # The edge work is split: each process stores about half of the pairs, all of them together
    # (a sparse graph's class-pair blocks differ in size: a looser half).
    share = 0.1 if neighbors is None else 0.25
    for step in range(helpers.STEPS):
        counts = [ranks[rank]["edges"][step] for rank in range(2)]
        assert sum(counts) == single["edges"][step]
        assert all(
            abs(count - single["edges"][step] / 2) <= share * single["edges"][step]
            for count in counts
        )
    if memory:  # every process holds the batches' memory, and the graphs took the same nodes
        assert single["memory_nodes"][0] is None and single["memory_nodes"][-1] is not None
        for rank in ranks:
            for name, value in single["memory"].items():
                torch.testing.assert_close(
                    torch.as_tensor(rank["memory"][name]),
                    torch.as_tensor(value),
                    rtol=1e-7,
                    atol=1e-9,
                )
            for expected, actual in zip(single["memory_nodes"], rank["memory_nodes"]):
                assert (expected is None and actual is None) or torch.equal(expected, actual)
    if neighbors is not None:  # truly sparse: fewer pairs than the complete graph's
        nodes = helpers.CLASSES * helpers.SAMPLES
        assert max(single["edges"]) < nodes * (nodes + 1) // 2
