"""docs/method.md states the shipped recipes' values; they must not drift apart."""

import re
from pathlib import Path

import pytest

from gca_pyg.config import available_configs, load_config

ROOT = Path(__file__).resolve().parent.parent
METHOD = ROOT / "docs" / "method.md"

# Table column -> the config value it shows.
COLUMNS = {
    "backbone": lambda c: c.model.backbone,
    "metric loss": lambda c: c.loss.metric,
    "C × K": lambda c: f"{c.data.classes_per_batch} × {c.data.samples_per_class}",
    "layers × heads": lambda c: f"{c.net.num_layers} × {c.net.heads}",
    "α": lambda c: c.loss.alpha,
    "β": lambda c: c.loss.beta,
    "w_sim": lambda c: c.loss.w_sim,
    "w_div": lambda c: c.loss.w_div,
    "metric lr": lambda c: c.optim.metric_lr,
    "net lr": lambda c: c.optim.net_lr,
    "lr step": lambda c: c.optim.metric_lr_step,
    "lr decay": lambda c: c.optim.metric_lr_gamma,
    "warm-up": lambda c: c.optim.warmup_epochs,
    "epochs": lambda c: c.optim.epochs,
    "frozen BN": lambda c: "yes" if c.model.frozen_bn else "no",
    "class sampling": lambda c: c.data.class_sampling,
    "eval every": lambda c: c.train.eval_every,
}


def hyperparameter_table():
    section = METHOD.read_text().split("## Hyperparameters per data set", 1)[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0].strip("`"): dict(zip(header[1:], row[1:])) for row in rows}


def test_the_hyperparameter_table_shows_every_recipe_as_shipped():
    table = hyperparameter_table()
    assert set(table) == set(available_configs())
    for name, row in table.items():
        config = load_config(name)
        assert set(row) == set(COLUMNS), name
        for column, value_of in COLUMNS.items():
            expected = value_of(config)
            if isinstance(expected, str):
                assert row[column] == expected, (name, column)
            else:
                assert float(row[column]) == pytest.approx(expected), (name, column)


def test_readme_links_to_the_documents():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
    assert "docs/method.md" in readme and "docs/datasets.md" in readme
