"""The layering the README promises, read from the source with ``ast`` (every import, lazy ones too).

Parts of ``lungnode`` are its sub-packages (``node``, ``inference``, ``training``, ``storage``,
``ops``, ``config``, ``commands``) and its top-level modules (``uids``, ``provenance``, ``logs``,
``cli``). Rules:

* ``inference`` imports neither ``node``, ``storage``, ``ops`` nor ``training`` (no network code,
  no database: it is usable on its own);
* ``storage`` imports neither ``node``, ``inference``, ``ops`` nor ``training`` (it is the bottom);
* ``training`` never imports ``node``, and ``node`` never imports ``training``;
* no cycle between parts;
* inside ``node``, its rooms (``dimse``, ``ingest``, ``dispatch``, ``results``) import each other
  without cycles, and ``dimse`` (the wire) imports no other room.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lungnode"

FORBIDDEN = {
    "inference": {"node", "storage", "ops", "training", "commands", "cli"},
    "storage": {"node", "inference", "ops", "training", "commands", "cli"},
    "training": {"node", "storage", "ops", "commands", "cli"},
    "node": {"training", "commands", "cli"},
    "ops": {"training", "commands", "cli"},
    "config": {"node", "inference", "training", "storage", "ops", "commands", "cli"},
}
NODE_ROOMS = ("dimse", "ingest", "dispatch", "results")


def module_name(path: Path) -> str:
    """``lungnode/node/ingest/store.py`` → ``lungnode.node.ingest.store``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every ``lungnode`` module ``path`` imports (absolute, relative resolved; lazy ones too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "lungnode")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "lungnode":
                continue
            yield target
            for alias in node.names:  # ``from lungnode.node import jobs`` imports a module
                yield f"{target}.{alias.name}"


def part(module: str, depth: int = 1) -> str:
    """The part (``lungnode.<part>...``) of a module name; ``depth=2`` gives the room in node."""
    pieces = module.split(".")
    return pieces[depth] if len(pieces) > depth else ""


def edges() -> dict[tuple[str, str], list[str]]:
    """(from part, to part) → example imports, over every module of the package."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = module_name(path)
        for target in imports(path):
            if target not in known:
                continue  # ``from lungnode.x import function``: the module itself is also yielded
            a, b = part(source), part(target)
            if a and b and a != b:
                found.setdefault((a, b), []).append(f"{source} -> {target}")
    return found


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as a path of nodes, or ``[]``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_the_import_reader_sees_lazy_and_relative_imports() -> None:
    # The rules below are only as good as the reader: check it on the package itself.
    found = edges()
    assert ("node", "storage") in found and ("training", "inference") in found
    lazy = PACKAGE / "node" / "dispatch" / "worker.py"  # imports the pipeline inside a function
    assert "lungnode.node.dispatch.pipeline" in set(imports(lazy))


@pytest.mark.parametrize("source", sorted(FORBIDDEN))
def test_part_does_not_import_what_it_must_not(source: str) -> None:
    bad = {(a, b): ex for (a, b), ex in edges().items() if a == source and b in FORBIDDEN[source]}
    assert not bad, "\n".join(line for ex in bad.values() for line in ex)


def test_no_cycle_between_parts() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in edges():
        graph.setdefault(a, set()).add(b)
    assert cycle(graph) == []


def test_node_rooms_have_no_cycle_and_the_wire_stands_alone() -> None:
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted((PACKAGE / "node").rglob("*.py")):
        source = module_name(path)
        a = part(source, 2)
        for target in imports(path):
            b = part(target, 2)
            if target in known and part(target) == "node" and a in NODE_ROOMS and b in NODE_ROOMS \
                    and a != b:
                graph.setdefault(a, set()).add(b)
    assert cycle(graph) == []
    assert graph.get("dimse", set()) == set()
