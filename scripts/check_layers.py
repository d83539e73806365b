"""Checks the import layering of ``engine/`` (docs/architecture.md, "Layers").

Every module imports only modules of its own layer or of lower ones; no import of an engine
module sits inside a function (a cycle hidden that way is still a cycle); and the module
import graph has no cycle. ``if TYPE_CHECKING:`` imports count like any other. Run from the
repository root: ``python scripts/check_layers.py`` (exit status 1 on any finding).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

# Lowest first. A module belongs to the first entry whose name equals it or is its package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("engine._native", "engine._log", "engine.units", "engine.errors", "engine.dtypes", "engine.devices",
                "engine.procinfo", "engine.validate", "engine.ds_config", "engine.config", "engine.presets",
                "engine.data")),
    ("memory, optim", ("engine.memory", "engine.optim")),
    ("storage", ("engine.storage",)),
    # torch.distributed: the process group and collectives the runtime uses (imports only leaves).
    ("distributed", ("engine.distributed",)),
    ("offload runtime", ("engine.offload",)),
    ("checkpoint, peft", ("engine.checkpoint", "engine.peft")),
    ("trainer facade", ("engine.trainer",)),
    ("entry points", ("engine.api", "engine.bench", "engine.selfcheck", "engine.cli", "engine.__main__", "engine")),
    # Drop-in routes for other training stacks (HF Trainer/TRL, DeepSpeed scripts): they build on
    # the public entry points; nothing in the engine imports them.
    ("integrations", ("engine.integrations", "engine.deepspeed_compat")),
]


def layer_of(module: str) -> int:
    for rank, (_, names) in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return rank
    raise SystemExit(f"check_layers: {module} is in no layer; add it to LAYERS in {__file__}")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(importer: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """The engine modules an ``from ... import ...`` statement names."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith("engine"):
        return []
    names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    return names or [target]  # "from .x import Name": the module x itself


def imports(path: Path, importer: str, known: set[str]) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(module-level engine imports, engine imports inside functions) as (line, module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    top, nested = [], []

    def targets(node: ast.AST) -> list[str]:
        if isinstance(node, ast.ImportFrom):
            return resolve(importer, is_package, node, known)
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith("engine")]
        return []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for target in targets(child):
                (nested if in_function else top).append((child.lineno, target))
            visit(child, inside)

    visit(tree, False)
    return top, nested


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def check(root: Path) -> list[str]:
    """Every layering problem of the ``engine`` package under ``root``."""
    files = sorted((root / "engine").rglob("*.py"))
    known = {module_name(f, root) for f in files} | {"engine._native"}
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    for path in files:
        importer = module_name(path, root)
        top, nested = imports(path, importer, known)
        rel = path.relative_to(root)
        for line, target in nested:
            problems.append(f"{rel}:{line}: imports {target} inside a function (import it at the top)")
        for line, target in top:
            if target == importer:
                continue
            if layer_of(target) > layer_of(importer):
                problems.append(f"{rel}:{line}: {importer} ({LAYERS[layer_of(importer)][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]}), a higher layer")
            if target in known:
                graph.setdefault(importer, set()).add(target)
    for cycle in find_cycles(graph):
        problems.append("import cycle: " + " <-> ".join(cycle))
    return problems


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    problems = check(root)
    for p in problems:
        print(p)
    print(f"check_layers: {len(list((root / 'engine').rglob('*.py')))} modules, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
