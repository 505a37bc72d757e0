"""Time metrics from a session's events and process intervals (definitions: shared DESIGN.md section 5).

Medians elsewhere use `statistics.median` / pandas; only the two rules the paper defines live here.
"""

from __future__ import annotations

from collections.abc import Iterable

from bench.harness.core import Event

IDLE_CAP_S = 600.0  # a gap longer than this, outside a tool call, counts as this much


def session_duration(events: list[Event], cap_s: float = IDLE_CAP_S) -> float:
    """The agent's active wall clock: each gap between consecutive events counts in full when it is at
    most `cap_s` or when a tool call was running at its start (the agent was waiting on a command),
    else it counts `cap_s`. So a model that stalls is capped, but a long training run is not."""
    evs = sorted(events, key=lambda e: e.t)  # stable: ties keep their recorded order
    total, running = 0.0, 0
    for prev, cur in zip(evs, evs[1:]):
        if prev.kind == "tool_start":
            running += 1
        elif prev.kind == "tool_end":
            running = max(0, running - 1)  # an unmatched end must not hide later idle gaps
        gap = cur.t - prev.t
        total += gap if gap <= cap_s or running > 0 else cap_s
    return total


def active_time(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: nested or overlapping processes (a launcher and
    its torchrun workers, parallel runs) count once, as the paper's wall time of the runs."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted((s, e) for s, e in intervals if e > s):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total
