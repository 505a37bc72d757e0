"""The oracle agent: does what a correct agent would, from the task's `solution/<framework>/`.

- `solve.sh`: its folder is staged (`stage_solution`: the folder, the task's `solution/shared/` as `shared/`,
  and `oracle_lib/*.py` such as `source_edit.py` beside the scripts), copied to `<harness_dir>/oracle-solution/`
  (outside the workspace, readable by the agent) and run as the agent (`as_agent=True`, same limits, read-only
  workspace stays read-only) from the workspace, with ATE_WORKSPACE and ATE_SOLUTION (that folder, for files
  the script needs).
- `answer.md`: returned as the final message after `{{cite FILE SYMBOL}}` placeholders are replaced by
  the symbol's current lines (qa_keys.render_answer), so the oracle answer follows framework edits.
Every task must score 1 with it; CI checks that for the CPU tasks.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from pathlib import Path

from bench.harness import qa_keys
from bench.harness.core import AgentContext, AgentResult, Event
from bench.harness.verifier import harness_dir

ORACLE_LIB = Path(__file__).resolve().parents[1] / "oracle_lib"  # code every oracle may import


def stage_solution(sol: Path, dest: Path) -> Path:
    """`dest` laid out as solve.sh sees it: `sol` itself, its task's `solution/shared/` (files the oracles of
    several frameworks use) as `shared/`, and the shared oracle modules beside the scripts."""
    shutil.copytree(sol, dest, dirs_exist_ok=True)
    if (sol.parent / "shared").is_dir():
        shutil.copytree(sol.parent / "shared", dest / "shared", dirs_exist_ok=True)
    for f in ORACLE_LIB.glob("*.py"):
        shutil.copy2(f, dest / f.name)
    return dest


class OracleAgent:
    name = "oracle"
    needs_model = False

    def run(self, ctx: AgentContext) -> AgentResult:
        start = time.time()
        res = AgentResult(exit_code=0, events=[Event(start, "agent_start")])
        sol = ctx.task.solution_dir(ctx.framework) or ctx.task.solution_dir(ctx.task.base(ctx.framework))
        solve, answer = (sol / "solve.sh", sol / "answer.md") if sol else (None, None)
        if sol is None or not (solve.is_file() or answer.is_file()):
            res.exit_code, res.error = 1, f"oracle: {ctx.task.name} has no solution/{ctx.framework}/solve.sh or answer.md"
        if sol is not None and solve.is_file():
            self._solve(ctx, sol, res, start)
        if sol is not None and answer.is_file() and not res.error:
            try:
                res.final_message = qa_keys.render_answer(answer.read_text(), Path(ctx.sandbox.host_workspace))
            except (qa_keys.KeyFileError, OSError) as e:
                res.exit_code, res.error = 1, f"oracle: answer.md does not render: {e}"
        res.events.append(Event(time.time(), "agent_end"))
        return res

    def _solve(self, ctx: AgentContext, sol: Path, res: AgentResult, start: float) -> None:
        sb, q = ctx.sandbox, shlex.quote
        dst = f"{harness_dir(sb)}/oracle-solution"
        sb.exec(f"rm -rf {q(dst)}", timeout=60, as_agent=False)
        with tempfile.TemporaryDirectory(prefix="ate-oracle-") as tmp:
            sb.copy_in(stage_solution(sol, Path(tmp) / "solution"), dst)
        sb.exec(f"chmod -R a+rX {q(dst)}", timeout=60, as_agent=False)
        env = {**ctx.extra.get("env", {}), "ATE_WORKSPACE": sb.workspace, "ATE_SOLUTION": dst}
        cmd = f"bash {q(dst)}/solve.sh"
        res.events.append(Event(time.time(), "tool_start", cmd))
        r = sb.exec(cmd, timeout=max(1.0, ctx.timeout_s - (time.time() - start)), env=env, as_agent=True)
        res.events.append(Event(time.time(), "tool_end", f"exit {r.exit_code}"))
        res.tool_calls += 1
        if ctx.log_dir is not None:
            Path(ctx.log_dir).mkdir(parents=True, exist_ok=True)
            (Path(ctx.log_dir) / "oracle.log").write_text(f"$ {cmd}\n{r.output}\n[exit {r.exit_code}]\n")
        if r.timed_out:
            res.exit_code, res.timed_out, res.error = 124, True, f"oracle: solve.sh timed out after {ctx.timeout_s:.0f} s"
        elif r.exit_code != 0:
            res.exit_code, res.error = r.exit_code, f"oracle: solve.sh exited {r.exit_code}: {r.output.strip()[-300:]}"
