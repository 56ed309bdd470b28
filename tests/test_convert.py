"""gca_pyg.convert: a state dict of the authors' GCA_HNG becomes a gca_pyg checkpoint whose network
computes what theirs computes, and ``model.init`` starts training from it.

The proof of equality needs no checkout of their code: tests/reference/fixture.pt holds their
outputs on stand-in weights (tests/reference/make_fixture.py made it from their code), and the
stand-in weights are rebuilt here from its names and shapes (reference_weights.py).
"""

import copy
import re
from pathlib import Path

import pytest
import torch

from gca_pyg.app import convert as convert_cli
from gca_pyg.app import evaluate as evaluate_cli
from gca_pyg.app import train as train_cli
from gca_pyg.authors import ReferenceFormatError, convert_state_dict
from gca_pyg.checkpoint import convert_authors_file as convert
from gca_pyg.checkpoint import initial_model, load_checkpoint, load_initial_weights
from gca_pyg.config import Config, load_config
from gca_pyg.errors import ConfigError
from gca_pyg.graph import BatchGraph, to_dense_edges
from gca_pyg.model import build_model

from data_layouts import make_folder
from reference_weights import stand_in_images, stand_in_state_dict

FIXTURE = Path(__file__).parent / "reference" / "fixture.pt"
CASES = ["resnet50", "googlenet", "dino"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fixture():
    return torch.load(FIXTURE, weights_only=True)


def tiny(fixture, case):
    """The --set options that make a recipe the tiny network of the fixture's case."""
    return [
        f"model.embedding_size={fixture['embedding_size']}",
        f"data.image_size={fixture['cases'][case]['image_size']}",
        f"data.classes_per_batch={fixture['classes_per_batch']}",
        f"data.samples_per_class={fixture['samples_per_class']}",
        "train.device=cpu",
        "train.precision=fp32",
        "train.memory_format=contiguous",
    ]


@pytest.fixture(scope="module")
def their_files(fixture, tmp_path_factory):
    """Each case's state dict of their GCA_HNG, saved as their train.py saves it."""
    folder = tmp_path_factory.mktemp("theirs")
    files = {}
    for case in CASES:
        files[case] = folder / f"{case}.pth"
        torch.save(
            stand_in_state_dict(fixture["cases"][case]["manifest"], fixture["seed"]), files[case]
        )
    return files


@pytest.fixture(scope="module")
def converted(fixture, their_files, tmp_path_factory):
    """Each case converted by the command line."""
    folder = tmp_path_factory.mktemp("converted")
    outputs = {}
    for case in CASES:
        outputs[case] = folder / f"{case}.pt"
        recipe = fixture["cases"][case]["recipe"]
        sets = [a for s in tiny(fixture, case) for a in ("--set", s)]
        code = convert_cli.main(
            [str(their_files[case]), str(outputs[case]), "--config", recipe, *sets]
        )
        assert code == 0
    return outputs


def tensors(state: dict) -> dict:
    """The weights of a state dict (without the generator's schedule state)."""
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


def our_outputs(model, images, labels, mode):
    """What make_fixture.py records of their forward, from our model."""
    model.train(mode == "train")
    for conv in model.generator.net.convs:
        conv.dropout = 0.0  # as their dropout, set to 0 for the fixture
    with torch.no_grad():
        embeddings = model(images)
        graph = BatchGraph.build(labels)
        node_logits, fusion = model.generator.correlate(embeddings, graph)
    count = len(labels)
    return {
        "embeddings": embeddings,
        "node_logits": node_logits,
        "fusion": to_dense_edges(fusion, graph.shard.edge_index, count, undirected=True),
    }


#: Their running statistics -> ours (the embedding head's BatchNorm and the net's two).
RUNNING = {
    "feature_extractor.fc.0.": "embedding.0.",
    "gnn.bottleneck1.0.": "generator.net.edge_norm.",
    "gnn.bottleneck2.0.": "generator.net.node_norm.",
}


@pytest.fixture(scope="module")
def ours(converted):
    """Each converted checkpoint as a model, built as the evaluate command builds it."""
    models = {}
    for case, path in converted.items():
        state = load_checkpoint(path)
        config = Config.from_dict(state["config"])
        models[case] = build_model(config, len(state["classes"]), CPU, pretrained=False)
        models[case].load_state_dict(state["model"])
    return models


#: The fixture's outputs were computed on an AVX2 CPU. CPUs with wider vector kernels (AVX-512,
#: AMX) order the fp32 sums of a 50-layer network otherwise: up to ~3·10⁻⁵ of the largest output
#: there, so the bound is 10⁻⁴ on them and 10⁻⁵ on AVX2 (a tenth of it, absolute, for the
#: BatchNorm running statistics).
FIXTURE_TOLERANCE = 1e-5 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 1e-4


@pytest.mark.parametrize("case", CASES)
def test_the_converted_model_computes_what_their_gca_hng_computes(fixture, ours, case):
    """Embeddings, node logits and fusion weights of their forward at fp32 precision, in eval mode
    and in training mode (batch statistics; then the running statistics it leaves)."""
    model = ours[case]
    weights = copy.deepcopy(model.state_dict())
    size = fixture["cases"][case]["image_size"]
    images = stand_in_images(len(fixture["labels"]), size, fixture["seed"])
    for mode in ("eval", "train"):
        model.load_state_dict(weights)
        expected = fixture["cases"][case]["outputs"][mode]

        actual = our_outputs(model, images, fixture["labels"], mode)

        for name in ("embeddings", "node_logits", "fusion"):
            scale = expected[name].abs().max().item()
            torch.testing.assert_close(
                actual[name],
                expected[name],
                rtol=FIXTURE_TOLERANCE,
                atol=FIXTURE_TOLERANCE * scale,
                msg=lambda text, name=name, mode=mode: f"{case} {mode} {name}: {text}",
            )
        state = model.state_dict()
        for key, value in expected.get("running", {}).items():
            prefix = next(p for p in RUNNING if key.startswith(p))
            torch.testing.assert_close(
                state[RUNNING[prefix] + key[len(prefix) :]],
                value,
                rtol=FIXTURE_TOLERANCE,
                atol=FIXTURE_TOLERANCE / 10,
            )
    model.load_state_dict(weights)


def test_every_tensor_of_theirs_is_used_or_unused_by_their_forward(fixture, converted):
    """The conversion drops only what their forward never reads, and fills every tensor of ours:
    a shared LayerNorm of theirs fills our separate ones."""
    state = load_checkpoint(converted["resnet50"])["model"]
    theirs = stand_in_state_dict(fixture["cases"]["resnet50"]["manifest"], fixture["seed"])
    layer = "gnn.gnn.1.node_model.layers.0."
    for norm in ("norm_attention", "norm_edge_to_node", "norm_node_ffn"):
        assert torch.equal(
            state[f"generator.net.convs.1.{norm}.weight"], theirs[layer + "norm.1.weight"]
        )
    dropped = {
        key
        for key in theirs
        if key.startswith("feature_extractor.backbone.model.fc.") or ".update_node." in key
    }
    assert len(dropped) == 2 + 2 * 2  # ResNet-50's ImageNet classifier, update_node of 2 layers
    mapped = sum(value.numel() for key, value in theirs.items() if key not in dropped)
    repeated = sum(  # their shared LayerNorms fill 3 (node) and 2 (edge) of ours
        value.numel() * (2 if ".node_model." in key else 1)
        for key, value in theirs.items()
        if key.endswith(("norm.1.weight", "norm.1.bias"))
    )
    tensors = [value for value in state.values() if isinstance(value, torch.Tensor)]
    assert sum(value.numel() for value in tensors) == mapped + repeated


def test_data_parallel_prefixes_and_googlenets_auxiliary_heads_are_accepted(
    fixture, their_files, ours
):
    """A state dict saved from a DataParallel model (``module.`` prefixes), and one of GoogLeNet
    built without ImageNet weights (auxiliary heads kept, never used), map to the same weights."""
    theirs = torch.load(their_files["googlenet"], weights_only=True)
    expected = ours["googlenet"].state_dict()
    aux = {
        "feature_extractor.backbone.aux1.conv.conv.weight": torch.ones(128, 512, 1, 1),
        "feature_extractor.backbone.aux2.fc2.bias": torch.ones(1000),
    }
    variants = [{f"module.{k}": v for k, v in theirs.items()}, {**theirs, **aux}]
    for variant in variants:
        weights, notes = convert_state_dict(variant, ours["googlenet"])
        assert notes == [] and weights.keys() == expected.keys()
        assert all(torch.equal(weights[key], expected[key]) for key in tensors(expected))


def test_dino_position_embedding_is_interpolated_as_their_backbone_does(fixture, converted):
    theirs = stand_in_state_dict(fixture["cases"]["dino"]["manifest"], fixture["seed"])
    ours = load_checkpoint(converted["dino"])["model"]
    assert theirs["feature_extractor.backbone.pos_embed"].shape == (1, 197, 384)  # 224 px
    assert ours["backbone.trunk.pos_embed"].shape == (1, 5, 384)  # 32 px: 2 × 2 patches
    assert torch.equal(
        ours["backbone.trunk.pos_embed"][:, 0], theirs["feature_extractor.backbone.pos_embed"][:, 0]
    )


def test_a_converted_checkpoint_is_evaluated_by_the_evaluate_command(
    converted, their_files, tmp_path, capsys
):
    root = make_folder(tmp_path / "images", per_class=2)
    code = evaluate_cli.main(
        [
            "--checkpoint",
            str(converted["resnet50"]),
            "--set",
            "data.dataset=folder",
            "--data-root",
            str(root),
            "--set",
            "data.resize=70",
            "--set",
            "data.num_workers=0",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"(converted from {their_files['resnet50']})" in out and "R@1" in out


def test_fine_tuning_starts_from_model_init(fixture, converted, their_files, tmp_path):
    """model.init: a converted checkpoint and their file itself give the same start; on a data
    set with another number of classes the classifiers start afresh, nothing else."""
    config = load_config(
        "folder", tiny(fixture, "resnet50") + [f"model.init={converted['resnet50']}"]
    )
    from_checkpoint = initial_model(config, 7, CPU)
    config.model.init = str(their_files["resnet50"])
    from_their_file = initial_model(config, 7, CPU)
    expected = load_checkpoint(converted["resnet50"])["model"]
    for model in (from_checkpoint, from_their_file):
        state = model.state_dict()
        for key, value in tensors(expected).items():
            if key.startswith(("generator.classifier.", "generator.net.lin_classifier.")):
                assert state[key].shape[0] == 7  # 5 classes there, 7 here: fresh
            else:
                assert torch.equal(state[key], value), key


def test_a_proxy_anchor_run_starts_from_their_n_pair_model_with_fresh_proxies(
    fixture, their_files, capsys
):
    """Their released models train N-pair, which has no parameters: Proxy-Anchor's proxies start
    fresh (one line says so), every tensor of their file is loaded."""
    sets = tiny(fixture, "resnet50") + ["loss.metric=proxy_anchor"]
    config = load_config("folder", sets + [f"model.init={their_files['resnet50']}"])
    torch.manual_seed(0)
    model = initial_model(config, 5, CPU)
    assert "(Proxy-Anchor's proxies): they start from a fresh" in capsys.readouterr().err
    torch.manual_seed(0)
    fresh = build_model(load_config("folder", sets), 5, CPU, pretrained=False)
    converted, _ = convert_state_dict(
        stand_in_state_dict(fixture["cases"]["resnet50"]["manifest"], fixture["seed"]), fresh
    )
    for key, value in tensors(model.state_dict()).items():
        expected = fresh.state_dict()[key] if key.startswith("criterion.") else converted[key]
        assert torch.equal(value, expected), key


def convert_error(capsys, their_file, output, recipe, *sets):
    code = convert_cli.main(
        [str(their_file), str(output), "--config", recipe, *[a for s in sets for a in ("--set", s)]]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not Path(output).exists()
    return err


@pytest.mark.parametrize(
    "case, recipe, extra, message",
    [
        (
            "resnet50",
            "cub_dino",
            [],
            r"holds the authors' ResNet-50 \(BACKBONE: Resnet50\) backbone but model.backbone is "
            r"dino_vits16; .*--config cub\)",
        ),
        ("dino", "cub", [], r"DINO ViT .* --set model.backbone=dino_vits16"),
        ("resnet50", "cub", ["model.embedding_size=512"], r"16-d embeddings .*embedding_size=16"),
        ("googlenet", "cub_googlenet", ["net.num_layers=1"], r"2 correlation-net layers .*=2"),
        (
            "dino",
            "cub_dino",
            ["model.backbone=dinov2_vits14", "data.image_size=28"],
            r"their feature_extractor.backbone.patch_embed.proj.weight \[384, 3, 16, 16\] does "
            r"not fit backbone.trunk.patch_embed.proj.weight \(\[384, 3, 14, 14\]\)",
        ),
    ],
)
def test_a_config_that_does_not_fit_their_file_is_one_line_naming_the_mismatch(
    fixture, their_files, tmp_path, capsys, case, recipe, extra, message
):
    sets = [
        s for s in tiny(fixture, case) if not s.startswith(("model.embedding_size", "data.image"))
    ]
    sets += [f"model.embedding_size={fixture['embedding_size']}"] * (recipe != "cub" or not extra)
    err = convert_error(capsys, their_files[case], tmp_path / "out.pt", recipe, *sets, *extra)
    assert re.search(message, err), err


def test_files_that_are_not_their_state_dict_are_one_line(
    fixture, their_files, converted, tmp_path, capsys
):
    foreign = tmp_path / "foreign.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    err = convert_error(capsys, foreign, tmp_path / "out.pt", "cub")
    assert "not a state dict of the authors' GCA_HNG" in err and "no feature_extractor" in err

    extra = tmp_path / "extra.pth"
    state = torch.load(their_files["googlenet"], weights_only=True)
    torch.save({**state, "gnn.extra.weight": torch.zeros(1)}, extra)
    err = convert_error(
        capsys, extra, tmp_path / "out.pt", "cub_googlenet", *tiny(fixture, "googlenet")
    )
    assert "unexpected key gnn.extra.weight" in err

    err = convert_error(capsys, converted["dino"], tmp_path / "out.pt", "cub_dino")
    assert "already a gca_pyg checkpoint" in err and "model.init" in err

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(their_files["dino"].read_bytes()[:1000])
    err = convert_error(capsys, truncated, tmp_path / "out.pt", "cub_dino")
    assert "not a readable PyTorch weight file" in err

    err = convert_error(capsys, tmp_path / "missing.pth", tmp_path / "out.pt", "cub_dino")
    assert "no file" in err


def test_a_file_of_their_metric_model_alone_converts_with_a_fresh_generator(
    fixture, their_files, tmp_path, capsys
):
    """Their eval.py also loads files holding only the feature extractor; the embeddings are
    theirs, the correlation net and classifiers start afresh (as many classes as the official
    split has)."""
    state = torch.load(their_files["dino"], weights_only=True)
    metric = tmp_path / "metric.pth"
    torch.save({k: v for k, v in state.items() if k.startswith("feature_extractor.")}, metric)
    config = load_config("cub_dino", tiny(fixture, "dino"))

    checkpoint, notes = convert(metric, config)

    assert len(checkpoint["classes"]) == 100 and len(notes) == 1 and "metric model" in notes[0]
    model = build_model(config, 100, CPU, pretrained=False)
    model.load_state_dict(checkpoint["model"])
    images = stand_in_images(len(fixture["labels"]), 32, fixture["seed"])
    expected = fixture["cases"]["dino"]["outputs"]["eval"]["embeddings"]
    torch.testing.assert_close(model.embed(images), expected, rtol=1e-5, atol=1e-5)


def test_resuming_a_converted_checkpoint_is_one_line_pointing_at_model_init(converted, capsys):
    assert train_cli.main(["--resume", str(converted["dino"])]) == 2
    err = capsys.readouterr().err
    assert "converted checkpoint" in err and "--set model.init=" in err


def test_model_init_of_another_network_is_one_line_naming_the_key(converted, their_files):
    config = load_config("cub", ["model.embedding_size=32", "train.device=cpu"])
    model = build_model(config, 5, CPU, pretrained=False)
    message = r"model.init .* with model.embedding_size=16 but the config has 32; --set"
    with pytest.raises(ConfigError, match=message):
        load_initial_weights(model, converted["resnet50"], config)
    demo = load_config("demo", ["model.embedding_size=16", "train.device=cpu"])
    model = build_model(demo, 5, CPU, pretrained=False)
    with pytest.raises(ReferenceFormatError, match=r"ResNet-50 .*model.backbone is small_cnn"):
        load_initial_weights(model, their_files["resnet50"], demo)


def test_the_train_command_starts_from_model_init(tmp_path, capsys):
    """A run with model.init starts from that checkpoint's weights (trained with another seed):
    with every learning rate 0, its parameters end as they began."""
    root = make_folder(tmp_path / "images", per_class=4)
    settings = [
        "data.classes_per_batch=2",
        "data.samples_per_class=2",
        "data.image_size=8",
        "data.resize=8",
        "data.num_workers=0",
        "model.backbone=small_cnn",
        "model.pretrained=none",
        "model.embedding_size=16",
        "net.heads=2",
        "net.num_layers=1",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "train.device=cpu",
    ]

    def train(output, *extra):
        args = [a for s in [*settings, f"train.output_dir={output}", *extra] for a in ("--set", s)]
        assert train_cli.main(["folder", "--data-root", str(root), *args]) == 0
        (run_dir,) = list(output.iterdir())
        return load_checkpoint(run_dir / "last.pt")

    first = train(tmp_path / "first", "train.seed=1")
    frozen = ["optim.metric_lr=0", "optim.net_lr=0", "optim.classifier_lr=0"]
    init = next((tmp_path / "first").iterdir()) / "last.pt"
    second = train(tmp_path / "second", f"model.init={init}", *frozen)
    capsys.readouterr()

    parameters = [
        name
        for name, value in tensors(first["model"]).items()
        if value.is_floating_point() and "running_" not in name
    ]
    assert all(torch.equal(second["model"][name], first["model"][name]) for name in parameters)
    assert second["config"]["model"]["init"] == str(init)
