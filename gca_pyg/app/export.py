"""``python -m gca_pyg.export CHECKPOINT --format torchscript|onnx --out FILE``

Exports what maps an image to its embedding — the backbone, the embedding head and the L2
normalisation, in fp32 and eval mode — as one file that runs without gca_pyg: TorchScript
(``torch.jit.load``) or ONNX (onnxruntime, TensorRT, OpenVINO, ...). The batch size is dynamic.

Input: float32 images ``(N, 3, crop, crop)``, RGB, preprocessed as the checkpoint's test transform
does (resize the shorter side, centre crop, scale to [0, 1], normalise by the ImageNet mean and
std); output: float32 ``(N, D)`` unit embeddings, whose inner products are cosine similarities.
The file carries these settings as metadata (``gca_pyg.json`` in a TorchScript archive, the
``gca_pyg`` metadata property of an ONNX model).

After writing, the file is loaded back and run on two batch sizes against the PyTorch model; the
largest absolute difference is printed (``--no-verify`` skips it). ONNX needs the ``export`` extra
(onnx, onnxscript, and onnxruntime to verify): ``pip install "gca-pyg[export]"``.
"""

import argparse
import importlib.util
import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gca_pyg import __version__
from gca_pyg.checkpoint import RunCheckpoint, open_checkpoint
from gca_pyg.errors import ConfigError, GcaError, MissingExtraError, exit_status
from gca_pyg.model import GCAHNG
from gca_pyg.pipeline import preprocessing

__all__ = ["EmbeddingModel", "export", "verify", "FORMATS"]

FORMATS = ("torchscript", "onnx")
SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript", ".pth": "torchscript"}
#: Batch sizes the exported file is checked with.
VERIFY_BATCHES = (1, 3)
#: Largest difference from PyTorch accepted when verifying.
TOLERANCE = 1e-4


class EmbeddingModel(torch.nn.Module):
    r"""The embedding path of a :class:`~gca_pyg.model.GCAHNG`: backbone, embedding head, L2 norm.

    .. math::
        \mathbf{z} = \frac{\mathrm{Linear}(\mathrm{BN}(\mathrm{backbone}(x)))}
        {\lVert \mathrm{Linear}(\mathrm{BN}(\mathrm{backbone}(x))) \rVert_2}

    What :meth:`~gca_pyg.model.GCAHNG.embed` returns with ``unit=True``, in fp32, as a plain
    module to trace: without its device move, mode switch and autocast (and its ``.float()``,
    which would add a cast to the graph), and with only the backbone's and the head's weights.

    Shapes:
        - **input:** images :math:`(N, 3, H, W)`, preprocessed
        - **output:** unit embeddings :math:`(N, D)`
    """

    def __init__(self, model: GCAHNG):
        super().__init__()
        self.backbone = model.backbone.to(memory_format=torch.contiguous_format)
        self.embedding = model.embedding

    def forward(self, images: Tensor) -> Tensor:
        return F.normalize(self.embedding(self.backbone(images)), dim=1)


def embedding_model(checkpoint: RunCheckpoint) -> EmbeddingModel:
    """The checkpoint's embedding path on the CPU in fp32, eval mode."""
    return EmbeddingModel(checkpoint.build_model(torch.device("cpu")).float()).eval()


def metadata(checkpoint: RunCheckpoint) -> dict:
    """What the exported file records about its input and output."""
    settings = preprocessing(checkpoint.config)
    crop = settings["crop"]
    return {
        "gca_pyg": __version__,
        "checkpoint": str(checkpoint.path),
        "epoch": checkpoint.epoch,
        "input": {"name": "images", "shape": ["N", 3, crop, crop], "dtype": "float32"},
        "output": {
            "name": "embeddings",
            "shape": ["N", checkpoint.config.model.embedding_size],
            "dtype": "float32",
            "normalised": True,
        },
        "preprocessing": settings,
    }


def _example(checkpoint: RunCheckpoint, batch: int, seed: int = 0) -> Tensor:
    crop = preprocessing(checkpoint.config)["crop"]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, crop, crop, generator=generator)


def export(checkpoint: RunCheckpoint, out: Path, format: str) -> EmbeddingModel:
    """Writes the embedding path of `checkpoint` to `out` as `format` (``torchscript`` or
    ``onnx``) with a dynamic batch size; returns the PyTorch module it exported.

    Raises:
        MissingExtraError: For ONNX without onnx and onnxscript installed.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    module = embedding_model(checkpoint)
    example = _example(checkpoint, 2)
    info = json.dumps(metadata(checkpoint))
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            # torch >= 2.9 deprecates TorchScript for torch.export; the format still loads and
            # runs everywhere torch does, which is what this file is for.
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(module, example)
            torch.jit.save(traced, str(out), _extra_files={"gca_pyg.json": info})
        return module
    _require("onnx", "onnxscript")
    import onnx

    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(out),
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    proto = onnx.load(str(out))  # with the weights torch may have written beside it
    onnx.helper.set_model_props(proto, {"gca_pyg": info})
    onnx.save(proto, str(out))  # one self-contained file (an embedder is far below protobuf's 2 GB)
    beside = out.with_name(out.name + ".data")
    if beside.exists():  # torch's external weights, now inside the file: not needed
        beside.unlink()
    return module


def _require(*modules: str):
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"ONNX export needs {' and '.join(missing)}, which is not installed: "
            'pip install "gca-pyg[export]"'
        )


def run_exported(path: Path, format: str, images: Tensor) -> np.ndarray:
    """Runs the exported file `path` on `images`, without gca_pyg's model code."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
            loaded = torch.jit.load(str(path))
        with torch.no_grad():
            return loaded(images).numpy()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


def verify(
    checkpoint: RunCheckpoint, module: EmbeddingModel, path: Path, format: str
) -> dict[int, float]:
    """The largest absolute difference between the exported file and `module` per batch size of
    :data:`VERIFY_BATCHES`, on random images."""
    differences = {}
    for seed, batch in enumerate(VERIFY_BATCHES):
        images = _example(checkpoint, batch, seed=seed + 1)
        with torch.no_grad():
            expected = module(images).numpy()
        found = run_exported(path, format, images)
        if found.shape != expected.shape:
            raise GcaError(
                f"the exported {path} returned {found.shape} for a batch of {batch}, expected "
                f"{expected.shape}"
            )
        differences[batch] = float(np.abs(found - expected).max())
    return differences


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gca_pyg.export",
        description="Export a checkpoint's embedding model (backbone, embedding head, L2 norm) "
        "to TorchScript or ONNX.",
    )
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a .pt file or a run folder (its last.pt)"
    )
    parser.add_argument(
        "--format", choices=FORMATS, help="default: from the --out suffix (.onnx: onnx, else ts)"
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    parser.add_argument(
        "--no-verify", action="store_true", help="do not run the file against PyTorch"
    )
    return parser.parse_args(argv)


def run(args: argparse.Namespace):
    out = Path(args.out)
    format = args.format or SUFFIXES.get(out.suffix.lower(), "torchscript")
    if format == "onnx" and not args.no_verify:
        _require("onnx", "onnxscript", "onnxruntime")
    checkpoint = open_checkpoint(args.checkpoint)
    module = export(checkpoint, out, format)
    print(f"{format} embedding model written to {out} ({out.stat().st_size / 2**20:.1f} MB)")
    if args.no_verify:
        return
    differences = verify(checkpoint, module, out, format)
    shown = ", ".join(f"batch {b}: {d:.2e}" for b, d in differences.items())
    print(f"largest |difference| from PyTorch: {shown}")
    if max(differences.values()) > TOLERANCE:
        raise GcaError(
            f"the exported model differs from PyTorch by more than {TOLERANCE} ({shown})"
        )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    return exit_status(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
