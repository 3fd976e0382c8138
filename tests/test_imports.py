"""The package's import graph: no cycle, layers that import only lower layers, and the configuration read at the
composition root alone (lazy imports inside functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "joint_inference"
# the layers, lowest first: a module imports modules of its own layer and of lower ones only
LAYERS = ("core", "prompts", "data", "models", "api", "scoring", "reporting", "methods", "runs")
CONFIG_LIBRARIES = ("omegaconf", "hydra")  # only the composition root (runs/) reads the configuration


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its body."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules)
    return found - {module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_and_lazy_imports():
    graph = import_graph()
    assert "joint_inference.scoring.scorer" in graph["joint_inference.methods.icl"]  # a top-level relative import
    assert "joint_inference.models.openflamingo" in set().union(*graph.values())  # imported only inside a function


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for each import of a module of a higher layer."""
    return [f"{a} -> {b}" for a, imported in sorted(graph.items()) for b in sorted(imported) if layer_of(b) > layer_of(a)]


def test_the_layer_check_finds_a_planted_upward_import():
    graph = {"joint_inference.core.utils": {"joint_inference.methods.uicl"}, "joint_inference.runs.root":
             {"joint_inference.core.utils"}}
    assert upward_imports(graph) == ["joint_inference.core.utils -> joint_inference.methods.uicl"]


def test_every_module_lives_in_a_layer_with_a_docstring():
    for path in sorted(PACKAGE.glob("*/")):
        if path.is_dir() and path.name != "__pycache__":
            assert path.name in LAYERS, f"{path.name}/ is not a layer of {LAYERS}"
            assert ast.get_docstring(ast.parse((path / "__init__.py").read_text())), f"{path.name}/__init__.py"
    assert [p.name for p in PACKAGE.glob("*.py")] == ["__init__.py"]  # no module outside the layers


def test_a_layer_imports_only_its_own_and_lower_layers():
    assert upward_imports(import_graph()) == []


def config_readers(path: Path) -> list[str]:
    """What in ``path`` reads the configuration: an import of omegaconf or hydra, a ``DictConfig`` annotation."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [f"imports {n}" for n in names if n.split(".")[0] in CONFIG_LIBRARIES]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations = [a.annotation for a in [*node.args.args, *node.args.kwonlyargs] if a.annotation]
            found += [f"{node.name} takes a DictConfig" for a in annotations if "DictConfig" in ast.unparse(a)]
    return found


def test_the_config_check_finds_a_planted_reader(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("from omegaconf import DictConfig\n\ndef run(cfg: DictConfig) -> None:\n    pass\n")
    assert config_readers(planted) == ["imports omegaconf", "run takes a DictConfig"]


def test_below_the_root_no_module_reads_the_config():
    below = [p for p in sorted(PACKAGE.rglob("*.py")) if p.relative_to(PACKAGE).parts[0] != "runs"]
    assert below and {str(p.relative_to(PACKAGE)): found for p in below if (found := config_readers(p))} == {}
