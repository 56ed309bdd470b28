import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LAYERS = ROOT / "docs" / "layers.md"
PYTHON_GUIDE = ROOT / "docs" / "python.md"


def run_python_blocks(path: Path) -> dict:
    """Runs the python blocks of `path` in order, in one module namespace, as a reader's script
    would (later blocks may use names from earlier ones). The module is importable while it runs:
    PyG's Sequential imports the module that builds it, and without it falls back to the forward of
    the last Sequential it generated."""
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    assert blocks, f"{path.name} has no python example"
    module = types.ModuleType(path.stem)
    sys.modules[path.stem] = module
    try:
        for block in blocks:
            exec(compile(block, str(path), "exec"), module.__dict__)
    finally:
        del sys.modules[path.stem]
    return module.__dict__


def test_readme_python_examples_run():
    namespace = run_python_blocks(README)
    assert namespace["x"].shape == (3, 32)
    assert namespace["edge_attr"].shape == (4, 32)
    references = namespace["references"]
    # 8 classes × 3: the batch and its N(C − 1) synthetic negatives; N(K − 1) positive pairs and
    # N(C − 1) negative pairs.
    assert references.ref_emb.shape == (24 + 24 * 7, 64)
    assert references.ref_labels.shape == (24 + 24 * 7,)
    shapes = [t.shape for t in references.indices_tuple]
    assert shapes == [(24 * 2,), (24 * 2,), (24 * 7,), (24 * 7,)]
    assert namespace["loss"].requires_grad and namespace["loss"].isfinite()


def test_python_guide_examples_run():
    namespace = run_python_blocks(PYTHON_GUIDE)
    assert namespace["fusion"].shape == (81, 81, 512)
    assert namespace["graph_out"].shape == (8, 10)
    assert namespace["edge_logits"].shape == (namespace["batch"].num_edges, 2)
    assert {"J_m", "J_syn", "J_gen"} <= set(namespace["losses"])
    assert namespace["references"].ref_emb.shape == (24 + 24 * 7, 64)
    # the guide's own metric loss: registered, built by name, a finite J_m and J_syn
    from gca_pyg.losses import METRIC_LOSSES, build_metric_loss
    from gca_pyg.schema import LossConfig

    assert METRIC_LOSSES["centre_distance"] is namespace["CentreDistance"]
    config = LossConfig(metric="centre_distance", metric_kwargs={"margin": 1.0})
    criterion = build_metric_loss(config, num_classes=8, embedding_size=64)
    embeddings, graph = namespace["embeddings"], namespace["graph"]
    j_syn = criterion.synthetic_loss(embeddings, namespace["negatives"], graph)
    assert criterion.margin == 1.0 and criterion(embeddings, graph.labels).isfinite()
    assert j_syn.isfinite() and j_syn.requires_grad


def test_layer_guide_python_examples_run():
    namespace = run_python_blocks(LAYERS)
    assert namespace["graph_out"].shape == (8, 10)
    assert namespace["edge_out"].shape == (namespace["batch"].num_edges, 2)
