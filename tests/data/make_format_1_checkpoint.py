"""Writes format_1.pt and format_1_continued.pt with gca_pyg 0.1.0, the release whose checkpoints
have format 1, for tests/test_checkpoint.py: a mid-epoch training checkpoint of a tiny model, and
what 0.1.0 computes when it continues from there.

Run it with gca_pyg 0.1.0 importable (e.g. a checkout of the commit before 0.2.0, or
``pip install gca-pyg==0.1.0``)::

    python tests/data/make_format_1_checkpoint.py tests/data

Sums split differently on CPUs with wider vector kernels than AVX2, so the pair is made once per
``torch.backends.cpu.get_cpu_capability()``: ``format_1.pt`` and ``format_1_continued.pt`` on
AVX2, renamed ``format_1.AVX512.pt`` and ``format_1_continued.AVX512.pt`` when made on AVX-512.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for tiny_model

import gca_pyg  # noqa: E402
from gca_pyg.checkpoint import FORMAT_VERSION, rng_state, save_checkpoint  # noqa: E402
from gca_pyg.model import GCAHNG  # noqa: E402
from gca_pyg.schema import NetConfig, OptimConfig  # noqa: E402
from gca_pyg.trainer import AlternatingTrainer  # noqa: E402

from tiny_model import TinyBackbone, batch  # noqa: E402


def main(folder: Path):
    if gca_pyg.__version__ != "0.1.0" or FORMAT_VERSION != 1:
        sys.exit(f"needs gca_pyg 0.1.0 (checkpoint format 1), found {gca_pyg.__version__}")
    torch.set_num_threads(2)  # the test computes with 2 threads too: sums split by thread
    torch.manual_seed(0)
    model = GCAHNG(TinyBackbone(), num_classes=6, embedding_size=16, net=NetConfig(1, 2, 0.1))
    trainer = AlternatingTrainer(model, OptimConfig(warmup_epochs=0, epochs=4), seed=0)
    images, labels = batch()
    for _ in range(2):
        trainer.training_step(images, labels)
    trainer.end_epoch()
    trainer.training_step(images, labels)  # one step into the second epoch
    save_checkpoint(
        {"model": model.state_dict(), "training": trainer.state_dict(), "rng": rng_state()},
        folder / "format_1.pt",
    )
    logs = [trainer.training_step(images, labels) for _ in range(2)]
    means = trainer.end_epoch()
    schedule = {"hardness": trainer.hardness, "synthetic_weight": trainer.synthetic_weight}
    logs.append(trainer.training_step(images, labels))
    torch.save(
        {
            "logs": logs,
            "means": means,
            "schedule": schedule,
            "embeddings": model.embed(images),
            "version": gca_pyg.__version__,
        },
        folder / "format_1_continued.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
