"""Rebuild corpus.txt from text that ships with CPython (PSF licence), so nothing is downloaded.

Sources: the reference-manual topics in ``pydoc_data.topics`` and the docstrings of the pure-Python
standard-library modules. Each prose paragraph becomes one line (whitespace collapsed); paragraphs are
separated by a blank line, so ``pithtrain.data`` treats every paragraph as one document. Code samples,
grammar rules, tables, headings and fragments (< MIN_WORDS words, or < MIN_PROSE of the characters letters
or spaces) are dropped, and exact duplicates removed.

    python framework/pithtrain/assets/build_corpus.py > framework/pithtrain/assets/corpus.txt
"""

import ast
import pydoc_data.topics
import re
import sys
import sysconfig
from pathlib import Path

MIN_WORDS = 12
MIN_PROSE = 0.75
SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "pydoc_data"}


def paragraphs(text):
    """Yield prose paragraphs of reST-like text, each collapsed onto one line."""
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines() if ln.strip() and not re.fullmatch(r"\s*[*=~^#-]{3,}\s*", ln)]
        if not lines or lines[0][:1].isspace() or any(">>>" in ln or "::=" in ln for ln in lines):
            continue  # indented code / doctest / grammar
        para = " ".join(" ".join(lines).split())
        prose = sum(c.isalpha() or c == " " for c in para) / len(para)
        if len(para.split()) >= MIN_WORDS and prose >= MIN_PROSE:
            yield para


def docstrings(lib):
    for path in sorted(lib.rglob("*.py")):
        if SKIP & set(path.relative_to(lib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                yield ast.get_docstring(node) or ""


def main():
    seen, out = set(), []
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    texts += docstrings(Path(sysconfig.get_paths()["stdlib"]))
    for text in texts:
        for para in paragraphs(text):
            if para not in seen:
                seen.add(para)
                out.append(para)
    sys.stdout.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
