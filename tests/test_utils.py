import torch

from gca_pyg.utils import gather_rows


def test_gather_rows_is_indexing_with_a_repeatable_backward():
    source = torch.randn(81, 512, requires_grad=True)
    index = torch.randint(0, 81, (81, 26, 3))
    upstream = torch.randn(81, 26, 3, 512)
    assert torch.equal(gather_rows(source, index), source[index])
    gradients = []
    for _ in range(5):
        source.grad = None
        gather_rows(source, index).backward(upstream)
        gradients.append(source.grad.clone())
    assert all(torch.equal(gradients[0], g) for g in gradients[1:])
    source.grad = None
    source[index].backward(upstream)
    assert torch.allclose(gradients[0], source.grad, atol=1e-4)
