"""One trial, start to finish: workspace -> sandbox -> agent (through the proxy) -> verifier -> record.

Timing is split so the harness's own cost is visible: `harness_overhead_s` = sandbox creation through
verifier end, minus the agent's and the verifier's own time (target: under 5 s a trial).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import adapters
from bench.harness import metrics
from bench.harness.agents import get_agent
from bench.harness.core import AgentContext, HarnessError, Task, TrialRecord
from bench.harness.gpus import GpuPool
from bench.harness.judge import Judge, workspace_diff
from bench.harness.meter import METER_DIR, GpuSampler, meter_intervals
from bench.harness.verifier import run_verifier

FRAMEWORKS = ("pithtrain", "pithtrain-noskills", "torchtitan", "megatron")


@dataclass
class TrialPlan:
    task: Task
    framework: str
    agent: str
    attempt: int
    model: str | None
    upstream: str | None
    script: Path | None
    run_id: str
    judge: Judge | None = None  # optional LLM judge of feature diffs (judge.py); never changes the reward

    @property
    def trial_id(self) -> str:
        return f"{self.task.category}__{self.task.id}__{self.framework}__{self.agent}__{self.attempt}"


class LocalBackend:
    kind = "local"
    note = ("WEAK isolation: agent commands run on this host (as an unprivileged user when the harness is root), "
            "same kernel, network and filesystem outside the workspace; rlimits and timeouts only")

    def create(self, workspace: Path, task: Task, framework: str, gpus: list[str], proxy, run_id: str):
        from bench.harness.sandbox_local import LocalSandbox

        sandbox = LocalSandbox(workspace, read_only=task.read_only, cpus=task.cpus, memory_gb=task.memory_gb,
                               gpus=gpus)
        sandbox.api_base = proxy.url if proxy is not None else None
        return sandbox


class DockerBackend:
    """Containers on one or more Docker engines (ATE_DOCKER_HOSTS, comma-separated; default the local
    one), used round-robin. Leftovers of dead harness runs are swept when the backend starts."""

    kind = "docker"

    def __init__(self):
        from bench.harness import images, sandbox_docker

        self.engines = sandbox_docker.engines_from_env()
        urls = [u.strip() for u in os.environ.get("ATE_DOCKER_HOSTS", "").split(",") if u.strip()]
        self.urls = urls or ["local"]
        self.swept = sum(sandbox_docker.sweep_leftovers(e) for e in self.engines)
        self._next, self._lock = 0, threading.Lock()
        self._image = images.image_name
        for e in self.engines:
            e.ping()
        self.note = (f"container per trial on {len(self.engines)} engine(s), network none (model API only through "
                     f"the accounting proxy's socket), workspace the only writable mount; swept "
                     f"{self.swept} leftover container(s)")

    def create(self, workspace: Path, task: Task, framework: str, gpus: list[str], proxy, run_id: str):
        from bench.harness.sandbox_docker import DockerSandbox

        with self._lock:
            index = self._next % len(self.engines)
            engine, url = self.engines[index], self.urls[index]
            self._next += 1
        sandbox = DockerSandbox(self._image(framework.removesuffix("-noskills")), workspace, engine=engine,
                                read_only=task.read_only, cpus=task.cpus, memory_gb=task.memory_gb, gpus=gpus,
                                proxy_socket=Path(proxy.unix_path) if proxy is not None else None, run_id=run_id)
        sandbox.api_base = sandbox.api_base_in_sandbox
        sandbox.engine_url = url
        return sandbox


def make_backend(kind: str):
    """The sandbox backend for --sandbox (docker needs a reachable engine; auto falls back to local)."""
    if kind in ("docker", "auto"):
        try:
            return DockerBackend()
        except Exception as e:  # no engine: docker-py raises its own errors
            if kind == "docker":
                raise HarnessError(f"--sandbox docker: no usable Docker engine ({type(e).__name__}: {e})") from None
    return LocalBackend()


def run_trial(plan: TrialPlan, backend, gpu_pool: GpuPool, store) -> TrialRecord:
    """Run one trial and write its record; never raises (harness faults become failure_mode infra_error)."""
    task = plan.task
    record = TrialRecord(run_id=plan.run_id, trial_id=plan.trial_id, task=task.name, framework=plan.framework,
                         agent=plan.agent, model=plan.model, attempt=plan.attempt, sandbox=backend.kind,
                         started_at=time.time())
    log_dir = store.trial_dir(plan.trial_id)
    sandbox = proxy = None
    my_gpus: list[str] = []
    agent_s = verifier_s = 0.0
    try:
        adapter = adapters.get(plan.framework)
        record.versions = {"framework": adapter.version()}
        my_gpus = gpu_pool.acquire(task.gpus_for(len(gpu_pool), plan.framework))
        agent = get_agent(plan.agent)
        with tempfile.TemporaryDirectory(prefix="ate-ws-") as tmp:
            created = time.time()
            workspace = adapter.build(plan.framework, Path(tmp) / "workspace")
            if task.setup_dir(plan.framework) is not None:
                shutil.copytree(task.setup_dir(plan.framework), workspace, dirs_exist_ok=True)
            if agent.needs_model:
                from bench.harness.proxy import Proxy

                proxy = Proxy.for_agent(plan.agent, upstream=plan.upstream, script=plan.script, log_dir=log_dir,
                                        main_model=plan.model).start()
            sandbox = backend.create(workspace, task, plan.framework, my_gpus, proxy, plan.run_id)
            record.engine = getattr(sandbox, "engine_url", "")
            meter_log = install_meter(sandbox)
            ctx = AgentContext(
                task=task, framework=plan.framework, sandbox=sandbox,
                instruction=task.instruction(plan.framework, sandbox.workspace), model=plan.model,
                api_base_in_sandbox=sandbox.api_base, log_dir=log_dir, timeout_s=task.agent_timeout_s,
                extra={"script": plan.script, "api_base_host": proxy.url if proxy is not None else None},
            )
            agent_start = time.time()
            with GpuSampler(my_gpus) as sampler:
                result = agent.run(ctx)
            agent_end = time.time()
            agent_s = record.agent_wall_s = agent_end - agent_start
            sandbox.stop_agent_processes()
            record.tool_calls = result.tool_calls
            record.agent_reported = result.reported_usage
            if result.timed_out:
                record.failure_mode, record.error = "timeout", f"agent exceeded {task.agent_timeout_s:.0f} s"
            elif result.exit_code != 0 or result.error:
                record.failure_mode, record.error = "agent_error", result.error or f"agent exit {result.exit_code}"

            meter_text = sandbox.exec(f"cat {meter_log} 2>/dev/null || true", timeout=30, as_agent=False).output
            runs, cuda_runs = meter_intervals(meter_text, agent_end, assume_cuda=bool(my_gpus))
            record.active_gpu_s = metrics.active_time(cuda_runs)
            record.subscores["active_run_s"] = round(metrics.active_time(runs), 3)
            record.gpu_busy_s, record.gpu_peak_mem_gib, record.gpu_energy_j = (
                sampler.busy_s, sampler.peak_mem_gib, sampler.energy_j)
            events = list(result.events)
            if proxy is not None:
                usage = proxy.summary()
                events += usage["events"]
                for key in ("agent_turns", "input_uncached_tokens", "cache_read_tokens", "cache_write_tokens",
                            "output_tokens", "reasoning_tokens", "per_turn_context_p50", "cost_usd",
                            "price_source"):
                    setattr(record, key, usage[key])
            record.session_duration_s = metrics.session_duration(events) if len(events) > 1 else agent_s

            reward, subscores, verr, verifier_s = run_verifier(task, plan.framework, sandbox, result.final_message,
                                                               task.verifier_timeout_s, log_dir=log_dir)
            record.reward, record.verifier_s = reward, verifier_s
            record.subscores.update(subscores)
            if verr and record.failure_mode == "none":
                record.failure_mode, record.error = "verifier_error", verr
            record.passed = reward >= 1.0
            rubric = task.tests_dir / "rubric.md"
            if plan.judge is not None and rubric.is_file():
                record.subscores.update(plan.judge.judge(rubric.read_text(), workspace_diff(sandbox)))
            record.harness_overhead_s = round(max(0.0, time.time() - created - agent_s - verifier_s), 3)
    except Exception as e:
        record.failure_mode = "infra_error"
        record.error = f"{type(e).__name__}: {e}"
        (log_dir / "harness-error.txt").write_text(traceback.format_exc())
    finally:
        try:
            if sandbox is not None:
                sandbox.close()
        finally:
            if proxy is not None:
                proxy.close()
            gpu_pool.release(my_gpus)
    record.finished_at = time.time()
    store.write_trial(record)
    return record


def install_meter(sandbox) -> str:
    """Put the run meter where every agent Python process loads it; returns the meter log's sandbox path."""
    meter_dir = f"{sandbox.harness_dir}/meter"
    sandbox.copy_in(METER_DIR / "sitecustomize.py", f"{meter_dir}/sitecustomize.py")
    log = f"{sandbox.harness_dir}/meter.jsonl"
    sandbox.exec(f"chmod 755 {meter_dir} && touch {log} && chmod 666 {log}", timeout=30, as_agent=False)
    sandbox.agent_env.update({"ATE_METER_LOG": log, "PYTHONPATH": f"{sandbox.workspace}:{meter_dir}"})
    return log
