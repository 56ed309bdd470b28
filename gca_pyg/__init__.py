"""gca_pyg: Globally Correlation-Aware Hard Negative Generation (GCA-HNG) on PyTorch Geometric."""

__version__ = "0.1.0"
