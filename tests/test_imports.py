"""The package layout has no import cycle: the module-level import graph is acyclic, and the decision sinks and
W&B share ``guard/metrics.py`` instead of importing each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lightning_te_moe

PACKAGE = Path(lightning_te_moe.__file__).resolve().parent
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path) -> set[str]:
    """Package modules ``path`` imports when it is imported: top-level statements only (not inside functions,
    and not under ``if TYPE_CHECKING``), the submodules named by ``from . import x`` and the packages the
    imported modules live in included."""
    name, tree = _module_name(path), ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + [s for h in getattr(node, "handlers", []) for s in h.body])
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)

    visit(tree.body)
    # importing a.b.c runs the packages a and a.b first, unless they are this module's own (already running) parents
    parents = {".".join(t.split(".")[:i]) for t in targets for i in range(1, t.count(".") + 1)}
    return targets | {p for p in parents if not (name + ".").startswith(p + ".")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {t for t in _module_level_imports(path) if t in files and t != name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules, or [] when the graph is acyclic (iterative DFS)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return []


def test_package_import_graph_has_no_cycle() -> None:
    graph = _graph()
    assert len(graph) > 40 and "lightning_te_moe.guard.sinks" in graph
    assert _cycle(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_sinks_and_wandb_sink_do_not_import_each_other() -> None:
    graph = _graph()
    sinks, wandb_sink = "lightning_te_moe.guard.sinks", "lightning_te_moe.guard.wandb_sink"
    assert wandb_sink not in graph[sinks] and sinks not in graph[wandb_sink]
    assert "lightning_te_moe.guard.metrics" in graph[sinks] & graph[wandb_sink]


def test_each_subpackage_imports_first_in_a_fresh_interpreter() -> None:
    """Importing a module first is where a cycle shows (a partially initialised module); sinks never pulls in W&B."""
    code = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    for key in [k for k in sys.modules if k.startswith('lightning_te_moe')]:\n"
        "        del sys.modules[key]\n"
        "    importlib.import_module(name)\n"
        "    assert 'lightning_te_moe.guard.wandb_sink' not in sys.modules, name\n"
    )
    names = ["lightning_te_moe.guard.sinks", "lightning_te_moe.guard", "lightning_te_moe.policy",
             "lightning_te_moe.experts", "lightning_te_moe.attention", "lightning_te_moe.plugin", "lightning_te_moe"]
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
