"""Edits to one Python file at places found with `ast` (PithTrain's feature oracles' solve.py): not line numbers or
diff context, so an oracle survives unrelated edits to the file; a place it cannot find exactly once stops it with
exit status 1 and the file untouched. The oracle agent stages this file beside every solution's scripts.
"""

import ast
import sys
from pathlib import Path


class Anchor(Exception):
    pass


def one(nodes: list, what: str):
    if len(nodes) != 1:
        raise Anchor(f"expected exactly one {what}, found {len(nodes)}")
    return nodes[0]


def top(tree: ast.Module, kind, name: str):
    return one([n for n in tree.body if isinstance(n, kind) and n.name == name], f"top-level {name}")


def method(cls: ast.ClassDef, name: str) -> ast.FunctionDef:
    found = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return one(found, f"{cls.name}.{name}")


def calls(node: ast.AST, name: str) -> list[ast.Call]:
    """Calls of `name` or `anything.name` inside node."""
    return [n for n in ast.walk(node) if isinstance(n, ast.Call) and (
        (isinstance(n.func, ast.Name) and n.func.id == name) or (isinstance(n.func, ast.Attribute) and n.func.attr == name))]  # fmt: skip


class Source:
    """The file as lines; every edit re-parses, so later anchors see earlier edits."""

    def __init__(self, text: str):
        self.lines = text.splitlines(keepends=True)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def tree(self) -> ast.Module:
        return ast.parse(self.text)

    def insert(self, after_line: int, text: str) -> None:  # after 1-based line `after_line`
        self.lines[after_line:after_line] = text.splitlines(keepends=True)

    def replace(self, first: int, last: int, text: str) -> None:  # 1-based, inclusive
        self.lines[first - 1 : last] = text.splitlines(keepends=True)

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node)


def main(edit, marker: str, done: str) -> int:
    """`python solve.py <file>`: edit(Source) the file once (none of it may mention `marker` yet)."""
    path = Path(sys.argv[1])
    src = Source(path.read_text())
    if marker in src.text:
        print(f"solve.py: {path} already mentions {marker}; refusing to edit twice", file=sys.stderr)
        return 1
    try:
        edit(src)
    except Anchor as e:
        print(f"solve.py: {path}: {e} (the framework changed under the oracle)", file=sys.stderr)
        return 1
    path.write_text(src.text)
    print(f"solve.py: {path}: {done}")
    return 0
