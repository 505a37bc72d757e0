"""Optional LLM judge for feature tasks: the agent's diff against the task's three-rule rubric.

A feature task may ship `tests/rubric.md` (numbered rules `1.`, `2.`, ...). When a judge is configured
(`bench.run --judge-model M --judge-url URL`, key in ATE_JUDGE_API_KEY), the harness sends the rubric and the
agent's diff against the workspace's baseline commit to an OpenAI Chat Completions endpoint and records the
verdict in the trial's subscores as `judge` ({model, rules: [{rule, pass, reason}], score = share passed}) or
`judge_error`. The judge never changes the reward: that comes from the deterministic hidden tests alone.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

MAX_DIFF_CHARS = 60_000  # beyond this the diff is cut (the judge is told so)
SYSTEM = ("You review a code change made by a coding agent to a training framework. Judge the change against each "
          "numbered rule of the rubric, pass or fail, with a one-line reason. Reply with JSON only: "
          '{"rules": [{"rule": 1, "pass": true, "reason": "..."}, ...]}, one entry per rule, in order.')


class JudgeError(Exception):
    """The judge could not give a verdict (endpoint unreachable, reply not the JSON asked for)."""


def rule_count(rubric: str) -> int:
    return len(re.findall(r"^\s*\d+\.\s", rubric, flags=re.M))


def parse_verdict(text: str, n_rules: int) -> list[dict]:
    """The rules list of a judge reply (the first JSON object in it); JudgeError when malformed."""
    start, end = text.find("{"), text.rfind("}")
    try:
        rules = json.loads(text[start:end + 1])["rules"] if start >= 0 else None
    except (json.JSONDecodeError, KeyError, TypeError):
        rules = None
    if not isinstance(rules, list) or len(rules) != n_rules or not all(
            isinstance(r, dict) and isinstance(r.get("pass"), bool) for r in rules):
        raise JudgeError(f"reply is not a verdict on {n_rules} rules: {text[:200]!r}")
    return [{"rule": i + 1, "pass": r["pass"], "reason": str(r.get("reason", ""))[:300]} for i, r in enumerate(rules)]


@dataclass
class Judge:
    model: str
    url: str  # base URL of an OpenAI-compatible API, e.g. https://api.openai.com/v1
    api_key: str = ""
    timeout_s: float = 120.0

    def ask(self, rubric: str, diff: str) -> str:
        cut = len(diff) > MAX_DIFF_CHARS
        user = (f"Rubric:\n{rubric}\n\nThe change (git diff against the framework's first commit"
                f"{', cut at ' + str(MAX_DIFF_CHARS) + ' characters' if cut else ''}):\n{diff[:MAX_DIFF_CHARS]}")
        body = {"model": self.model, "temperature": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
        req = urllib.request.Request(self.url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                reply = json.loads(r.read())
            return reply["choices"][0]["message"]["content"] or ""
        except (urllib.error.URLError, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"{self.url}: {type(e).__name__}: {e}") from None

    def judge(self, rubric: str, diff: str) -> dict:
        """{"judge": {...}} or {"judge_error": reason}; an empty diff fails every rule without a call."""
        n = rule_count(rubric)
        if n == 0:
            return {"judge_error": "rubric has no numbered rules"}
        if not diff.strip():
            rules = [{"rule": i + 1, "pass": False, "reason": "no change"} for i in range(n)]
        else:
            try:
                rules = parse_verdict(self.ask(rubric, diff), n)
            except JudgeError as e:
                return {"judge_error": str(e)}
        return {"judge": {"model": self.model, "rules": rules,
                          "score": round(sum(r["pass"] for r in rules) / n, 4)}}


def workspace_diff(sandbox) -> str:
    """The agent's change: `git diff` of the sandbox workspace against its first (baseline) commit, new files
    included, ignored run outputs left out."""
    git = "git -c safe.directory='*' -c core.quotepath=off"
    cmd = (f"cd {sandbox.workspace} && {git} add -A -N . >/dev/null 2>&1; "
           f"{git} diff --no-color --no-ext-diff $({git} rev-list --max-parents=0 HEAD | tail -1) -- .")
    return sandbox.exec(cmd, timeout=120, as_agent=False).output
