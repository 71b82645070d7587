"""Module-level import cycles and private-name imports among trce's modules.

    .venv/bin/python benchmarks/import_graph.py              # cycles (strongly connected components)
    .venv/bin/python benchmarks/import_graph.py --packages   # the same, between trce's top-level parts
    .venv/bin/python benchmarks/import_graph.py --private    # `from trce.x import _name` across modules

Uses grimp (installed with import-linter), which counts function-local imports and imports under
`if TYPE_CHECKING:` too, as `lint-imports` does. Exits 1 when a cycle (or, with --private, a private
import) is found, so it can serve as a check; the enforced layering is `[tool.importlinter]` in
pyproject.toml.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import grimp


def part(module: str) -> str:
    """trce.methods.kpop -> trce.methods; trce.edit -> trce.edit."""
    return ".".join(module.split(".")[:2])


def strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one node, or with a self-loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
    return found


def import_lines(graph: grimp.ImportGraph, importer: str, imported: str) -> list[str]:
    details = graph.get_import_details(importer=importer, imported=imported)
    return [f"{d['importer']}:{d['line_number']} {d['line_contents']}" for d in details]


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(root: Path) -> list[str]:
    """Another module's private names used in a module: `from trce.x import _name`, and `m._name` where `m` is a
    trce module bound by an import (`from trce.x import m`, `import trce.x as m`)."""
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in root.rglob("*.py")}
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent)
        tree = ast.parse(path.read_text(), str(path))
        bound: set[str] = set()  # local names of trce modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trce":
                for alias in node.names:
                    if private(alias.name):
                        found.append(f"{where}:{node.lineno} from {node.module} import {alias.name}")
                    elif f"{node.module}.{alias.name}" in modules:
                        bound.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "trce" and alias.asname:
                        bound.add(alias.asname)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) \
                    and node.value.id in bound:
                found.append(f"{where}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", action="store_true", help="cycles between trce's top-level packages/modules")
    parser.add_argument("--private", action="store_true", help="list imports of private names across modules")
    args = parser.parse_args()
    if args.private:
        root = Path(__file__).resolve().parents[1] / "src" / "trce"
        lines = private_imports(root)
        print("\n".join(lines) or "no private imports across modules")
        return 1 if lines else 0

    graph = grimp.build_graph("trce", include_external_packages=False)
    nodes = set(graph.modules)
    edges: dict[str, set[str]] = {}
    for module in nodes:
        for imported in graph.find_modules_directly_imported_by(module):
            if args.packages:
                if part(module) != part(imported):
                    edges.setdefault(part(module), set()).add(part(imported))
            else:
                edges.setdefault(module, set()).add(imported)
    if args.packages:
        nodes = {part(m) for m in nodes}
    cycles = strongly_connected(nodes, edges)
    for component in cycles:
        print(f"cycle of {len(component)}: " + ", ".join(component))
        members = set(component)
        for a in component:
            for b in sorted(edges.get(a, ()) & members):
                if args.packages:
                    lines = [
                        line
                        for m in sorted(nodes_of(graph, a))
                        for n in sorted(graph.find_modules_directly_imported_by(m))
                        if part(n) == b
                        for line in import_lines(graph, m, n)
                    ]
                else:
                    lines = import_lines(graph, a, b)
                print(f"  {a} -> {b}")
                for line in lines:
                    print(f"      {line}")
    if not cycles:
        print("no import cycles")
    return 1 if cycles else 0


def nodes_of(graph: grimp.ImportGraph, name: str) -> set[str]:
    return {m for m in graph.modules if part(m) == name}


if __name__ == "__main__":
    sys.exit(main())
