"""The package's layers: each subpackage imports only the layers below it (an ast scan of every
import, the ones inside functions too), and no two modules import each other in a cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "momentreg"
BASE = {"errors", "files", "tables"}  # leaf modules every layer may use
BELOW = {
    "base": set(),
    "core": {"base"},
    "models": {"base", "core"},
    "data": {"base"},
    "training": {"base", "core", "models", "data"},
    "evaluation": {"base", "core", "models", "data"},
    "runs": {"base", "core", "models", "data", "training", "evaluation"},
    "cli": {"base", "core", "models", "data", "training", "evaluation", "runs"},
}


def _layer(module: str) -> str:
    """The layer of a dotted module name below momentreg ("core.moments" -> "core")."""
    first = module.split(".")[0]
    return "base" if first in BASE else first


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The momentreg modules ``path`` imports, as dotted names below momentreg."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "momentreg":
                found |= {a.name for a in node.names if a.name != "__version__"}
            elif node.module.startswith("momentreg."):
                found.add(node.module.removeprefix("momentreg."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("momentreg.") for a in node.names
                      if a.name.startswith("momentreg.")}  # fmt: skip
    return found


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(p): _imports(p)
        for p in PACKAGE.rglob("*.py")
        if _module_name(p) not in ("", "__main__")  # the package's face imports every layer
    }


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points to a layer not below its module's: "module -> target"."""
    wrong = []
    for module, imported in graph.items():
        layer = _layer(module)
        assert layer in BELOW, f"{module} is in no layer: add its package to BELOW"
        for target in imported:
            if _layer(target) != layer and _layer(target) not in BELOW[layer]:
                wrong.append(f"{module} -> {target}")
    return wrong


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One chain of imports that comes back to where it started, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            target = target if target in graph else target.rsplit(".", 1)[0]
            if state.get(target) == "open":
                return [*path, module, target]
            if target in graph and target not in state:
                cycle = visit(target, [*path, module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, []))), None)


def test_every_subpackage_imports_only_the_layers_below_it():
    assert _upward(_graph()) == []


def test_no_modules_import_each_other_in_a_cycle():
    assert _cycle(_graph()) is None


def test_the_checks_see_a_wrong_import_and_a_cycle(tmp_path):
    """The scan is not blind: an import inside a function is found, a core module importing
    the training layer is flagged, and two modules importing each other are a cycle."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from momentreg.training.loop import train\n")
    assert _imports(path) == {"training.loop"}
    assert _upward({"core.moments": {"training.loop"}}) == ["core.moments -> training.loop"]
    assert _upward({"training.loop": {"core.moments"}}) == []
    looped = {"runs.run": {"runs.sweep"}, "runs.sweep": {"runs.run"}}
    assert _cycle(looped) == ["runs.run", "runs.sweep", "runs.run"]
