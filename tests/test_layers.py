"""The project's import layers (issue 26), read from the source with `ast`: every import of every
module under sweeps/ trainers/ objectives/ eval/ assets/ (top level, and inside functions, classes,
try and `if TYPE_CHECKING:` blocks), `from pkg import submodule` as an edge to the submodule,
relative imports resolved. An import may go to the same layer or a lower one, never up, and no
modules import each other in a cycle, whatever their layers.

A module's layer is that of the longest prefix in LAYERS naming it or a package above it. A package's
`__init__` imports nothing of the project (so the edge a module makes to the packages above it,
which Python imports first, is no edge here)."""

import ast
from pathlib import Path

# Lowest first: (layer, module prefixes). A prefix names a module and everything under it; the most
# specific prefix wins (`assets.build` is layer "asset builder", `assets` itself is "data").
LAYERS = [
    ("bottom", ("trainers.common",)),  # storage, keys, weights, seeds, errors, layout: nothing else of ours
    ("data", ("trainers.image_sets", "assets.digits_networks", "assets.degradations", "assets")),
    ("denoiser", ("trainers.denoiser",)),  # the network call and the noise process: what evaluation and the terms ask
    ("eval", ("eval",)),  # evaluation and the frozen scorers
    ("objectives", ("objectives",)),
    ("trainers", ("trainers",)),  # the rest of trainers/
    ("asset builder", ("assets.build", "assets.digits_t2i", "assets.digits_flow")),  # they train with trainers.loop
    ("sweeps", ("sweeps",)),
]

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sweeps", "trainers", "objectives", "eval", "assets")


# ----------------------------------------------------------------------------------------- the reader


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project by dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def resolve(name: str, known) -> str | None:
    """The deepest module of ours that `import name` runs (None: not ours)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def imports_in(source: str, module: str, package: bool, known) -> set[str]:
    """The modules of ours (names in `known`) that `module`'s source imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name, known)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package (its own name, for a package)
                base = module.split(".") if package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                target = resolve(f"{origin}.{alias.name}", known)  # `from pkg import submodule`
                if target and target != resolve(origin, known):
                    found.add(target)
                else:
                    target = resolve(origin, known)
                    if target:
                        found.add(target)
    return found


def ancestors(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:end]) for end in range(1, len(parts))}


def import_graph(root: Path = ROOT) -> tuple[dict[str, set[str]], dict[str, Path]]:
    """importer -> the modules of ours it imports (edges to its own ancestor packages left out)."""
    modules = module_files(root)
    graph = {}
    for name, path in modules.items():
        targets = imports_in(path.read_text(), name, is_package(name, modules), modules)
        graph[name] = targets - ancestors(name)
    return graph, modules


# ---------------------------------------------------------------------------------------- the checker


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index in `layers` of the longest prefix naming `module` or a package above it."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def unplaced(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    names = set(graph) | set().union(*graph.values())
    return [f"{name}: in no layer (add it to LAYERS)" for name in sorted(names) if layer_of(name, layers) is None]


def upward(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Each import that goes up a layer: importer (its layer) -> imported (its layer)."""
    problems = []
    for importer in sorted(graph):
        low = layer_of(importer, layers)
        for imported in sorted(graph[importer]):
            high = layer_of(imported, layers)
            if low is not None and high is not None and high > low:
                problems.append(f"{importer} (layer {low} {layers[low][0]}) -> {imported} (layer {high} {layers[high][0]})")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, and the modules importing themselves
    (Tarjan's algorithm, iterative), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    nodes = sorted(set(graph) | set().union(*graph.values()))
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return sorted(found)


def cycle_problems(graph: dict[str, set[str]]) -> list[str]:
    return [f"import cycle: {' <-> '.join(component)}" for component in cycles(graph)]


# ------------------------------------------------------------------------------------ the real tree


def test_every_module_is_in_a_layer():
    graph, _ = import_graph()
    assert not unplaced(graph), "\n".join(unplaced(graph))


def test_package_inits_import_nothing_of_the_project():
    modules = module_files()
    problems = []
    for name, path in sorted(modules.items()):
        if is_package(name, modules):
            targets = imports_in(path.read_text(), name, True, modules) - ancestors(name) - {name}
            problems += [f"{name} (package __init__) -> {target}" for target in sorted(targets)]
    assert not problems, "a package's __init__ imports nothing of the project:\n" + "\n".join(problems)


def test_no_import_goes_up_a_layer():
    graph, _ = import_graph()
    problems = upward(graph)
    assert not problems, "imports that go up a layer (importer -> imported):\n" + "\n".join(problems)


def test_no_import_cycle():
    graph, _ = import_graph()
    problems = cycle_problems(graph)
    assert not problems, "\n".join(problems)


def test_the_reader_sees_every_import_of_the_real_tree():
    """A sample of the kinds of import the tree holds: at the top, inside a function, `from pkg import
    submodule`; if the reader missed them, the checks above would pass on nothing."""
    graph, modules = import_graph()
    assert len(modules) > 40 and sum(len(targets) for targets in graph.values()) > 80
    imported = set().union(*graph.values())
    assert {"trainers.common.storage", "trainers.common.errors", "trainers.loop", "eval.evaluate"} <= imported


# ----------------------------------------------------------------------------------- the checker's own

FAKE = [("low", ("pkg.base",)), ("mid", ("pkg.mid", "pkg")), ("high", ("pkg.top",))]


def test_an_upward_import_is_reported_with_both_layers():
    problems = upward({"pkg.base.a": {"pkg.top.b"}, "pkg.top.b": set()}, FAKE)
    assert problems == ["pkg.base.a (layer 0 low) -> pkg.top.b (layer 2 high)"]


def test_the_most_specific_prefix_wins():
    assert layer_of("pkg.base.a", FAKE) == 0 and layer_of("pkg", FAKE) == 1 and layer_of("pkg.other", FAKE) == 1
    assert layer_of("pkg.top", FAKE) == 2 and layer_of("pkgs", FAKE) is None and layer_of("elsewhere", FAKE) is None


def test_a_module_in_no_layer_is_reported():
    assert unplaced({"pkg.top.a": {"elsewhere.b"}}, FAKE) == ["elsewhere.b: in no layer (add it to LAYERS)"]


def test_a_two_module_cycle_is_reported_even_within_a_layer():
    graph = {"pkg.mid.a": {"pkg.mid.b"}, "pkg.mid.b": {"pkg.mid.a", "pkg.base.c"}, "pkg.base.c": set()}
    assert cycle_problems(graph) == ["import cycle: pkg.mid.a <-> pkg.mid.b"]
    assert upward(graph, FAKE) == []


def test_a_longer_cycle_and_a_self_import_are_reported():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]


def test_a_clean_graph_passes():
    graph = {"pkg.top.a": {"pkg.mid.b", "pkg.base.c"}, "pkg.mid.b": {"pkg.base.c", "pkg.mid.d"}, "pkg.mid.d": set(),
             "pkg.base.c": set()}
    assert upward(graph, FAKE) == [] and cycle_problems(graph) == [] and unplaced(graph, FAKE) == []


def test_the_reader_resolves_every_form_of_import():
    known = {"pkg", "pkg.base", "pkg.base.io", "pkg.mid", "pkg.mid.a", "pkg.mid.b", "pkg.top"}
    source = """
import os
import pkg.base.io
from pkg.base import io as io2
from pkg.mid import a, helper
try:
    from .b import thing
except ImportError:
    pass
def later():
    from pkg.top import main
class Holder:
    import pkg.base.missing
"""
    assert imports_in(source, "pkg.mid.c", False, known) == {"pkg.base.io", "pkg.mid.a", "pkg.mid", "pkg.mid.b", "pkg.top",
                                                              "pkg.base"}
    assert imports_in("from . import b\nfrom .. import base\n", "pkg.mid", True, known) == {"pkg.mid.b", "pkg.base"}
