import pytest
import torch
import yaml

from gca_pyg.config import Config, available_configs, config_dirs, load_config
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
    "cub_proxy",
    "cars_proxy",
    "sop_proxy",
    "inshop_proxy",
    "folder",
]


def test_every_recipe_is_shipped_and_valid():
    assert set(RECIPES) <= set(available_configs())
    for name in RECIPES:
        config = load_config(name)
        assert config.name == name
        assert config.model.backbone == ("googlenet" if "googlenet" in name else "resnet50")
        assert config.loss.metric == ("proxy_anchor" if name.endswith("_proxy") else "npair")


def test_a_proxy_recipe_is_its_datasets_recipe_with_the_proxy_anchor_optimisation():
    for name in ("cub", "cars", "sop", "inshop"):
        plain, proxy = load_config(name).to_dict(), load_config(f"{name}_proxy").to_dict()
        for section in ("data", "model", "net", "graph", "train", "eval"):
            assert proxy[section] == plain[section], (name, section)
        generator = ("alpha", "beta", "w_sim", "w_div", "generator_ce_scale", "classifier_scale")
        assert {k: proxy["loss"][k] for k in generator} == {k: plain["loss"][k] for k in generator}
        assert proxy["optim"]["net_lr"] == plain["optim"]["net_lr"]


def test_every_key_of_a_recipe_file_reaches_the_typed_config_unchanged():
    for name in available_configs():
        (path,) = [
            folder / f"{name}.yaml"
            for folder in config_dirs()
            if (folder / f"{name}.yaml").is_file()
        ]
        written = yaml.safe_load(path.read_text())
        typed = load_config(name).to_dict()
        for section, values in written.items():
            if not isinstance(values, dict):
                assert typed[section] == values, (name, section)
                continue
            for key, value in values.items():
                if isinstance(typed[section][key], float):
                    value = float(value)  # YAML 1.1 reads 1e-4 as a string
                assert typed[section][key] == value, (name, f"{section}.{key}")


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
        ("loss.metric=' '", r"'loss.metric' .* is empty; name a metric loss"),
        ("loss.metric_kwargs=3", r"'loss.metric_kwargs' .* must be a mapping of names"),
        (
            "loss.synthetic_proxies=all",
            r"'loss.synthetic_proxies' .* valid values: anchor, others, relative, proxy_positive, "
            "class",
        ),
        ("loss.hardness_scale=log", r"'loss.hardness_scale' .* valid values: absolute, relative"),
        (
            "net.edge_attention=mult_attr",
            r"'net.edge_attention' .* valid values: none, key_value, bias, gate",
        ),
        ("model.pretrained=imagenet21k", r"'model.pretrained' .* valid values: imagenet, none"),
        ("optim.proxy_lr_ratio=0", r"'optim.proxy_lr_ratio' .* must be positive"),
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


def test_explicit_precision_and_memory_format_are_honoured(monkeypatch, capsys):
    import torch

    import gca_pyg.runtime as runtime

    cpu = torch.device("cpu")
    assert runtime.autocast_dtype("fp32", cpu) is None
    assert runtime.use_channels_last("channels_last", "fp32", cpu)
    monkeypatch.setattr(runtime, "native_bf16", lambda device: False)
    assert runtime.autocast_dtype("bf16", cpu) == torch.bfloat16  # it runs, and says so:
    assert "no native bf16 matmul" in capsys.readouterr().err
    assert not runtime.use_channels_last("contiguous", "bf16", cpu)


def test_model_pretrained_takes_a_file_of_backbone_weights():
    config = load_config("demo", ["model.pretrained=weights/backbone.pt"])
    assert config.model.pretrained == "weights/backbone.pt"


def test_net_edge_attention_reaches_every_layer():
    from gca_pyg.model import build_model

    for value in ("none", "gate"):
        config = load_config("demo", [f"net.edge_attention={value}"])
        model = build_model(config, 4, torch.device("cpu"), pretrained=False)
        convs = model.generator.net.convs
        assert [conv.edge_attention for conv in convs] == [value] * len(convs)
        assert (convs[0].lin_edge_attention is None) == (value == "none")


def test_a_bad_value_from_the_command_line_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config("demo", ["graph.memory=-5"])
    assert "configs/demo.yaml with --set graph.memory=-5 cannot be negative" in str(error.value)
    path = tmp_path / "bad.yaml"  # the same mistake in a file names the file only
    path.write_text(yaml.safe_dump({"graph": {"memory": -5, "neighbors": 4}}))
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert f"in {path} cannot be negative" in str(error.value)
