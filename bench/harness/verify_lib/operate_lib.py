"""What the operate tasks' verifiers share across frameworks: reading the agent's run folder, routing traces and
kernel CSVs, and comparing them with what the verifier recomputed. The harness copies this file beside each task's
hidden tests (bench/harness/verify_lib); each framework's check.py does the recomputing with that framework's
pristine code.
"""

import csv
import json
import math
import sys
from pathlib import Path

MAX_TIE_FLIPS = 0.005  # share of a step's tokens whose expert set may differ, and only at a near-tie
HEADER = ["kernel_name", "total_time_ms", "instances", "mean_time_ms"]


class Fail(Exception):
    """A problem with the agent's outputs: reward 0 with this reason."""


def run_check(check, prepare=None) -> int:
    """A check.py's entry: `python check.py <workspace> <pristine workspace> <reward.json>`. `prepare(baseline)` puts
    the pristine framework on the path; `check(workspace, baseline, sub)` fills sub-scores and raises Fail for the
    agent's problems (reward 0 with the reason). Anything else it raises is the verifier's own bug: non-zero exit."""
    ws, baseline, out = (Path(a) for a in sys.argv[1:4])
    if prepare:
        prepare(baseline)
    sub: dict = {}
    try:
        check(ws, baseline, sub)
        reason = ""
    except Fail as e:
        reason = str(e)
    result = {"reward": 0.0 if reason else 1.0, **sub, "reason": reason}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


def read_metrics(run: Path, steps: int, more: bool = False) -> list[float]:
    """The losses of metrics.jsonl in `run`, which must hold steps 1..steps (or, with `more`, at least those and
    consecutive) with finite losses; raises Fail saying what is wrong."""
    path = run / "metrics.jsonl"
    try:
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        got, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
    except FileNotFoundError:
        raise Fail(f"no run: {path} is missing") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise Fail(f"metrics.jsonl is malformed ({type(e).__name__}: {e})") from None
    ok = got == list(range(1, len(got) + 1)) and (len(got) >= steps if more else len(got) == steps)
    if not ok or not all(map(math.isfinite, losses)):
        want = f"1..{steps}" + (" (or more)" if more else "")
        raise Fail(f"metrics.jsonl must hold steps {want} with finite losses; has steps {got[:10]}")
    return losses


def check_recomputed_loss(sub: dict, logged_last: float, init_loss: float, loss: float) -> None:
    """A checkpoint's loss on a fixed held-out batch, recomputed by the verifier: finite, and within a factor of 2 of
    the run's logged last loss (the fresh model's loss on the same batch goes in the sub-scores, to show training);
    raises Fail otherwise."""
    sub["init_loss"] = round(init_loss, 4)
    sub["recomputed_loss"] = round(loss, 4) if math.isfinite(loss) else str(loss)
    if not math.isfinite(loss):
        raise Fail(f"the checkpoint gives a non-finite loss ({loss})")
    ratio = loss / logged_last if logged_last > 0 else math.inf
    sub["loss_ratio"] = round(ratio, 4)
    if not 0.5 <= ratio <= 2.0:
        raise Fail(f"recomputed loss {loss:.4f} is not of the order of the logged last loss {logged_last:.4f}")


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise Fail(f"no run: {path} is missing") from None
    except ValueError as e:
        raise Fail(f"{path.name} is malformed ({e})") from None
    if not isinstance(raw, dict):
        raise Fail(f"{path.name} is not a JSON object")
    return raw


def read_traces(folder: Path, steps: int, shape: tuple, num_experts: int) -> dict:
    """{step: (expert_ids, gate_weights)} of step_0001.npz .. ; raises Fail saying what is wrong."""
    import numpy as np

    files = [folder / f"step_{k:04d}.npz" for k in range(1, steps + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise Fail(f"missing trace files in {folder}: {missing}")
    got = {}
    for k, f in enumerate(files, 1):
        try:
            got[k] = read_trace(f, shape)
        except ValueError as e:
            raise Fail(str(e)) from None
        except Exception as e:  # np.load of a broken file raises many kinds (OSError, BadZipFile, ...)
            raise Fail(f"{f.name}: unreadable ({type(e).__name__}: {e})") from None
        ids = got[k][0]
        if ids.min() < 0 or ids.max() >= num_experts:
            raise Fail(f"{f.name}: expert_ids outside [0, {num_experts})")
    if any(np.array_equal(got[k][0], got[k + 1][0]) for k in range(1, steps)):
        raise Fail("two consecutive steps have identical expert_ids: not per-step traces")
    return got


def read_trace(path: Path, shape: tuple) -> tuple:
    """(expert_ids, gate_weights) of one step file, or raise ValueError saying what is wrong."""
    import numpy as np

    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    for key, dtype in (("expert_ids", np.int32), ("gate_weights", np.float32)):
        if key not in arrays:
            raise ValueError(f"{path.name} has no array {key!r} (has {sorted(arrays)})")
        a = arrays[key]
        if a.dtype != dtype or a.shape != shape:
            want = f"{np.dtype(dtype)}{list(shape)}"
            raise ValueError(f"{path.name}: {key} is {a.dtype}{list(a.shape)}, expected {want}")
    ids, weights = arrays["expert_ids"], arrays["gate_weights"]
    if not np.isfinite(weights).all():
        raise ValueError(f"{path.name}: gate_weights has non-finite values")
    return ids, weights


def compare(mine: tuple, theirs: tuple, tie_gap: float, atol: float, rtol: float,
            max_flips: float = MAX_TIE_FLIPS) -> tuple[dict, str]:
    """Token-level agreement of expert sets (order within a token ignored) and of their gate weights."""
    import numpy as np

    ids, weights, gaps = mine
    their_ids, their_weights = theirs
    order, their_order = np.argsort(ids, axis=-1), np.argsort(their_ids, axis=-1)
    ids, weights = np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)
    their_ids = np.take_along_axis(their_ids, their_order, -1)
    their_weights = np.take_along_axis(their_weights, their_order, -1)
    same = (ids == their_ids).all(-1)
    flips = ~same
    stats = {"tokens": int(same.size), "mismatched": int(flips.sum())}
    if flips.any():
        worst = float(gaps[flips].max())
        stats["max_gap_at_mismatch"] = worst
        if worst > tie_gap:
            return stats, f"{int(flips.sum())} of {same.size} tokens routed to other experts (not near-ties)"
        if flips.mean() > max_flips:
            return stats, f"{int(flips.sum())} of {same.size} tokens routed to other experts"
    err = np.abs(weights[same] - their_weights[same])
    stats["max_weight_err"] = float(err.max()) if err.size else 0.0
    if (err > atol + rtol * np.abs(weights[same])).any():
        return stats, f"gate weights differ from the recomputed ones by up to {stats['max_weight_err']:.3g}"
    return stats, ""


def read_csv(path: Path, on_gpu: bool) -> tuple[list[tuple[str, float, int]], str]:
    """The three rows as (name, total ms, instances), or a reason why the file is wrong."""
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except FileNotFoundError:
        return [], f"no {path}"
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        return [], f"{path.name} is unreadable ({type(e).__name__}: {e})"
    lines = [row for row in lines if row]
    if not lines or [c.strip() for c in lines[0]] != HEADER:
        return [], f"{path.name}: header must be {','.join(HEADER)}"
    if len(lines) != 4:
        return [], f"{path.name}: expected exactly 3 rows, found {len(lines) - 1}"
    rows = []
    for n, row in enumerate(lines[1:], 2):
        if len(row) != 4:
            return [], f"{path.name}:{n}: expected 4 fields, found {len(row)}"
        try:
            name, total, count, mean = row[0].strip(), float(row[1]), int(row[2]), float(row[3])
        except ValueError:
            return [], f"{path.name}:{n}: total_time_ms and mean_time_ms must be numbers, instances an int"
        if not name or not all(math.isfinite(v) and v > 0 for v in (total, mean)) or count < 1:
            return [], f"{path.name}:{n}: needs a name, positive times and instances >= 1"
        if abs(mean - total / count) > 1e-3 + 1e-3 * mean:
            return [], f"{path.name}:{n}: mean_time_ms {mean} is not total_time_ms / instances"
        if not on_gpu and not name.startswith("aten::"):
            return [], f"{path.name}:{n}: {name!r} is not an aten op (on CPU the kernels are aten ops)"
        rows.append((name, total, count))
    if len({r[0] for r in rows}) != 3:
        return [], f"{path.name}: a kernel is listed twice"
    if any(a[1] < b[1] for a, b in zip(rows, rows[1:])):
        return [], f"{path.name}: rows are not ordered by total_time_ms, largest first"
    return rows, ""


def ranked(profile: dict) -> list[str]:
    return sorted(profile, key=lambda k: -profile[k][0])


def check_kernels(reported: list, profiles: list[dict], sub: dict, top_any: int = 8, top_first: int = 3,
                  extra: dict | None = None) -> str:
    """The reported (name, total ms, instances) rows against the verifier's own profiles of the step ({kernel:
    (total ms, count)}, the profiled step first, then others of the same run). Timings vary between runs, so each
    kernel must be among the `top_any` heaviest of any profile, the first among the `top_first` heaviest; counts do
    not vary, so each must equal the first profile's, plus at most `extra`'s (what the step's data loading and
    logging add, where the task lets them fall inside the window). -> reason ('' when they hold)."""
    counts = {k: n for k, (_, n) in profiles[0].items()}
    tops = [ranked(p) for p in profiles]
    sub["ours_top"] = [[name[:80], counts[name]] for name in tops[0][:top_any]]
    for i, (name, _, count) in enumerate(reported):
        if name not in counts:
            return f"{name[:80]!r} is not a kernel of a training step of this configuration"
        if not any(name in top[:top_any] for top in tops):
            return f"{name[:80]!r} is not among the {top_any} heaviest kernels of the step"
        if i == 0 and not any(name in top[:top_first] for top in tops):
            return f"the reported heaviest, {name[:80]!r}, is not among the {top_first} heaviest of the step"
        low, high = counts[name], counts[name] + (extra or {}).get(name, 0)
        if not low <= count <= high:
            want = str(low) if low == high else f"{low}..{high}"
            return f"{name[:80]!r} ran {want} times in one step, the CSV says {count}"
    return ""


# ---- train-and-evaluate: the agent's Hugging Face export and its perplexity ----

EVAL_WINDOWS, EVAL_LENGTH = 16, 128  # windows 0..15 of the val stream, 128 (+1) tokens each
PPL_RTOL = 0.02
# Relative to the logits' scale. A float32 export and the framework's model agree to ~1e-6 on CPU and for PithTrain on
# the H100, 2e-5 for TorchTitan's small model there (other attention kernels); a wrong RoPE base in the export's
# config.json moves the tiny Megatron model's logits by only 2e-4.
LOGIT_TOL = 1e-4


def read_eval_report(ws: Path) -> tuple[float, Path]:
    """(reported perplexity, export folder) from results/eval.json; raises Fail saying what is wrong."""
    path = ws / "results" / "eval.json"
    try:
        report = json.loads(path.read_text())
        ppl, tokens, export = report["perplexity"], report["num_tokens"], report["export_dir"]
    except FileNotFoundError:
        raise Fail(f"no {path}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise Fail(f"{path.name} is malformed ({type(e).__name__}: {e})") from None
    if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not math.isfinite(ppl) or ppl < 1:
        raise Fail(f"{path.name}: perplexity must be a finite number >= 1, got {ppl!r}")
    if tokens != EVAL_WINDOWS * EVAL_LENGTH or isinstance(tokens, bool):
        raise Fail(f"{path.name}: num_tokens must be {EVAL_WINDOWS * EVAL_LENGTH}, got {tokens!r}")
    folder = Path(export) if Path(str(export)).is_absolute() else ws / str(export)
    if not (folder / "config.json").is_file():
        raise Fail(f"{path.name}: export_dir {export!r} holds no config.json")
    return float(ppl), folder


def hf_perplexity(export: Path, x, y, device: str):
    """(the export as transformers loads it: float32, no remote code; its perplexity on windows x -> y [W, S])."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    try:
        hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds for a folder it cannot read
        raise Fail(f"transformers cannot load {export} ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    hf = hf.to(device).eval()
    nll = 0.0
    with torch.no_grad():
        for xi, yi in zip(x, y):
            logits = hf(input_ids=xi[None].to(device)).logits[0].float()
            nll += F.cross_entropy(logits, yi.to(device), reduction="sum").item()
    return hf, math.exp(nll / y.numel())


def check_export(sub: dict, hf, framework_logits, x, reported: float, ppl: float, vocab: int, step: int) -> None:
    """The export's logits on the token ids x [B, S] against the framework's model loaded from the step's checkpoint
    (`framework_logits(x)`), the reported perplexity against ours, and ours well below the vocabulary size (the model
    trained); raises Fail for the first that does not hold."""
    import torch

    with torch.no_grad():
        want = framework_logits(x).float()
        got = hf(input_ids=x.to(want.device)).logits.float()
    err = (want - got).abs().max().item() / (1.0 + want.abs().max().item())
    sub["perplexity"], sub["vocab_size"] = round(ppl, 4), vocab
    sub["export_logit_err"] = float(f"{err:.3g}")
    if not err <= LOGIT_TOL:
        raise Fail(f"the export's logits differ from the step-{step} checkpoint's (rel. error {err:.3g})")
    if abs(reported - ppl) > PPL_RTOL * ppl:
        raise Fail(f"reported perplexity {reported:.3f} differs from the export's {ppl:.3f} by over 2%")
    if not ppl < vocab / 2:
        raise Fail(f"perplexity {ppl:.1f} is not well below the vocabulary size {vocab}")
