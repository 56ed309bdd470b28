"""docs/method.md states the shipped recipes' values; they must not drift apart. The README and
the pages of docs/ link to each other and to files of the repository: every link must lead
somewhere."""

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
    for page in sorted((ROOT / "docs").glob("*.md")):  # every page is reachable from the README
        assert f"](docs/{page.name})" in readme, page.name


def markdown_files():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans, where links are links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(path: Path) -> set:
    """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped
    (inline code keeps its text), spaces to hyphens, repeats numbered."""
    anchors, seen = set(), {}
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for title in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link: its text
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_files_and_headings_of_the_repository(page):
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.is_relative_to(ROOT), f"{target}: outside the repository"
        assert file.exists(), f"{target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in heading_anchors(file), f"{target}: no such heading"
