"""Grade a Q&A answer against a key of code anchors and facts. Standalone: stdlib only, Python >= 3.11.

The harness copies this file into every task's hidden tests folder (`<tests>/qa_keys.py`, see
verifier.py), so a Q&A task's test.sh just runs

    python3 "$TESTS/qa_keys.py" score --key "$TESTS/keys/$ATE_FRAMEWORK_BASE.toml" \
        --workspace "$WS" --answer "$ATE_ANSWER" --out "$OUT/reward.json"

Key file (`tests/keys/<framework>.toml`):

    max_citations = 30     # optional: more citations than this fails (no shotgun answers)
    max_range = 40         # optional: a `path:a-b` citation longer than this hits no anchor

    [[anchors]]            # a place the answer must cite
    id = "ds_cos_sin"
    file = "pithtrain/models/deepseek_v2.py"
    symbols = ["rope_tables", "DeepseekV2.rope",                     # any one of them; an entry
               {file = "pithtrain/models/blocks.py", symbol = 'decoder_forward:model\\.rope\\('}]  # may name its file
    required = true        # default
    negative = false       # true: shows where an absent feature would live; `absent` regexes must
    absent = []            #   not match its files (else the key is stale), and a fact must say it is absent

    [[facts]]              # a claim the answer must make: any regex matches (case-insensitive)
    id = "ds_interleaved"
    any = ['deepseek(?:(?!qwen)[\\s\\S]){0,400}?interleav']
    required = true

    [[forbidden]]          # a claim the answer must not make: any regex matching fails the answer ...
    id = "claims_cp"
    any = ['ring[ -]?attention']
    unless = ['\\b(?:no|not|without)\\b']   # optional: ... unless one matches the sentence holding the match

A symbol is `func`, `Class`, `Class.method` (any depth) or a module-level assignment name, resolved
with `ast` when the answer is checked, so keys survive edits that move code. `Symbol:regex` narrows
it to the statements inside the symbol whose lines match the regex (e.g. the call that rotates q, k).
An anchor is hit when a cited line (or a cited range of at most max_range lines) overlaps its span.

Citations: `path:12`, `path:12-20`, `path:12,15`, `path#L12-L20`, optionally in backticks. Paths are
relative to the workspace; a leading `./`, the absolute workspace path, `/workspace/` or other
leading folders are stripped, and a bare file name resolves when it is unique in the workspace. A
citation of a file that does not exist or of a line past its end is bogus.

A sentence, for `unless`, is the text between breaks: `.`, `!`, `?` or `;` before white space, a blank
line, or a line break before a list item, heading or table row (a line wrapped inside a sentence does
not end it). So a negated mention ("there is no ring attention") is forgiven, a plain claim is not.

Ids are unique across anchors, facts and forbidden claims. Reward is strict: 1.0 only when every
required anchor is hit, every required fact is present, no forbidden claim is made, no citation is
bogus and the citation count is within max_citations; otherwise 0.0, with sub-scores saying why. An
anchor none of whose symbols resolves (or a broken key) is a verifier error (exit 2), never a zero
for the agent; `check` (CI) is stricter and wants every listed symbol to resolve.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_CITATIONS = 30
DEFAULT_MAX_RANGE = 40
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", ".cache"}

_PATH = r"(?P<path>(?:\.{0,2}/)?(?:[\w.\-]+/)*[\w\-][\w.\-]*\.[A-Za-z]\w*)"
_LINES = r"(?::L?(?P<a>\d+)(?:\s*[-\u2013]\s*L?(?P<b>\d+))?(?P<more>(?:,\s?\d+(?:-\d+)?)*)|#L(?P<c>\d+)(?:-L?(?P<d>\d+))?)"
CITATION_RE = re.compile(r"(?<![\w:/.\-])" + _PATH + _LINES)


class KeyFileError(Exception):
    """The key does not resolve against the workspace (stale key or bad key file)."""


@dataclass
class Citation:
    text: str  # as written
    path: str  # as written, normalised a little
    start: int
    end: int
    files: list[str] = field(default_factory=list)  # workspace-relative candidates it resolved to
    bogus: str = ""  # why it points outside the codebase


# ------------------------------------------------------------------------------------- citations


def parse_citations(answer: str) -> list[Citation]:
    """Every `path:line[-end][,line...]` / `path#Lx-Ly` in the answer, one Citation per line or range."""
    out = []
    for m in CITATION_RE.finditer(answer):
        if m["c"]:
            ranges = [(int(m["c"]), int(m["d"] or m["c"]))]
        else:
            ranges = [(int(m["a"]), int(m["b"] or m["a"]))]
            for part in filter(None, (m["more"] or "").split(",")):
                lo, _, hi = part.strip().partition("-")
                ranges.append((int(lo), int(hi or lo)))
        out += [Citation(m.group(0), m["path"], a, b) for a, b in ranges]
    return out


def workspace_files(workspace: Path) -> dict[str, Path]:
    """Relative path -> file, for every file of the codebase (skipping VCS, caches and run outputs)."""
    files = {}
    for root, dirs, names in os.walk(workspace):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for n in names:
            p = Path(root) / n
            files[p.relative_to(workspace).as_posix()] = p
    return files


def resolve_path(path: str, workspace: Path, files: dict[str, Path]) -> list[str]:
    """Workspace-relative candidates for a cited path (see the module docstring for what is tolerated)."""
    p = path
    for prefix in (str(workspace).rstrip("/") + "/", "/workspace/"):
        if p.startswith(prefix):
            p = p[len(prefix):]
    while p.startswith("./"):
        p = p[2:]
    p = p.lstrip("/")
    if p in files:
        return [p]
    parts = p.split("/")
    for i in range(1, len(parts)):  # extra leading folders, e.g. framework/pithtrain/...
        if "/".join(parts[i:]) in files:
            return ["/".join(parts[i:])]
    return sorted(f for f in files if f.endswith("/" + p))  # a bare or partial path


_line_counts: dict[Path, int] = {}


def line_count(path: Path) -> int:
    if path not in _line_counts:
        try:
            _line_counts[path] = len(path.read_bytes().splitlines())
        except OSError:
            _line_counts[path] = 0
    return _line_counts[path]


def check_citations(cites: list[Citation], workspace: Path, files: dict[str, Path]) -> None:
    """Fill `files` and `bogus` of each citation."""
    for c in cites:
        candidates = resolve_path(c.path, workspace, files)
        if not candidates:
            c.bogus = "no such file in the workspace"
        elif c.start < 1 or c.end < c.start:
            c.bogus = "invalid line range"
        else:
            c.files = [f for f in candidates if c.end <= line_count(files[f])]
            if not c.files:
                c.bogus = f"line {c.end} is past the end of the file ({line_count(files[candidates[0]])} lines)"


# ------------------------------------------------------------------------------------- anchors


def _find(body: list[ast.stmt], name: str) -> ast.AST | None:
    found = None
    for n in body:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name:
            found = n
        elif isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets):
            found = n
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == name:
            found = n
    return found  # the last definition wins, as at run time


def _stmt_span(s: ast.stmt) -> tuple[int, int]:
    """A statement's lines; for a compound statement only its header (a loop is not its body)."""
    body = getattr(s, "body", None)
    if isinstance(body, list) and body:
        return s.lineno, max(s.lineno, body[0].lineno - 1)
    return s.lineno, s.end_lineno or s.lineno


def symbol_spans(source: str, symbol: str, where: str = "<file>") -> list[tuple[int, int]]:
    """Line spans (1-based, inclusive) of `Symbol` or `Symbol:regex` in `source`; KeyFileError if absent."""
    name, _, pattern = symbol.partition(":")
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise KeyFileError(f"{where}: cannot parse ({e.msg}, line {e.lineno})") from None
    node: ast.AST = tree
    for part in name.split("."):
        node = _find(getattr(node, "body", []), part)
        if node is None:
            raise KeyFileError(f"{where}: no symbol {name!r}")
    start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    end = node.end_lineno or node.lineno
    if not pattern:
        return [(start, end)]
    lines = source.splitlines()
    rx = re.compile(pattern)
    hits = [n for n in range(start, end + 1) if rx.search(lines[n - 1])]
    if not hits:
        raise KeyFileError(f"{where}: no line of {name!r} matches {pattern!r}")
    stmts = [s for s in ast.walk(node) if isinstance(s, ast.stmt) and s is not node]
    spans = set()
    for n in hits:
        around = [_stmt_span(s) for s in stmts if _stmt_span(s)[0] <= n <= _stmt_span(s)[1]]
        spans.add(min(around, key=lambda ab: ab[1] - ab[0]) if around else (n, n))
    return sorted(spans)


@dataclass
class Anchor:
    id: str
    spans: list[tuple[str, int, int]]  # (file, first line, last line)
    required: bool = True
    negative: bool = False


@dataclass
class Fact:
    id: str
    patterns: list[re.Pattern]
    required: bool = True


@dataclass
class Forbidden:
    id: str
    patterns: list[re.Pattern]
    unless: list[re.Pattern] = field(default_factory=list)


@dataclass
class Key:
    anchors: list[Anchor]
    facts: list[Fact]
    max_citations: int = DEFAULT_MAX_CITATIONS
    max_range: int = DEFAULT_MAX_RANGE
    forbidden: list[Forbidden] = field(default_factory=list)


def _resolve_anchor(a: dict, aid: str, workspace: Path) -> tuple[list[tuple[str, int, int]], list[str]]:
    """(spans of the symbols that resolve, errors of those that do not)."""
    entries = a.get("symbols") or ([a["symbol"]] if "symbol" in a else [])
    if not entries:
        return [], [f"anchor {aid}: needs symbol or symbols"]
    spans, errors, sources = [], [], {}
    for e in entries:
        file, symbol = (e.get("file", a.get("file")), e.get("symbol")) if isinstance(e, dict) else (a.get("file"), e)
        if not file or not symbol:
            errors.append(f"anchor {aid}: {e!r} needs a file and a symbol")
            continue
        if file not in sources:
            path = Path(workspace) / file
            sources[file] = path.read_text() if path.is_file() else None
        if sources[file] is None:
            errors.append(f"anchor {aid}: no file {file}")
            continue
        try:
            spans += [(file, lo, hi) for lo, hi in symbol_spans(sources[file], symbol, file)]
        except KeyFileError as err:
            errors.append(f"anchor {aid}: {err}")
    for rx in a.get("absent", []):
        for file, source in sources.items():
            m = re.search(rx, source or "", re.IGNORECASE)
            if m:
                line = source.count("\n", 0, m.start()) + 1
                spans = []  # a stale negative anchor must not resolve, even leniently
                errors.append(f"anchor {aid}: feature marked absent now appears at {file}:{line} ({rx!r})")
    if a.get("negative") and not a.get("absent"):
        errors.append(f"anchor {aid}: a negative anchor needs `absent` regexes (what must stay absent)")
    return spans, errors


def load_key(key_file: Path, workspace: Path, strict: bool = False) -> Key:
    """Parse the key and resolve its anchors against `workspace`; KeyFileError names what does not resolve.
    An anchor resolves when one of its symbols does (so a trial survives a refactor that removed one
    alternative); `strict` (CI) wants every symbol of every anchor."""
    try:
        raw = tomllib.loads(Path(key_file).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise KeyFileError(f"{key_file}: {e}") from None
    errors, anchors, facts, forbidden = [], [], [], []
    unknown = set(raw) - {"question", "max_citations", "max_range", "anchors", "facts", "forbidden"}
    if unknown:
        errors.append(f"unknown top-level key(s) {sorted(unknown)}")
    for i, a in enumerate(raw.get("anchors", [])):
        aid = a.get("id", f"anchors[{i}]")
        spans, errs = _resolve_anchor(a, aid, Path(workspace))
        errors += errs if strict or not spans else []
        anchors.append(Anchor(aid, spans, a.get("required", True), a.get("negative", False)))
    for i, f in enumerate(raw.get("facts", [])):
        fid = f.get("id", f"facts[{i}]")
        try:
            pats = [re.compile(p, re.IGNORECASE) for p in f.get("any", [])]
        except re.error as e:
            errors.append(f"fact {fid}: bad regex ({e})")
            continue
        if not pats:
            errors.append(f"fact {fid}: needs `any` (a list of regexes)")
        facts.append(Fact(fid, pats, f.get("required", True)))
    for i, f in enumerate(raw.get("forbidden", [])):
        fid = f.get("id", f"forbidden[{i}]")
        try:
            pats, unless = ([re.compile(p, re.IGNORECASE) for p in f.get(k, [])] for k in ("any", "unless"))
        except re.error as e:
            errors.append(f"forbidden {fid}: bad regex ({e})")
            continue
        if not pats:
            errors.append(f"forbidden {fid}: needs `any` (a list of regexes)")
        forbidden.append(Forbidden(fid, pats, unless))
    ids = [x.id for x in (*anchors, *facts, *forbidden)]
    dups = sorted({i for i in ids if ids.count(i) > 1})
    if dups:
        errors.append(f"ids must be unique across anchors, facts and forbidden claims: {dups}")
    if any(a.negative for a in anchors) and not any(f.required for f in facts):
        errors.append("a key with negative anchors needs a required fact saying the feature is absent")
    if not anchors and not facts:
        errors.append("the key has no anchors and no facts")
    if errors:
        raise KeyFileError(f"{key_file}: " + "; ".join(errors))
    return Key(anchors, facts, raw.get("max_citations", DEFAULT_MAX_CITATIONS),
               raw.get("max_range", DEFAULT_MAX_RANGE), forbidden)


def check_key_resolves(key_file: Path, workspace: Path) -> list[str]:
    """Errors of a key against a workspace ([] when every anchor resolves); for CI."""
    try:
        load_key(key_file, workspace, strict=True)
    except KeyFileError as e:
        return [str(e)]
    return []


# ------------------------------------------------------------------------------------- scoring

_SENTENCE_BREAK = re.compile(r"[.!?;](?=\s)|\n(?=[ \t]*(?:\n|[-*+] |\d+[.)] |#|\|))")


def sentence_at(text: str, start: int, end: int) -> str:
    """The sentence of `text` holding text[start:end] (breaks: see the module docstring)."""
    a = max((m.end() for m in _SENTENCE_BREAK.finditer(text, 0, start)), default=0)
    b = _SENTENCE_BREAK.search(text, end)
    return text[a:b.start() if b else len(text)]


def forbidden_claims(answer: str, f: Forbidden) -> list[str]:
    """The sentences of `answer` that make claim `f` (a match of `any` not forgiven by `unless`)."""
    out = []
    for p in f.patterns:
        for m in p.finditer(answer):
            s = sentence_at(answer, m.start(), m.end())
            if not any(u.search(s) for u in f.unless):
                out.append(s.strip())
    return out


def score(answer: str, key_file: Path, workspace: Path) -> dict:
    """reward.json content for `answer` (raises KeyFileError when the key does not resolve)."""
    workspace = Path(workspace).resolve()
    key = load_key(key_file, workspace)
    files = workspace_files(workspace)
    cites = parse_citations(answer)
    check_citations(cites, workspace, files)
    usable = [c for c in cites if not c.bogus and c.end - c.start + 1 <= key.max_range]

    def hit(a: Anchor) -> bool:
        return any(f in c.files and c.start <= hi and lo <= c.end for c in usable for f, lo, hi in a.spans)

    hits = {a.id: hit(a) for a in key.anchors}
    present = {f.id: any(p.search(answer) for p in f.patterns) for f in key.facts}
    req_a = [a.id for a in key.anchors if a.required]
    req_f = [f.id for f in key.facts if f.required]
    bogus = [f"{c.text}: {c.bogus}" for c in cites if c.bogus]
    too_many = len(cites) > key.max_citations
    missed = [i for i in req_a if not hits[i]]
    missing = [i for i in req_f if not present[i]]
    claimed = {f.id: forbidden_claims(answer, f) for f in key.forbidden}
    claimed = {k: v for k, v in claimed.items() if v}
    passed = not missed and not missing and not claimed and not bogus and not too_many and bool(answer.strip())
    return {
        "reward": 1.0 if passed else 0.0,
        "anchors": round(sum(hits[i] for i in req_a) / len(req_a), 4) if req_a else 1.0,
        "facts": round(sum(present[i] for i in req_f) / len(req_f), 4) if req_f else 1.0,
        "citations": len(cites),
        "bogus_citations": len(bogus),
        "too_many_citations": too_many,
        "missed_anchors": missed,
        "missing_facts": missing,
        "forbidden_claims": sorted(claimed),
        "forbidden_sentences": [s[:200] for v in claimed.values() for s in v][:5],
        "bogus": bogus[:10],
        "optional_present": [k for k, v in {**hits, **present}.items() if v and k not in req_a + req_f],
    }


def cite(workspace: Path, file: str, symbol: str) -> str:
    """`file:a-b` (or `file:a`) of a symbol's first span: lets an oracle answer follow the code."""
    spans = symbol_spans((Path(workspace) / file).read_text(), symbol, file)
    a, b = spans[0]
    return f"{file}:{a}" if a == b else f"{file}:{a}-{b}"


def render_answer(template: str, workspace: Path) -> str:
    """Replace `{{cite FILE SYMBOL}}` placeholders with current line numbers."""
    return re.sub(r"\{\{cite\s+(\S+)\s+(\S+)\s*\}\}", lambda m: cite(workspace, m[1], m[2]), template)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qa_keys.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="grade an answer; writes reward.json")
    s.add_argument("--key", required=True, type=Path)
    s.add_argument("--workspace", required=True, type=Path)
    s.add_argument("--answer", required=True, type=Path)
    s.add_argument("--out", type=Path, help="reward.json to write (default: print only)")
    c = sub.add_parser("check", help="check that a key resolves against a workspace")
    c.add_argument("--key", required=True, type=Path)
    c.add_argument("--workspace", required=True, type=Path)
    args = p.parse_args(argv)
    if args.cmd == "check":
        errors = check_key_resolves(args.key, args.workspace)
        print("\n".join(errors) or "key ok")
        return 1 if errors else 0
    answer = args.answer.read_text(errors="replace") if args.answer.is_file() else ""
    try:
        result = score(answer, args.key, args.workspace)
    except KeyFileError as e:
        print(f"qa_keys: key does not resolve: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
