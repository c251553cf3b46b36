"""Import structure of the package (issue 12): no import circle, and no module importing a layer
above its own. A small AST walk over src/mmtune: every ``import`` counts, at module level or inside
a function (a function-level import of a higher layer is still a dependency on it); imports under
``if TYPE_CHECKING:`` do not.

Layers, bottom to top (a module may import its own layer and those below)::

    base        errors, registry, schema, util           (no mmtune imports but each other)
    config      the recipe schema and its feature sections
    data        formats, templates, sources, tokenization, media processing
    models      networks, loading (trained checkpoints too), adapters, export/merge, built-in models
    train       the loop, objectives, checkpoints, continual strategies
    parallel    distributed.py
    workflows   run set-ups (train/run.py, */run.py, continual/runner.py, workflows/), evaluation
    inference   chat models, the chat session, the context policy, the terminal chat
                (inference.generate and inference.sampling, the one generation loop, sit at the
                models layer: training-time scoring generates with it too)
    app         cli, serve, demos, builtin:tiny-pretrained (it runs the demo's recipe)

Run ``python tests/test_layers.py [SRC_ROOT]`` for the counts (circles, imports inside functions).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS = ("base", "config", "data", "models", "train", "parallel", "workflows", "inference", "app")

#: Module (or package prefix) -> layer; the longest matching prefix wins.
LAYER_OF = {
    "mmtune": "base",  # the package __init__ (imports the schema: config level, checked below)
    "mmtune.errors": "base", "mmtune.registry": "base", "mmtune.schema": "base", "mmtune.util": "base",
    "mmtune.config": "config", "mmtune.encoders.config": "config", "mmtune.multimodal.config": "config",
    "mmtune.continual.config": "config",
    "mmtune.data": "data", "mmtune.multimodal.data": "data", "mmtune.multimodal.tiling": "data",
    "mmtune.multimodal.audio": "data", "mmtune.multimodal.synthetic_images": "data",
    "mmtune.multimodal.synthetic_audio": "data", "mmtune.encoders.corpus": "data", "mmtune.encoders.tasks": "data",
    "mmtune.encoders.tokenizer": "data", "mmtune.encoders.masking": "data", "mmtune.encoders.pairs": "data",
    "mmtune.models": "models", "mmtune.multimodal": "models", "mmtune.encoders": "models",
    "mmtune.continual": "train", "mmtune.continual.nets": "models",
    "mmtune.multimodal.groups": "data", "mmtune.encoders.metrics": "models",
    "mmtune.train": "train", "mmtune.multimodal.objective": "train", "mmtune.multimodal.preference": "train",
    "mmtune.multimodal.stages": "train", "mmtune.encoders.objectives": "train",
    "mmtune.distributed": "parallel",
    "mmtune.workflows": "workflows", "mmtune.train.run": "workflows", "mmtune.multimodal.run": "workflows",
    "mmtune.encoders.run": "workflows", "mmtune.continual.runner": "workflows",
    "mmtune.continual.sweep": "workflows", "mmtune.continual.report": "workflows",
    "mmtune.inference": "inference", "mmtune.evaluation": "workflows",
    "mmtune.inference.generate": "models", "mmtune.inference.sampling": "models", "mmtune.export": "models",
    "mmtune.cli": "app", "mmtune.serve": "app", "mmtune.demo": "app", "mmtune.multimodal.demo": "app",
    "mmtune.pretrained": "app", "mmtune.real_demo": "app", "mmtune.export_gguf": "models",
    "mmtune.multimodal.tasks": "train", "mmtune.continual.sweep_report": "workflows",
    "mmtune.data.check": "workflows",
}

#: Old import paths kept working: a module-level ``__getattr__`` that imports the moved name from
#: its new, higher home on first use. Listed here one by one; nothing else may import upward.
KEPT_ALIASES = {("mmtune.data.preference", "mmtune.train.dpo")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, name: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every mmtune import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def target(base: str, names: list[str]) -> list[str]:
        found = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
        return found + ([base] if len(found) < len(names) and base in modules else [])

    def visit(node, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            func = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "mmtune":
                        out.append((a.name, child.lineno, in_func))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = here
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    base = f"{base}.{child.module}" if child.module else base
                else:
                    base = child.module or ""
                if base.split(".")[0] == "mmtune":
                    for t in target(base, [a.name for a in child.names]):
                        out.append((t, child.lineno, in_func))
            visit(child, func)

    visit(tree, False)
    return out


def graph(root: Path = SRC) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int, bool]]]]:
    files = {module_name(p, root): p for p in (root / "mmtune").rglob("*.py")}
    modules = set(files)
    raw = {m: imports_of(p, m, modules) for m, p in files.items()}
    edges: dict[str, set[str]] = defaultdict(set)
    for m, imps in raw.items():
        own = {m.rsplit(".", k)[0] for k in range(m.count(".") + 1)}  # m and its ancestors
        for t, _, _ in imps:
            if (m, t) in KEPT_ALIASES:  # resolved on attribute access, after both modules are loaded
                continue
            parts = t.split(".")
            for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                dep = ".".join(parts[:k])
                if dep in modules and dep not in own and dep != m:
                    edges[m].add(dep)
        edges.setdefault(m, set())
    return dict(edges), raw


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:k])]
    raise KeyError(module)


def upward_imports(raw) -> list[str]:
    bad = []
    for m, imps in sorted(raw.items()):
        if m == "mmtune":
            continue
        for t, line, _ in imps:
            if (m, t) in KEPT_ALIASES:
                continue
            if LAYERS.index(layer(t)) > LAYERS.index(layer(m)):
                bad.append(f"{m}:{line} ({layer(m)}) imports {t} ({layer(t)})")
    return bad


def stats(root: Path = SRC) -> dict:
    edges, raw = graph(root)
    return {"circles": circles(edges), "imports_inside_functions": sum(f for imps in raw.values() for *_, f in imps),
            "upward": upward_imports(raw)}


def test_no_import_circle():
    edges, _ = graph()
    assert circles(edges) == []


def test_no_module_imports_a_higher_layer():
    _, raw = graph()
    assert upward_imports(raw) == []


def test_the_walk_finds_circles_and_upward_imports(tmp_path):
    pkg = tmp_path / "mmtune"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ..train import loop\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from ..data.a import f\n")
    s = stats(tmp_path)
    assert s["circles"] == [["mmtune.data.a", "mmtune.train.loop"]]
    assert s["imports_inside_functions"] == 1
    assert s["upward"] == ["mmtune.data.a:2 (data) imports mmtune.train.loop (train)"]


def test_every_module_has_a_layer():
    edges, _ = graph()
    for m in edges:
        layer(m)


if __name__ == "__main__":
    s = stats(Path(sys.argv[1]) if len(sys.argv) > 1 else SRC)
    print(f"circles: {len(s['circles'])}")
    for c in s["circles"]:
        print(f"  {len(c)}: {' '.join(c)}")
    print(f"imports inside functions: {s['imports_inside_functions']}")
    print(f"upward imports: {len(s['upward'])}")
    for u in s["upward"]:
        print(f"  {u}")
