"""The package's import graph: no cycles, and the layering of DESIGN.md ("Layering (who may
import whom)"): cli, serve, bench, training -> generator -> drafters, acceptance -> engine ->
models, config (and the bottom modules beside them).

Every import counts, the ones inside functions too: a lower layer never imports a higher one,
not even lazily, so a lazy import cannot hide a cycle or a layering breach. The graph is read
from the source with `ast` (nothing is imported), so the test is fast and sees every module.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "verispec"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported verispec module
    path: str  # file of the importing module, relative to src/
    line: int
    in_function: bool  # the import statement sits inside a function

    def __str__(self) -> str:
        where = " (inside a function)" if self.in_function else ""
        return f"{self.source} -> {self.target}  [{self.path}:{self.line}{where}]"


def module_files() -> dict[str, Path]:
    """verispec module name -> its file (a package is its __init__.py)."""
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def _known(name: str) -> str:
    """The module an import of `name` loads: `name` itself, or the nearest known parent (an
    import of a name that is no module, e.g. `verispec.models.load_model`)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(tree: ast.AST):
    """(node, inside a function) for every Import / ImportFrom in the module."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.Lambda)))
    yield from walk(tree, False)


def edges_of(module: str, path: Path) -> list[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    rel = str(path.relative_to(SRC))
    found = []
    for node, in_function in _imports(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                # the package a relative import starts from: the module's own package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for alias in node.names:
                sub = f"{stem}.{alias.name}"
                # `from verispec.x import y` with y a submodule imports verispec.x.y
                targets.append(sub if sub in MODULES else stem)
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                target = _known(target)
                edge = Edge(module, target, rel, node.lineno, in_function)
                if target != module and edge not in found:
                    found.append(edge)
    return found


def import_graph() -> dict[str, list[Edge]]:
    return {module: edges_of(module, path) for module, path in MODULES.items()}


GRAPH = import_graph()


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle (as its edges) per strongly connected component that has one (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []
    counter = [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            w = e.target
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles, seen_cycles = [], set()
    for component in components:
        for start in sorted(component):  # a shortest cycle through each module of the component
            cycle = _shortest_cycle(graph, component, start)
            key = frozenset((e.source, e.target) for e in cycle)
            if key not in seen_cycles:
                seen_cycles.add(key)
                cycles.append(cycle)
    return cycles


def _shortest_cycle(graph: dict[str, list[Edge]], component: set[str], start: str) -> list[Edge]:
    """Breadth-first inside the component from `start` back to `start`."""
    parent: dict[str, Edge] = {}
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for e in sorted(graph[v], key=lambda e: e.target):
                if e.target == start:
                    path, u = [e], e.source
                    while u != start:
                        path.append(parent[u])
                        u = parent[u].source
                    return path[::-1]
                if e.target in component and e.target not in seen:
                    seen.add(e.target)
                    parent[e.target] = e
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle of its component")


def _describe(cycles: list[list[Edge]]) -> str:
    lines = []
    for cycle in cycles:
        lines.append(" -> ".join([cycle[0].source] + [e.target for e in cycle]))
        lines += [f"    {e}" for e in cycle]
    return "\n".join(lines)


# --------------------------------------------------------------------------- layers

TOP = ("verispec", "verispec.cli", "verispec.serve", "verispec.bench", "verispec.training",
       "verispec.export")  # `verispec` itself
# is the facade over the generator (its __init__ imports generator, drafters, models)
GENERATOR = ("verispec.generator",)
DRAFTING = ("verispec.drafters", "verispec.acceptance")
ENGINE = ("verispec.engine",)
# the bottom: model code, settings, transformers compatibility, package data, the version,
# layer views of a model, the CPU linear layers and their compiled kernels
BOTTOM = ("verispec.models", "verispec.config", "verispec.compat", "verispec.assets", "verispec.version", "verispec.cpu_linear",
          "verispec.kernels",
          "verispec.layers", "verispec.options", "verispec.progress")
# helpers the drafters use (heads, datastores, calibration files, the chat prompt format):
# below the drafters, above the engine and the bottom
HELPERS = ("verispec.heads", "verispec.datastore", "verispec.calibrate", "verispec.chat", "verispec.draft_init",
           "verispec.quantize", "verispec.vocab_subset")


def _in(module: str, layer: tuple[str, ...]) -> bool:
    if module == PACKAGE:  # the package itself is only its own entry, not a prefix of everything
        return PACKAGE in layer
    return any(module == p or module.startswith(p + ".") for p in layer if p != PACKAGE)


def _breaches(sources: tuple[str, ...], forbidden: tuple[str, ...], allowed: tuple[str, ...] | None = None,
              skip: tuple[str, ...] = ()) -> list[Edge]:
    """Edges from modules in `sources` (not in `skip`) to `forbidden` ones, or (with
    `allowed`) to anything outside `allowed` and the source layer itself."""
    bad = []
    for module, edges in GRAPH.items():
        if not _in(module, sources) or _in(module, skip):
            continue
        for e in edges:
            if allowed is not None:
                if not (_in(e.target, allowed) or _in(e.target, sources)):
                    bad.append(e)
            elif _in(e.target, forbidden):
                bad.append(e)
    return bad


ABOVE_ENGINE = TOP + GENERATOR + DRAFTING + HELPERS

LAYER_RULES = {
    # name: (importing modules, forbidden targets, or None, allowed targets or None)
    "the engine imports only the engine and the bottom (never drafters, acceptance, bench, training, generator, "
    "cli)": (ENGINE, None, BOTTOM),
    "drafters and acceptance never import bench, training, cli, serve, generator or the verispec facade":
        (DRAFTING, TOP + GENERATOR, None),
    "models, config, compat (the bottom) import only the bottom": (BOTTOM, None, BOTTOM),
    "the drafters' helpers (heads, datastore, calibrate, chat, draft_init, quantize, vocab_subset) import only the "
    "engine and the bottom":
        (HELPERS, None, ENGINE + BOTTOM + HELPERS),
    "the generator imports nothing above it": (GENERATOR, TOP, None),
    "bench never imports training or cli": (("verispec.bench",), ("verispec.training", "verispec.cli"), None),
}


def test_import_graph_sees_the_package():
    assert {"verispec.engine.loop", "verispec.drafters.base", "verispec.bench.runner", "verispec.cli"} <= set(MODULES)
    loop_targets = {e.target for e in GRAPH["verispec.engine.loop"]}
    assert "verispec.engine.target" in loop_targets  # relative imports are resolved
    assert any(e.target == "verispec.generator" for e in GRAPH["verispec"])


def test_no_import_cycles():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles in verispec (every import counts, those inside functions too):\n" + _describe(cycles)


@pytest.mark.parametrize("rule", list(LAYER_RULES))
def test_layering(rule):
    sources, forbidden, allowed = LAYER_RULES[rule]
    bad = _breaches(sources, forbidden, allowed)
    assert not bad, f"layering broken ({rule}):\n" + "\n".join(f"    {e}" for e in bad)


# --------------------------------------------------------------------------- lazy imports

# Function-level imports of verispec's own modules exist only to dodge a cycle or a layering
# breach; none is allowed. (Third-party imports inside functions are allowed only for heavy
# optional dependencies, see LAZY_THIRD_PARTY.)
LAZY_THIRD_PARTY = {"matplotlib", "scipy"}


def _lazy_internal(skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> list[Edge]:
    return [e for module, edges in GRAPH.items() for e in edges
            if e.in_function and not _in(module, skip) and (only is None or _in(module, only))]


def test_no_function_level_imports_of_verispec_modules():
    bad = _lazy_internal()
    assert not bad, "verispec modules imported inside functions (import them at the top):\n" + \
        "\n".join(f"    {e}" for e in bad)


TRAINING = ("verispec.training",)


def test_training_uses_of_the_bench_are_its_question_files_only():
    bad = [e for e in _breaches(TRAINING, ("verispec.bench", "verispec.cli"), None)
           if e.target != "verispec.bench.suites"]  # the guard that keeps Spec-Bench questions out of training data
    assert not bad, "training/ imports the bench or the cli:\n" + "\n".join(f"    {e}" for e in bad)
