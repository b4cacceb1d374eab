"""The configuration reference, docs/configuration-reference.md, generated from the config tree.

Walks the dataclass tree of `fedsim.config.ExperimentConfig`: the sections and keys come from the
dataclasses, the defaults from a default `ExperimentConfig()`, and each key's type and description
from the source of the class that declares it (parsed with `ast`): the annotation as written, with
module-level aliases such as `Kind = Literal["a", "b"]` expanded, and the attribute docstring, the
string literal right after the field. A field without one is listed as "(undocumented)", so the gap
shows. Regenerate after changing a field or its docstring:

    python -m fedsim.config_docs            # writes docs/configuration-reference.md
    python -m fedsim.config_docs --check    # exit 1 if the committed page is out of date

tests/test_docs.py fails while the committed page differs from what this module generates.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from fedsim import config as config_module

REFERENCE_PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration-reference.md"
UNDOCUMENTED = "(undocumented)"


@dataclass(frozen=True)
class Key:
    """One leaf of the config tree: a key a YAML file or `--set` can give a value."""

    dotted: str
    type: str
    default: Any
    doc: str | None


@dataclass(frozen=True)
class Section:
    """One dataclass of the tree (`data.partition`), its own keys and its subsections."""

    dotted: str
    doc: str | None
    keys: list[Key]
    subsections: list[Section]

    def walk(self) -> Iterator[Section]:
        yield self
        for sub in self.subsections:
            yield from sub.walk()


# --- reading the source ----------------------------------------------------------------------


@cache
def _module_tree(path: str) -> ast.Module:
    return ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)


def _aliases(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level type aliases: `X = Literal[...]`, `X: TypeAlias = ...`, `type X = ...`."""
    out: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        elif type(node).__name__ == "TypeAlias":  # `type X = ...` (Python 3.12+)
            target, value = node.name, node.value  # type: ignore[attr-defined]
        else:
            continue
        if isinstance(target, ast.Name) and _looks_like_type(value):
            out[target.id] = value
    return out


def _looks_like_type(node: ast.expr) -> bool:
    """True for `Literal[...]`, `A | B`, `Optional[...]`, `Union[...]` and the like: values that
    can only be types, never the tuples and strings a module also assigns."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return True
    if isinstance(node, ast.Subscript):
        base = node.value
        name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
        return name in {"Literal", "Optional", "Union", "list", "List", "dict", "Dict", "tuple"}
    return False


@dataclass(frozen=True)
class _FieldSource:
    annotation: ast.expr | None
    doc: str | None
    aliases: dict[str, ast.expr]


def _class_fields(cls: type) -> dict[str, _FieldSource]:
    """Each field's annotation and attribute docstring as written in `cls`'s source."""
    path = inspect.getsourcefile(cls)
    if path is None:
        return {}
    tree = _module_tree(path)
    aliases = _aliases(tree)
    node = next(
        (
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.ClassDef) and n.name == cls.__qualname__.split(".")[-1]
        ),
        None,
    )
    if node is None:
        return {}
    out: dict[str, _FieldSource] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        doc = None
        nxt = body[i + 1] if i + 1 < len(body) else None
        if (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            doc = nxt.value.value
        out[stmt.target.id] = _FieldSource(stmt.annotation, doc, aliases)
    return out


def _class_doc(cls: type) -> str | None:
    # A dataclass without a docstring gets a generated signature as __doc__: not documentation.
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):
        return None
    return doc


# --- rendering types, defaults and descriptions ---------------------------------------------

_NAMES = {"None": "null", "NoneType": "null", "Any": "any", "str": "str", "Path": "path"}


def render_type(node: ast.expr | None, aliases: dict[str, ast.expr], depth: int = 0) -> str:
    """A type annotation as a reader of a YAML file thinks of it: `"a" | "b"` for a Literal,
    `null` for None, `list[str]`; aliases defined in the module expanded."""
    if node is None:
        return "any"
    if depth > 20:  # a self-referencing alias
        return ast.unparse(node)

    def sub(n: ast.expr) -> str:
        return render_type(n, aliases, depth + 1)

    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):  # a quoted annotation, or a Literal member
            try:
                return sub(ast.parse(node.value, mode="eval").body)
            except SyntaxError:
                return node.value
        return "null" if node.value is None else repr(node.value)
    if isinstance(node, ast.Name):
        if node.id in aliases:
            return sub(aliases[node.id])
        return _NAMES.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return _NAMES.get(node.attr, node.attr)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{sub(node.left)} | {sub(node.right)}"
    if isinstance(node, ast.Subscript):
        base = node.value
        name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
        args = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
        if name == "Literal":
            return " | ".join(_literal(a) for a in args)
        if name == "Optional":
            return f"{sub(args[0])} | null"
        if name == "Union":
            return " | ".join(sub(a) for a in args)
        if name in aliases:
            return sub(aliases[name])
        return f"{name.lower()}[{', '.join(sub(a) for a in args)}]"
    return ast.unparse(node)


def _literal(node: ast.expr) -> str:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return f'"{node.value}"'
        if node.value is None:
            return "null"
        if isinstance(node.value, bool):
            return "true" if node.value else "false"
    return ast.unparse(node)


def render_default(value: Any) -> str:
    """The default as it reads in YAML."""
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value != value.strip() else value
    if value is None or isinstance(value, bool | int | float | list | dict | tuple):
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        return text.removesuffix("...").strip()
    return repr(value)


def _one_line(doc: str | None) -> str | None:
    if doc is None or not doc.strip():
        return None
    return " ".join(inspect.cleandoc(doc).split())


# --- the tree --------------------------------------------------------------------------------


def build_tree(root: Any = None, dotted: str = "") -> list[Section]:
    """The sections of the config tree, depth first; `root` is a config dataclass instance (a
    default `ExperimentConfig()` when None)."""
    root = config_module.ExperimentConfig() if root is None else root
    sections = []
    for f in dataclasses.fields(root):
        value = getattr(root, f.name)
        if dataclasses.is_dataclass(value):
            sections.append(_section(value, f"{dotted}{f.name}"))
    return sections


def _section(value: Any, dotted: str) -> Section:
    sources = _class_fields(type(value))
    keys, subsections = [], []
    for f in dataclasses.fields(value):
        if not f.init:
            continue
        default = getattr(value, f.name)
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            subsections.append(_section(default, f"{dotted}.{f.name}"))
            continue
        src = sources.get(f.name)
        keys.append(
            Key(
                dotted=f"{dotted}.{f.name}",
                type=render_type(src.annotation, src.aliases) if src else str(f.type),
                default=default,
                doc=_one_line(src.doc) if src else None,
            )
        )
    return Section(dotted, _one_line(_class_doc(type(value))), keys, subsections)


def all_keys(sections: list[Section] | None = None) -> list[str]:
    """Every leaf key of the config tree, dotted."""
    sections = build_tree() if sections is None else sections
    return [k.dotted for top in sections for s in top.walk() for k in s.keys]


# --- markdown ------------------------------------------------------------------------------


def _cell(text: str) -> str:
    """`text` for a table cell: every `|` escaped. Inside a code span an escaped pipe would show
    its backslash (Python-Markdown), so the span is closed around it: `a | b` -> `a `\\|` b`."""
    parts = re.split(r"(`+)", text)
    out, fence = [], None
    for part in parts:
        if part.startswith("`"):
            fence = None if fence == part else (fence or part)
            out.append(part)
        elif fence:
            out.append(part.replace("|", f"{fence}\\|{fence}"))
        else:
            out.append(part.replace("|", "\\|"))
    return "".join(out)


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render(sections: list[Section] | None = None) -> str:
    """docs/configuration-reference.md as text."""
    sections = build_tree() if sections is None else sections
    keys = [k for top in sections for s in top.walk() for k in s.keys]
    missing = [k.dotted for k in keys if k.doc is None]
    out = [
        "<!-- Generated by `python -m fedsim.config_docs` from fedsim/config.py: do not edit by "
        "hand. -->",
        "",
        "# Configuration reference",
        "",
        "Every key of an experiment file, by section, with its type, its default and what it "
        "does; generated from the docstrings in `fedsim/config.py`. A file gives only the keys it "
        "changes; `--set key=value` overrides any of them (the value is read as YAML), and the "
        "run directory's `config.yaml` holds every key as the run used it. `null` is YAML's "
        "None. See [Configuration](configuration.md) for how files are loaded and checked.",
        "",
        f"{len(keys)} keys in {sum(1 for top in sections for _ in top.walk())} sections; "
        f"{len(missing)} undocumented.",
        "",
    ]
    for top in sections:
        for s in top.walk():
            out += [f"## {s.dotted}", ""]
            if s.doc:
                out += [s.doc, ""]
            if s.subsections:
                subs = ", ".join(
                    f"[`{sub.dotted}`](#{_anchor(sub.dotted)})" for sub in s.subsections
                )
                out += [f"Subsections: {subs}.", ""]
            if not s.keys:
                continue
            out += ["| key | type | default | description |", "|---|---|---|---|"]
            for k in s.keys:
                row = [
                    _code(k.dotted),
                    _cell(k.type),
                    _cell(_code(render_default(k.default))),
                    _cell(k.doc or f"*{UNDOCUMENTED}*"),
                ]
                out.append("| " + " | ".join(row) + " |")
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _anchor(dotted: str) -> str:
    """The id that mkdocs (Python-Markdown's toc) gives the heading `## a.b`."""
    return dotted.replace(".", "").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedsim.config_docs", description=__doc__)
    parser.add_argument("out", nargs="?", default=str(REFERENCE_PATH), help="file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    out, text = Path(args.out), render()
    if args.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date: run python -m fedsim.config_docs", file=sys.stderr)
            return 1
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
