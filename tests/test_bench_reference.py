"""benchmarks/bench_reference.py: its shims, its skip without the authors' code, and the check of
their step, given a checkout of https://github.com/PWenJay/GCA-HNG in GCA_HNG_REFERENCE."""

import importlib
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCHMARKS)
    try:
        yield importlib.import_module("bench_reference")
    finally:
        sys.path.remove(BENCHMARKS)


def test_skips_without_a_reference(bench, monkeypatch, capsys, tmp_path):
    for argv in ([], ["--reference", str(tmp_path)]):
        monkeypatch.setattr(sys, "argv", ["bench_reference.py", *argv])
        bench.main()
        out = capsys.readouterr().out
        assert out.startswith("skipped: ") and "https://github.com/PWenJay/GCA-HNG" in out
        assert len(out.splitlines()) == 1


def test_scatter_standin_is_torch_scatter(bench):
    """Sums, means and maxima (with torch_scatter's arg-max and its empty segments) by hand."""
    scatter = bench.torch_scatter_standin()
    src = torch.randn(3, 7, 2)
    src[:, 1] = src[:, 0]  # a tie: the arg-max is the first
    index = torch.tensor([0, 0, 2, 2, 2, 4, 0])
    for dim in (1, -2):
        total = scatter.scatter_add(src, index, dim=dim, dim_size=6)
        mean = scatter.scatter_mean(src, index, dim=dim, dim_size=6)
        values, argmax = scatter.scatter_max(src, index, dim=dim, dim_size=6)
        for segment in range(6):
            members = (index == segment).nonzero().flatten()
            if len(members) == 0:
                assert (total[:, segment] == 0).all() and (values[:, segment] == 0).all()
                assert (argmax[:, segment] == 7).all()
                continue
            part = src[:, members]
            torch.testing.assert_close(total[:, segment], part.sum(1))
            torch.testing.assert_close(mean[:, segment], part.mean(1))
            torch.testing.assert_close(values[:, segment], part.max(1).values)
            assert (argmax[:, segment] == members[part.max(1).indices]).all()
    edges = torch.randn(9, 4)
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    torch.testing.assert_close(scatter.scatter_add(edges, rows, dim=0), edges.view(3, 3, 4).sum(1))
    with pytest.raises(NotImplementedError):
        scatter.scatter_add(edges, rows, dim=0, out=torch.zeros(3, 4))


def this_line() -> str:
    """The caller's site, as RedirectCuda records it."""
    return f"test_bench_reference.py:{sys._getframe(1).f_lineno}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the redirect is only used without CUDA")
@pytest.mark.filterwarnings("ignore:torch.range is deprecated")
def test_redirect_catches_every_cuda_request(bench):
    redirect = bench.RedirectCuda(torch.device("cpu"), os.path.dirname(__file__))
    x = torch.ones(3)
    made, sites = [], set()
    with redirect:
        made.append(torch.zeros(2, device="cuda")), sites.add(this_line())
        made.append(torch.ones_like(x, device=torch.device("cuda"))), sites.add(this_line())
        made.append(torch.tensor([1.0], device="cuda:0")), sites.add(this_line())
        made.append(torch.range(0, 2, device="cuda")), sites.add(this_line())  # bypasses modes
        made.append(x.cuda()), sites.add(this_line())
        made.append(x.to("cuda")), sites.add(this_line())
        made.append(x.to(device="cuda")), sites.add(this_line())
        made.append(torch.nn.Linear(2, 2).cuda().weight)  # Tensor.cuda is called inside torch
        made.append(torch.zeros(2, device="cpu")), sites.add(f"not {this_line()}")
    assert all(t.device.type == "cpu" for t in made)
    assert torch.range is redirect._range  # unwrapped again
    here = {site for site in redirect.sites if site.startswith("test_bench_reference.py:")}
    assert here == {site for site in sites if not site.startswith("not ")}


def test_reference_step_is_the_full_update(bench):
    reference = os.environ.get("GCA_HNG_REFERENCE")
    if bench.reference_problem(reference):
        pytest.skip(
            "set GCA_HNG_REFERENCE to a checkout of https://github.com/PWenJay/GCA-HNG "
            f"({bench.reference_problem(reference)})"
        )
    from common import measure_in_child

    config = {
        "impl": "check",
        "device": "cpu",
        "dim": 64,
        "per_class": 3,
        "num_nodes": 12,
        "reference": os.path.abspath(reference),
        "malloc": "system",
        "repeats": 1,
    }
    result = measure_in_child(os.path.join(BENCHMARKS, "bench_reference.py"), config)
    assert "error" not in result, result
    assert len(result["moved"]) == 5
    if not torch.cuda.is_available():
        assert any(site.startswith("scripts/utils.py:") for site in result["sites"])
