"""The small common vocabulary of the harness: tasks, sandboxes, agents, events and trial records.

A trial = one agent on one task on one framework in one sandbox:
  sandbox created with the framework's workspace (+ the task's setup files)
  -> agent runs (its model calls go through the accounting proxy)
  -> hidden tests copied in, verifier runs, writes reward.json
  -> one TrialRecord written atomically.
Backends (docker, local) implement `Sandbox`; agents (oracle, null, replay, claude-code, codex,
openai) implement `Agent`. Everything else talks only to these two interfaces.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"
WORKSPACE = "/workspace"  # where the framework workspace sits inside every sandbox
FAILURE_MODES = ("none", "agent_error", "timeout", "verifier_error", "infra_error")


class HarnessError(Exception):
    """A problem with the harness's input (task folder, options); the CLI prints it and exits 2."""


# ---------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One folder under bench/tasks/<category>/<id>/ (format: shared DESIGN.md section 4)."""

    id: str
    category: str  # "qa" | "operate" | "feature"
    path: Path
    frameworks: list[str]
    agent_timeout_s: float = 1800.0
    verifier_timeout_s: float = 600.0
    cpus: float = 2.0
    memory_gb: float = 8.0
    gpus: int = 0  # GPUs the task needs: a run with fewer skips it
    gpus_optional: int = 0  # GPUs it uses when the run has them (its instruction says what changes), else CPU
    framework_gpus: dict = field(default_factory=dict)  # GPUs it needs on some frameworks ({"torchtitan": 1}):
    #   a baseline that cannot train on CPU
    read_only: bool = False
    network: bool = False

    @property
    def name(self) -> str:
        return f"{self.category}/{self.id}"

    def base(self, framework: str) -> str:
        """The name the task's files use for `framework` (pithtrain-noskills -> pithtrain)."""
        return framework if framework in self.frameworks else framework.split("-")[0]

    def instruction(self, framework: str, workspace: str = WORKSPACE) -> str:
        """The task's instruction with `{framework}` / `{workspace}` filled in: instruction.<framework>.md where the
        task has one (a feature's interface in that framework's own terms), else instruction.gpu.md on a framework
        it needs a GPU for (its wording assumes a GPU), else instruction.md."""
        own, gpu = self.path / f"instruction.{self.base(framework)}.md", self.path / "instruction.gpu.md"
        if not own.is_file():
            own = gpu if self.gpus_needed(framework) and gpu.is_file() else self.path / "instruction.md"
        return own.read_text().replace("{framework}", framework).replace("{workspace}", workspace)

    def setup_dir(self, framework: str) -> Path | None:
        d = self.path / "setup" / framework
        return d if d.is_dir() else None

    def solution_dir(self, framework: str) -> Path | None:
        d = self.path / "solution" / framework
        return d if d.is_dir() else None

    @property
    def tests_dir(self) -> Path:
        return self.path / "tests"

    def gpus_needed(self, framework: str | None = None) -> int:
        """GPUs a trial on `framework` cannot run without (a run with fewer skips the task)."""
        return max(self.gpus, self.framework_gpus.get(self.base(framework or ""), 0))

    def gpus_for(self, available: int, framework: str | None = None) -> int:
        """How many GPUs a trial of this task on `framework` gets in a run with `available` of them."""
        return self.gpus_needed(framework) or min(self.gpus_optional, available)


def load_task(path: Path) -> Task:
    toml = path / "task.toml"
    if not toml.is_file():
        raise HarnessError(f"{path}: no task.toml")
    try:
        raw = tomllib.loads(toml.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HarnessError(f"{toml}: invalid TOML: {e}") from None
    known = {f for f in Task.__dataclass_fields__ if f != "path"}
    unknown = set(raw) - known
    if unknown:
        raise HarnessError(f"{toml}: unknown key {sorted(unknown)[0]!r}")
    for required in ("id", "category", "frameworks"):
        if required not in raw:
            raise HarnessError(f"{toml}: missing key {required!r}")
    if raw["category"] not in ("qa", "operate", "feature"):
        raise HarnessError(f"{toml}: category must be qa, operate or feature, got {raw['category']!r}")
    if not (path / "instruction.md").is_file() or not (path / "tests").is_dir():
        raise HarnessError(f"{path}: a task needs instruction.md and tests/")
    for key in ("gpus", "gpus_optional"):
        if not isinstance(raw.get(key, 0), int) or raw.get(key, 0) < 0:
            raise HarnessError(f"{toml}: {key} must be a non-negative integer, got {raw[key]!r}")
    gpus_by = raw.get("framework_gpus", {})
    if not isinstance(gpus_by, dict) or any(k not in raw["frameworks"] or not isinstance(v, int) or v < 0
                                            for k, v in gpus_by.items()):
        raise HarnessError(f"{toml}: framework_gpus must map frameworks of the task to non-negative integers")
    return Task(path=path, **raw)



def discover_tasks(selectors: list[str] | None = None, framework: str | None = None) -> list[Task]:
    """All tasks, or those whose id, category or category/id is in `selectors` ("all" = every task)."""
    tasks = sorted((load_task(p.parent) for p in TASKS_DIR.glob("*/*/task.toml")), key=lambda t: t.name)
    if selectors and "all" not in selectors:
        chosen = [t for t in tasks if {t.id, t.category, t.name} & set(selectors)]
        matched = {s for s in selectors for t in tasks if s in (t.id, t.category, t.name)}
        missing = [s for s in selectors if s not in matched]
        if missing:
            raise HarnessError(f"--tasks: no task or category named {missing[0]!r}")
        tasks = chosen
    if framework is not None:
        tasks = [t for t in tasks if framework in t.frameworks or framework.split("-")[0] in t.frameworks]
    return tasks


# ---------------------------------------------------------------------------------------- sandboxes


@dataclass
class ExecResult:
    exit_code: int
    output: str  # stdout and stderr interleaved
    duration_s: float
    timed_out: bool = False


class Sandbox(Protocol):
    """An isolated place holding the workspace at WORKSPACE, where agents and verifiers run commands."""

    kind: str  # "docker" | "local"
    isolation_note: str  # printed once per run: what this backend does and does not isolate
    workspace: str  # the workspace path as commands inside the sandbox see it (WORKSPACE for docker)
    host_workspace: Path  # the workspace as seen from the host
    harness_dir: str  # inside the sandbox, outside the workspace; writable by the harness only (verifier, meter)

    def exec(
        self, cmd: str, *, timeout: float, env: dict[str, str] | None = None, workdir: str | None = None,
        as_agent: bool = True,
    ) -> ExecResult:
        """Run `cmd` with bash inside the sandbox (cwd: `workdir`, default the workspace); a command still
        running at `timeout` is killed with its whole process group. `as_agent=False` is for the harness
        itself (setup, verifier): it may write where the agent may not."""

    def copy_in(self, src: Path, dst: str) -> None:
        """Copy a host file or folder to path `dst` inside the sandbox."""

    def set_read_only(self, read_only: bool) -> None:
        """Make the workspace unwritable for the agent (Q&A tasks), enforced by the backend."""

    def close(self) -> None:
        """Stop and remove everything the sandbox made (idempotent)."""


# ---------------------------------------------------------------------------------------- agents


@dataclass
class Event:
    """A timestamped step of a session, used for Session Duration and tool counts."""

    t: float  # unix time
    kind: str  # "model_call_start" | "model_call_end" | "tool_start" | "tool_end" | "agent_start" | "agent_end"
    detail: str = ""


@dataclass
class AgentContext:
    task: Task
    framework: str
    sandbox: Sandbox
    instruction: str
    model: str | None
    api_base_in_sandbox: str | None  # accounting proxy URL as the agent inside the sandbox reaches it
    log_dir: Path  # host folder for the agent's transcript and logs
    timeout_s: float
    extra: dict = field(default_factory=dict)  # agent-specific inputs, e.g. {"script": Path} for replay


@dataclass
class AgentResult:
    exit_code: int
    timed_out: bool = False
    error: str = ""
    events: list[Event] = field(default_factory=list)
    reported_usage: dict | None = None  # the agent's own figures (cross-check against the proxy)
    tool_calls: int = 0
    final_message: str = ""  # the agent's last answer; the Q&A verifier grades it


class Agent(Protocol):
    name: str
    needs_model: bool  # False for oracle / null; replay needs the proxy (it serves the recording)

    def run(self, ctx: AgentContext) -> AgentResult: ...


# ---------------------------------------------------------------------------------------- records


@dataclass
class TrialRecord:
    """One JSON record per trial (metric definitions: shared DESIGN.md section 5)."""

    run_id: str
    trial_id: str
    task: str
    framework: str
    agent: str
    model: str | None
    attempt: int
    sandbox: str
    engine: str = ""  # the Docker engine (base URL) the trial ran on; "" for the local sandbox
    reward: float = 0.0
    passed: bool = False
    failure_mode: str = "none"
    error: str = ""
    subscores: dict = field(default_factory=dict)
    # usage, counted at the proxy
    agent_turns: int = 0
    tool_calls: int = 0
    input_uncached_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    per_turn_context_p50: float = 0.0
    cost_usd: float | None = None
    price_source: str = ""
    agent_reported: dict | None = None
    # time
    session_duration_s: float = 0.0
    agent_wall_s: float = 0.0
    verifier_s: float = 0.0
    harness_overhead_s: float = 0.0  # sandbox create -> verifier done, minus agent and verifier time
    # GPU
    active_gpu_s: float = 0.0
    gpu_busy_s: float | None = None
    gpu_peak_mem_gib: float | None = None
    gpu_energy_j: float | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
