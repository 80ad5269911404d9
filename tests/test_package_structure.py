"""The package's structure: no import cycles between its modules."""

import ast
from pathlib import Path

import otter_hf

PACKAGE_ROOT = Path(otter_hf.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The otter_hf modules `path` imports, at any depth of its code (imports inside functions count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
            # `from .x import y` imports x, and y too when y is a module.
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        imported.update(target for target in targets if target in modules)
    return imported - {name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE_ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting, done = [], set()

    def visit(module):
        if module in visiting:
            return visiting[visiting.index(module) :] + [module]
        if module in done:
            return None
        visiting.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        visiting.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def test_no_module_of_the_package_imports_itself_through_others():
    # Deferred imports inside functions count: they hide a cycle from the interpreter, not from the design. A
    # package's __init__ importing its submodules, which import their siblings, is no cycle.
    graph = import_graph()
    assert "otter_hf.trainers.reward_trainer" in graph and graph["otter_hf"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_trainer_and_its_config_are_exported_at_the_top_level():
    trainer_classes = [name for name in otter_hf.trainers.__all__ if name.endswith(("Trainer", "Config"))]
    assert {"OtterDraftTrainer", "OtterRewardTrainer", "OtterValueConfig"} <= set(trainer_classes)
    for name in trainer_classes:
        assert name in otter_hf.__all__, name
        assert getattr(otter_hf, name) is getattr(otter_hf.trainers, name)
