"""python -m suites.import_cycles: the import cycles among the project's modules (none, we hope).

NOTE [ Import cycles ]
Rule IC1. A module is a ``.py`` file under ``streamcheck/``, ``suites/`` or ``tests/``, named by
          its dotted path (a package by its ``__init__.py``).
Rule IC2. Module ``a`` imports ``b`` when ``a`` holds ``import b``, ``import b.c`` (both ``b``
          and ``b.c``: importing a submodule runs its package first) or ``from b import c``
          (``b``, and ``b.c`` too when that is a module), relative imports resolved, anywhere in
          the file -- an import inside a function is still a cycle, only deferred -- except under
          ``if TYPE_CHECKING:``, which never runs.
Rule IC3. A cycle is a strongly connected component of more than one module (Tarjan), or a
          module importing itself; ``cycles()`` lists each as its sorted module names.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("streamcheck", "suites", "tests")


def modules(root: Path = REPO) -> dict[str, Path]:
    """Rule IC1: dotted name -> file."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _statements(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, skipping the bodies of ``if TYPE_CHECKING:`` (Rule IC2)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (s for child in node.orelse for s in _statements(_wrap(child)))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _statements(node)


def _wrap(node: ast.stmt) -> ast.Module:
    return ast.Module(body=[node], type_ignores=[])


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Rule IC2: the project modules that module ``name`` imports."""
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    found: set[str] = set()

    def add(target: str, *, namespace: bool) -> None:
        """``target`` and the packages it runs first, but not ``name``'s own packages (they are
        running already), unless ``namespace``: a name is read from the package itself."""
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            own = prefix in ancestors and not (namespace and prefix == target)
            if prefix in known and not own:
                found.add(prefix)

    for node in _statements(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, namespace=True)
            continue
        base = node.module or ""
        if node.level:
            keep = name.count(".") + 1 - node.level + (path.name == "__init__.py")
            base = ".".join(name.split(".")[:keep] + ([base] if base else []))
        submodules = [f"{base}.{alias.name}" for alias in node.names]
        for module in (m for m in submodules if m in known):
            add(module, namespace=False)
        add(base, namespace=any(m not in known for m in submodules))
    found.discard(name)
    return found


def graph(root: Path = REPO) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(root: Path = REPO) -> list[list[str]]:
    """Rule IC3 (Tarjan's strongly connected components, iteratively)."""
    edges = graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def main() -> int:
    found = cycles()
    for component in found:
        print(" <-> ".join(component))
    print(f"{len(found)} import cycles among {len(modules())} modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
