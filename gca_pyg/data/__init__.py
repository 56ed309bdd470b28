"""Datasets, transforms and the class-balanced batch sampler."""

from __future__ import annotations

from .sampler import ClassBalancedBatchSampler

__all__ = ["ClassBalancedBatchSampler"]
