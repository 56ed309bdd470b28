import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LAYERS = ROOT / "docs" / "layers.md"


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    for block in blocks:  # later blocks may use names from earlier ones, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["fusion"].shape == (81, 81, 512)


def test_layer_guide_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", LAYERS.read_text(), flags=re.S)
    assert len(blocks) >= 2, "docs/layers.md lost its python examples"
    namespace = {}
    for block in blocks:
        exec(compile(block, str(LAYERS), "exec"), namespace)
    assert namespace["graph_out"].shape == (8, 10)
    assert namespace["edge_out"].shape == (namespace["batch"].num_edges, 2)
