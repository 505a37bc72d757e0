"""The null agent: does nothing. Every task must score 0 with it (the verifier is not fooled by an idle agent)."""

from __future__ import annotations

import time

from bench.harness.core import AgentContext, AgentResult, Event


class NullAgent:
    name = "null"
    needs_model = False

    def run(self, ctx: AgentContext) -> AgentResult:
        t = time.time()
        return AgentResult(exit_code=0, events=[Event(t, "agent_start"), Event(time.time(), "agent_end")],
                           final_message="")
