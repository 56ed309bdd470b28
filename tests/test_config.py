import pytest

from gca_pyg.config import Config, available_configs, load_config
from gca_pyg.errors import ConfigError

RECIPES = [
    "cub",
    "cub_googlenet",
    "cars",
    "cars_googlenet",
    "sop",
    "sop_googlenet",
    "inshop",
    "inshop_googlenet",
    "folder",
]


def test_every_recipe_is_shipped_and_valid():
    assert set(RECIPES) <= set(available_configs())
    for name in RECIPES:
        config = load_config(name)
        assert config.name == name
        assert config.model.backbone == ("googlenet" if "googlenet" in name else "resnet50")


def test_spec_values_reach_the_typed_config():
    cub = load_config("cub")
    assert (cub.data.classes_per_batch, cub.data.samples_per_class) == (27, 3)
    assert (cub.net.num_layers, cub.net.heads) == (2, 4)
    assert (cub.loss.alpha, cub.loss.beta, cub.loss.w_div, cub.loss.w_sim) == (5, 20, 60, 20)
    assert cub.optim.metric_lr == pytest.approx(1.5e-4) and cub.optim.epochs == 100
    assert cub.model.frozen_bn and cub.eval.ks == [1, 2, 4, 8]
    sop = load_config("sop_googlenet")
    assert (sop.data.classes_per_batch, sop.data.samples_per_class) == (40, 2)
    assert (sop.net.num_layers, sop.net.heads) == (1, 2)
    assert (sop.loss.alpha, sop.loss.beta) == (5, 20)
    assert (sop.optim.metric_lr, sop.optim.net_lr) == (pytest.approx(3e-4), pytest.approx(1.5e-4))
    inshop = load_config("inshop_googlenet")
    assert (inshop.optim.metric_lr, inshop.optim.net_lr) == (
        pytest.approx(3e-4),
        pytest.approx(1.5e-4),
    )
    assert load_config("inshop").eval.ks == [1, 10, 20, 30, 40, 50]


def test_sop_and_inshop_recipes_draw_classes_uniformly():
    for name in RECIPES:
        expected = "uniform" if name.startswith(("sop", "inshop")) else "balanced"
        assert load_config(name).data.class_sampling == expected, name
    assert load_config("demo").data.class_sampling == "balanced"


def test_overrides_and_data_root(tmp_path):
    config = load_config(
        "cub",
        ["optim.epochs=3", "loss.synthesis=false", "optim.net_lr=1e-4", "eval.ks=[1, 5]"],
        data_root=str(tmp_path),
    )
    assert config.optim.epochs == 3 and config.loss.synthesis is False
    assert config.optim.net_lr == pytest.approx(1e-4)  # "1e-4" is a string in YAML 1.1
    assert config.eval.ks == [1, 5] and config.data.root == str(tmp_path)


def test_a_yaml_file_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("data:\n  dataset: demo\noptim:\n  epochs: 2\n")
    config = load_config(str(path))
    assert config.name == "mine" and config.optim.epochs == 2
    assert config.net.num_layers == 2  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.epoch=3", r"unknown key 'optim.epoch'.*valid keys of optim: epochs, metric_lr"),
        ("optimizer.epochs=3", r"unknown key 'optimizer'.*valid keys of the top level: name, data"),
        ("optim.epochs=three", r"'optim.epochs' .* must be an int, got 'three' \(str\)"),
        ("optim.epochs=2.5", r"'optim.epochs' .* must be an int, got 2.5"),
        ("loss.synthesis=maybe", r"'loss.synthesis' .* must be a bool"),
        ("eval.ks=4", r"'eval.ks' .* must be a list of ints, got 4 \(int\)"),
        (
            "data.dataset=imagenet",
            r"'data.dataset' .* valid values: cub, cars, sop, inshop, folder",
        ),
        ("train.device=gpu", r"'train.device' .* valid values: auto, cpu, cuda, cuda:N"),
        ("train.precision=fp16", r"valid values: auto, fp32, bf16"),
        (
            "data.class_sampling=random",
            r"'data.class_sampling' .* is 'random'; valid values: balanced, "
            "uniform",
        ),
        ("data.samples_per_class=1", r"at least 2"),
        ("model.embedding_size=510", r"divisible by 'net.heads'"),
        ("optim.epochs=0", r"'optim.epochs' .* must be positive"),
        ("epochs=3", r"must look like section.key=value"),
    ],
)
def test_bad_values_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cub", [override])


def test_unknown_name_lists_the_shipped_configs(tmp_path):
    with pytest.raises(ConfigError, match=r"no config named 'cubb'.*shipped configs: .*cub"):
        load_config("cubb")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(str(listed))


def test_round_trip_through_a_dict():
    config = load_config("cars")
    assert Config.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_and_memory_format_are_the_measured_fastest(monkeypatch, native):
    import torch

    import gca_pyg.runtime as runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert runtime.autocast_dtype("auto", device) == (torch.bfloat16 if native else None)
        assert runtime.use_channels_last("auto", "auto", device) == (
            native and device.type == "cpu"
        )
    assert runtime.autocast_dtype("fp32", torch.device("cpu")) is None
    assert runtime.use_channels_last("channels_last", "fp32", torch.device("cpu"))
    assert runtime.use_channels_last("auto", "bf16", torch.device("cpu"))
    assert not runtime.use_channels_last("auto", "bf16", torch.device("cuda"))
    assert not runtime.use_channels_last("auto", "fp32", torch.device("cpu"))
