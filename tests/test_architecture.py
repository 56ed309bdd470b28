"""The package's layout, read from its imports: the method library never imports the application
(gca_pyg/app), the configuration's schema imports nothing of the package, one module reads and
writes checkpoints, no import cycle, and at most 10 floors."""

import ast
from functools import cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gca_pyg"
#: The command-line names, ``python -m gca_pyg.<command>``: each forwards to gca_pyg.app.<command>.
COMMANDS = ("train", "evaluate", "report", "index", "search", "serve", "export", "convert")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imports() -> dict[str, set[str]]:
    """Every module of the package and the gca_pyg modules it imports (anywhere in its code)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against the module's package
                    base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets.add(module)
                targets |= {f"{module}.{alias.name}" for alias in node.names}
        found[name] = {t for t in targets if t.startswith("gca_pyg")}
    return found


def room(module: str) -> str:
    """A module's room: a top-level module, or a whole subpackage (as data/ and nn/ count)."""
    return ".".join(module.split(".")[:2])


def room_arrows() -> dict[str, set[str]]:
    rooms = {room(m) for m in imports()} - {"gca_pyg"}
    arrows = {r: set() for r in rooms}
    for module, targets in imports().items():
        for target in targets:
            if room(module) != room(target) and room(target) in rooms and module != "gca_pyg":
                arrows[room(module)].add(room(target))
    return arrows


def test_the_library_never_imports_the_application():
    forwarders = {f"gca_pyg.{command}" for command in COMMANDS}
    offenders = {
        module: sorted(t for t in targets if t.startswith("gca_pyg.app"))
        for module, targets in imports().items()
        if not module.startswith("gca_pyg.app") and module not in forwarders
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_every_command_name_forwards_to_its_application_module():
    for command in COMMANDS:
        assert imports()[f"gca_pyg.{command}"] == {
            f"gca_pyg.app.{command}",
            f"gca_pyg.app.{command}.main",
        }
        assert (PACKAGE / "app" / f"{command}.py").is_file()


def test_the_schema_imports_nothing_of_the_package():
    assert imports()["gca_pyg.schema"] == set()


def test_one_module_writes_the_checkpoint_format():
    sources = {module_name(path): path.read_text() for path in PACKAGE.rglob("*.py")}
    writers = [
        module
        for module, source in sources.items()
        if "def save_checkpoint" in source or '"format_version":' in source
    ]
    assert writers == ["gca_pyg.checkpoint"]
    # The commands and the index folder write checkpoints through it, never with torch.save.
    for module in ("gca_pyg.app.train", "gca_pyg.app.convert", "gca_pyg.retriever"):
        assert "torch.save" not in sources[module] and "save_checkpoint" in sources[module]


def test_no_import_cycle_and_at_most_ten_floors():
    arrows = room_arrows()
    floors: dict[str, int] = {}

    def floor(node: str, path: tuple[str, ...] = ()) -> int:
        assert node not in path, f"import cycle: {' -> '.join(path + (node,))}"
        if node not in floors:
            floors[node] = 1 + max((floor(t, path + (node,)) for t in arrows[node]), default=0)
        return floors[node]

    assert max(floor(node) for node in arrows) <= 10, sorted(floors.items(), key=lambda x: x[1])
    # the tower of the method, bottom to top
    tower = ["gca_pyg.nn", "gca_pyg.graph", "gca_pyg.losses", "gca_pyg.generator", "gca_pyg.model"]
    assert [floors[r] for r in tower] == sorted(floors[r] for r in tower)
    assert floors["gca_pyg.config"] < floors["gca_pyg.model"]  # config sits below the trainer
    assert floors["gca_pyg.config"] < floors["gca_pyg.trainer"]
