"""The dependency direction of docs/architecture.md ("Where things live"), checked on every import.

Why a test: a lazy import inside a function hides a cycle from the interpreter, and one
convenient import from a lower layer up to a higher one is how the house stops being
easy to change. Every ``import`` and ``from ... import`` in the product packages is read
with ``ast`` (function-level imports included) and checked against the table below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> the product packages it may import (itself always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "schemas": frozenset(),
    "postback": frozenset({"schemas"}),
    "ingest": frozenset({"schemas", "postback"}),
    "processors": frozenset({"schemas", "postback"}),
    "sinks": frozenset({"schemas", "postback"}),
    "deploy": frozenset({"postback.config"}),
    "app": frozenset({"schemas", "postback", "ingest", "processors", "sinks", "deploy"}),
}
PRODUCT = frozenset(ALLOWED)
#: Third-party packages whose private internals the delivery guarantee rests on.
SEAMED = frozenset({"faust", "aiokafka", "mode"})
SEAM = "processors/runtime/"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names judged) of every import statement in ``path``, relative imports resolved.

    ``from postback import config`` is judged as ``postback.config``, and ``from
    postback.config import Settings`` as ``postback.config.Settings``: a rule allowing
    ``postback.config`` admits both, and neither admits ``postback.topics``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found: list[tuple[int, str, list[str]]] = []
    for node in ast.walk(tree):  # annotation-only imports (TYPE_CHECKING) count too
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names = [module if alias.name == "*" else f"{module}.{alias.name}" for alias in node.names]
            found.append((node.lineno, module, names))
    return found


def _product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py"))


def _allowed(package: str, module: str) -> bool:
    top = module.split(".")[0]
    if top not in PRODUCT or top == package:
        return True
    return any(module == rule or module.startswith(rule + ".") for rule in ALLOWED[package])


def test_the_product_packages_are_all_known() -> None:
    assert all((ROOT / pkg / "__init__.py").exists() for pkg in PRODUCT)


def test_no_import_runs_against_the_layering() -> None:
    wrong = sorted(f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in _product_files()
             for line, module, names in _imports(path)
             if not all(_allowed(path.relative_to(ROOT).parts[0], name) for name in names))
    assert wrong == [], "imports against docs/architecture.md 'Where things live':\n" + "\n".join(wrong)


def test_faust_and_aiokafka_are_imported_only_behind_the_runtime_seam() -> None:
    wrong = sorted(f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in _product_files() if not path.relative_to(ROOT).as_posix().startswith(SEAM)
             for line, module, _ in _imports(path) if module.split(".")[0] in SEAMED)
    assert wrong == [], "faust/aiokafka outside processors/runtime/:\n" + "\n".join(wrong)


def _module_of(name: str) -> str | None:
    """The product module file a dotted import name resolves to (longest existing prefix), or None."""
    parts = name.split(".")
    while parts:
        base = ROOT.joinpath(*parts)
        if base.with_suffix(".py").is_file():
            return ".".join(parts)
        if (base / "__init__.py").is_file():
            return ".".join(parts) + ".__init__"
        parts.pop()
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _product_files():
        me = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        deps = graph.setdefault(me, set())
        for _, _, names in _imports(path):
            for name in names:
                target = _module_of(name) if name.split(".")[0] in PRODUCT else None
                if target is not None and target != me:
                    deps.add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_import_cycles() -> None:
    """Function-level imports count: a lazy import hides a cycle from the interpreter, not from readers.

    A package's ``__init__`` importing its own modules is not a cycle worth reporting, so
    edges into ``__init__`` modules are left out.
    """
    graph = {m: {d for d in deps if not d.endswith(".__init__")} for m, deps in _graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize(("package", "module", "ok"), [
    ("ingest", "sinks.queries", False), ("ingest", "postback.kafka", True), ("postback", "app.cli", False),
    ("deploy", "postback.config", True), ("deploy", "postback.topics", False), ("app", "deploy.stack", True),
    ("processors", "json", True), ("sinks", "processors.stages", False), ("deploy", "postback", False),
])
def test_the_rule_itself(package: str, module: str, ok: bool) -> None:
    """The checker can fail: known good and bad imports are judged as the table says."""
    assert _allowed(package, module) is ok
