"""Deterministic stand-ins for trained weights and images, the same on every machine and version:
each tensor's values are the raw 64-bit output of NumPy's PCG64 bit generator (whose stream NumPy
keeps stable across versions) seeded with (seed, tensor index), mapped exactly to floats.
tests/reference/make_fixture.py runs the authors' GCA_HNG with them; tests/test_convert.py rebuilds
the identical state dict and inputs, so the fixture stores neither (only their names, shapes and
the authors' outputs)."""

import math

import numpy as np
import torch


def hashed_uniform(count: int, stream: int) -> torch.Tensor:
    """`count` float64 values in [-1, 1), the 53 high bits of PCG64's raw output for
    SeedSequence(`stream`)."""
    bits = np.random.PCG64(np.random.SeedSequence(stream)).random_raw(count)
    return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0)


def stand_in_value(key: str, shape, dtype: torch.dtype, stream: int) -> torch.Tensor:
    """A plausible trained value for the tensor `key` of a state dict: weights of Linear, conv and
    embedding tensors scaled by 1/sqrt(fan-in); norm scales near 1 and shifts near 0; running
    variances in [0.5, 1]; counters 0."""
    shape = tuple(shape)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    u = hashed_uniform(math.prod(shape), stream).view(shape)
    if key.endswith("running_var"):
        value = 0.75 + 0.25 * u
    elif key.endswith("running_mean"):
        value = 0.1 * u
    elif len(shape) >= 2:
        value = u * math.sqrt(3.0 / math.prod(shape[1:]))
    elif key.endswith("weight"):
        value = 1.0 + 0.2 * u
    else:
        value = 0.1 * u
    return value.to(dtype)


def stand_in_state_dict(manifest: dict, seed: int) -> dict:
    """``{key: tensor}`` for a manifest ``{key: (shape, dtype name)}``, in its order."""
    return {
        key: stand_in_value(key, shape, getattr(torch, dtype), seed * 100_003 + index)
        for index, (key, (shape, dtype)) in enumerate(manifest.items())
    }


def stand_in_images(count: int, size: int, seed: int) -> torch.Tensor:
    """``(count, 3, size, size)`` float32 images, normalised-like values in [-2, 2)."""
    return (2.0 * hashed_uniform(count * 3 * size * size, seed).view(count, 3, size, size)).float()


def manifest_of(state_dict: dict) -> dict:
    """The names, shapes and dtypes of a state dict."""
    return {
        key: (list(value.shape), str(value.dtype).removeprefix("torch."))
        for key, value in state_dict.items()
    }
