"""An AST scan for code that unpickles (or writes pickles that a reader must unpickle).

A line regex misses aliases (`import pickle as p`, `from torch import load as L`), calls split
over lines, and modules that unpickle under other names (cloudpickle, shelve, joblib); the syntax
tree has none of those blind spots and ignores comments and strings. The scan is deliberately
conservative: a local variable named like an unpickling module is flagged too.
"""

from __future__ import annotations

import ast
from pathlib import Path

UNPICKLING_MODULES = frozenset(
    {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
)
"""Modules whose loaders run pickle (or marshal) on their input; any use of them is flagged."""

PICKLE_FUNCTIONS = frozenset({"read_pickle", "to_pickle"})
"""pandas' (and others') pickle readers and writers, flagged under any module."""

TORCH_LOADERS = frozenset(
    {"torch.load", "torch.serialization.load", "torch.hub.load_state_dict_from_url"}
)
"""torch.load and the helpers that forward to it: allowed only with `weights_only=True`."""

DYNAMIC_IMPORTS = frozenset({"importlib.import_module", "__import__"})


def _components(dotted: str) -> list[str]:
    return [part for part in dotted.split(".") if part]


def _names_unpickler(dotted: str) -> bool:
    parts = _components(dotted)
    return any(p in UNPICKLING_MODULES for p in parts) or bool(
        parts and parts[-1] in PICKLE_FUNCTIONS
    )


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the dotted name it was imported as, over the whole module (scopes merged:
    a name imported in one function and reused in another is rare and would only over-flag)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for item in node.names:
                # `import a.b` binds `a`; `import a.b as c` binds `c` to a.b
                if item.asname:
                    aliases[item.asname] = item.name
                else:
                    top = item.name.split(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for item in node.names:
                aliases[item.asname or item.name] = f"{node.module}.{item.name}"
    return aliases


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """`t.serialization.load` -> "torch.serialization.load" when `t` is torch; None for a chain
    that does not start at a plain name (a call result, a subscript)."""
    attrs: list[str] = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([aliases.get(node.id, node.id), *reversed(attrs)])


def _import_findings(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        names = [item.name for item in node.names]
    else:
        module = node.module or ""
        names = [f"{module}.{item.name}" for item in node.names]
    return [f"imports {name}" for name in names if _names_unpickler(name)]


def _call_findings(node: ast.Call, aliases: dict[str, str]) -> list[str]:
    found = []
    for kw in node.keywords:
        # allow_pickle=<anything but the constant False> lets numpy unpickle object arrays
        if kw.arg == "allow_pickle" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value is False
        ):
            found.append(f"passes allow_pickle={ast.unparse(kw.value)}")
    name = _dotted(node.func, aliases)
    if name in TORCH_LOADERS and not _has_weights_only_true(node):
        found.append(f"calls {name} without weights_only=True")
    if name in DYNAMIC_IMPORTS and node.args:
        first = node.args[0]
        literal = first.value if isinstance(first, ast.Constant) else None
        if isinstance(literal, str) and _names_unpickler(literal):
            found.append(f"imports {literal} dynamically")
    return found


def _has_weights_only_true(call: ast.Call) -> bool:
    return any(
        kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
        for kw in call.keywords
    )


def _reference_findings(node: ast.expr, aliases: dict[str, str], called: bool) -> list[str]:
    name = _dotted(node, aliases)
    if name is None:
        return []
    if _names_unpickler(name):
        return [f"uses {name}"]
    if name in TORCH_LOADERS and not called:
        # passed around (partial, map, an alias by assignment): its keywords cannot be checked
        return [f"refers to {name} outside a call"]
    return []


def _outermost_chains(tree: ast.AST) -> list[tuple[ast.expr, bool]]:
    """Every name/attribute chain not nested in a longer one, and whether it is a call's func."""
    inner: set[int] = set()
    funcs: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            inner.add(id(node.value))
        elif isinstance(node, ast.Call):
            funcs.add(id(node.func))
    return [
        (node, id(node) in funcs)
        for node in ast.walk(tree)
        if isinstance(node, ast.Name | ast.Attribute) and id(node) not in inner
    ]


def scan_source(source: str, filename: str = "<snippet>") -> list[str]:
    """Findings `filename:line: what` for each way `source` could unpickle; [] when none."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.update((node.lineno, what) for what in _import_findings(node))
        elif isinstance(node, ast.Call):
            found.update((node.lineno, what) for what in _call_findings(node, aliases))
    for node, called in _outermost_chains(tree):
        found.update((node.lineno, what) for what in _reference_findings(node, aliases, called))
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


def scan_package(root: Path) -> list[str]:
    """`scan_source` over every module under `root`."""
    findings: list[str] = []
    for path in sorted(root.rglob("*.py")):
        findings += scan_source(path.read_text(), str(path))
    return findings
