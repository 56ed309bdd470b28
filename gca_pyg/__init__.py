"""gca_pyg: Globally Correlation-Aware Hard Negative Generation (GCA-HNG) on PyTorch Geometric."""

import warnings

# PyTorch Geometric still calls torch.jit.script at import time, which torch >= 2.9 deprecates with
# a FutureWarning on every start; it is not ours to fix, and not our users' to read.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
)

__version__ = "0.3.0.dev0"
