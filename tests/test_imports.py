"""No two emtile modules import each other, directly or through others.

Every import statement in a file counts, at module level or inside a function: a function-level
import hides a cycle from Python at import time, not from the reader. ``from emtile import x``
counts as importing ``emtile.x`` when ``x`` is a submodule (and only that: the package's
``__init__`` is running already or is light), else as importing ``emtile``; ``from emtile.a
import b`` as importing ``emtile.a`` (or ``emtile.a.b`` when that is a submodule). A package's ``__init__`` is the module named after the package; its lazy
re-exports (``emtile/__init__.py``'s ``_LAZY``) are strings, not imports, so they do not count.
"""

import ast
from pathlib import Path

import emtile

ROOT = Path(emtile.__file__).parent

# Cycles known when this test was written, in files other people are rewriting; each entry is the
# cycle's set of modules, removed here by whoever breaks it. Any other cycle fails the test.
KNOWN = {
}


def module_names():
    """``{module name: file}`` of every module under ``emtile/``."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(module, level, here, is_package):
    """The absolute name of a (possibly relative) ``from ... import`` in module ``here``."""
    if not level:
        return module
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name, path, modules):
    """The emtile modules that the file of module ``name`` imports anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, name, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    out = set()
    for target in found:
        # "import emtile.a.b" runs emtile.a.b; credit the deepest emtile module named
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_graph():
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph):
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _path(graph, comp):
    """One cycle through the first module of ``comp``, for the message: a -> b -> a."""
    start, members = comp[0], set(comp)
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                chain = [v]
                while prev[chain[-1]] is not None:
                    chain.append(prev[chain[-1]])
                return " -> ".join([start, *reversed(chain[:-1]), start]) if len(chain) > 1 \
                    else f"{start} -> {start}"
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return " <-> ".join(comp)


def test_the_finder_sees_function_level_and_from_imports(tmp_path):
    modules = {"emtile": None, "emtile.a": None, "emtile.b": None, "emtile.c": None,
               "emtile.sub": None, "emtile.sub.d": None}
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from emtile.b import thing\n")
    b = tmp_path / "b.py"
    b.write_text("from emtile import c\nimport numpy\n")
    c = tmp_path / "c.py"
    c.write_text("from . import a\nfrom .sub import d\n")
    graph = {"emtile.a": imports_of("emtile.a", a, modules),
             "emtile.b": imports_of("emtile.b", b, modules),
             "emtile.c": imports_of("emtile.c", c, modules)}
    assert graph == {"emtile.a": {"emtile.b"}, "emtile.b": {"emtile.c"},
                     "emtile.c": {"emtile.a", "emtile.sub.d"}}
    assert cycles(graph) == [("emtile.a", "emtile.b", "emtile.c")]
    assert _path(graph, ("emtile.a", "emtile.b", "emtile.c")) == \
        "emtile.a -> emtile.b -> emtile.c -> emtile.a"


def test_no_import_cycles_among_emtile_modules():
    graph = import_graph()
    assert "emtile.unet" in graph and "emtile.normalize" in graph
    found = cycles(graph)
    new = [c for c in found if frozenset(c) not in KNOWN]
    assert not new, "import cycles: " + "; ".join(_path(graph, c) for c in new)
    gone = [sorted(k) for k in KNOWN if tuple(sorted(k)) not in found]
    assert not gone, f"these known cycles are gone: remove them from KNOWN: {gone}"


def test_the_model_modules_form_no_pair():
    """The loading path: unet, package, normalize and model import one way only."""
    graph = import_graph()
    for a, b in [("emtile.unet", "emtile.package"), ("emtile.unet", "emtile.model"),
                 ("emtile.package", "emtile.model"), ("emtile.normalize", "emtile.model"),
                 ("emtile.normalize", "emtile.package"), ("emtile.normalize", "emtile.unet")]:
        assert b not in graph[a], f"{a} imports {b}"
