"""Edits to a workspace's source at anchors that must each occur exactly once (the feature oracles' one editor).

The oracle agent stages this file beside every solution's scripts, so `apply.py` imports it as `source_edit`.
Anchors are exact text, not line numbers or diff context, so an oracle survives unrelated edits to the file and
stops with a one-line message (exit status 1) when the framework no longer has the code it hooks into. Nothing
is written until every anchor of every file was found.
"""

from __future__ import annotations

import sys
from pathlib import Path


class SourceEdits:
    """Every edit of one oracle: `edits.file(rel)` gives one file's editor, `edits.write()` writes them all."""

    def __init__(self, root: Path | str, prog: str = "apply.py"):
        self.root, self.prog = Path(root), prog
        self.texts: dict[str, str] = {}  # rel -> edited text

    def _fail(self, msg: str):
        sys.exit(f"{self.prog}: {msg}")

    def text(self, rel: str) -> str:
        if rel not in self.texts:
            path = self.root / rel
            if not path.is_file():
                self._fail(f"{rel}: no such file in {self.root}")
            self.texts[rel] = path.read_text()
        return self.texts[rel]

    def find(self, rel: str, anchor: str) -> int:
        """Where `anchor` starts in `rel`; stops unless it occurs exactly once."""
        text = self.text(rel)
        n = text.count(anchor)
        if n != 1:
            first = anchor.strip().splitlines()[0] if anchor.strip() else anchor
            self._fail(f"{rel}: anchor {first!r} found {n} times, expected once")
        return text.index(anchor)

    def replace(self, rel: str, old: str, new: str) -> None:
        i = self.find(rel, old)
        self.texts[rel] = self.texts[rel][:i] + new + self.texts[rel][i + len(old) :]

    def replace_each(self, edits) -> None:
        """`replace` for each (rel, old, new) in `edits`, in order."""
        for rel, old, new in edits:
            self.replace(rel, old, new)

    def after_line(self, rel: str, anchor: str, block: str) -> None:
        """Insert `block` (whole lines) after the line holding `anchor`."""
        text = self.text(rel)
        end = text.find("\n", self.find(rel, anchor)) + 1 or len(text)
        self.texts[rel] = text[:end] + block + text[end:]

    def before_line(self, rel: str, anchor: str, block: str) -> None:
        """Insert `block` (whole lines) before the line holding `anchor`."""
        text = self.text(rel)
        start = text.rfind("\n", 0, self.find(rel, anchor)) + 1
        self.texts[rel] = text[:start] + block + text[start:]

    def indent(self, rel: str, anchor: str) -> str:
        """The leading whitespace of the line holding `anchor`."""
        text = self.text(rel)
        line = text[text.rfind("\n", 0, self.find(rel, anchor)) + 1 :]
        return line[: len(line) - len(line.lstrip())]

    def add_file(self, rel: str, text: str) -> None:
        """A new file; stops if `rel` already exists (the oracle would overwrite someone's file)."""
        if (self.root / rel).exists() or rel in self.texts:
            self._fail(f"{rel} already exists")
        self.texts[rel] = text

    def file(self, rel: str) -> FileEdits:
        self.text(rel)
        return FileEdits(self, rel)

    def write(self) -> None:
        for rel, text in self.texts.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)


class FileEdits:
    """SourceEdits' methods bound to one file."""

    def __init__(self, edits: SourceEdits, rel: str):
        self.edits, self.rel = edits, rel

    def find(self, anchor: str) -> int:
        return self.edits.find(self.rel, anchor)

    def replace(self, old: str, new: str) -> None:
        self.edits.replace(self.rel, old, new)

    def after_line(self, anchor: str, block: str) -> None:
        self.edits.after_line(self.rel, anchor, block)

    def before_line(self, anchor: str, block: str) -> None:
        self.edits.before_line(self.rel, anchor, block)

    def indent(self, anchor: str) -> str:
        return self.edits.indent(self.rel, anchor)
