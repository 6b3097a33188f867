"""`memr2 bench learning`: LoGo-GRPO against plain GRPO at equal samples, over seeds.

Plain GRPO is LoGo-GRPO without local groups (`algo.local_prob=0`). To train on as many
generation steps per update, it gets the local groups' expected share as more global rollouts:
a local group adds, per session with probability p_local, m branches of one session, which is
p_local * m session-rollouts per session, against n per session from the global group. So

    n_grpo = n + round(p_local * m)          (the embedded default: 8 + 0.5 * 2 = 9)

Every run of every arm starts from one warm start (made once, copied into each run), so arms and
seeds differ only in their RL. Reported per arm: mean and standard error over seeds of the
validation F1 gain (last validation minus first) and of the last validation's M-Fail, and the
generation steps per update actually sampled (the match, measured). Seed s of either arm has the
same epoch order and validation set, so the arms are also compared seed by seed: LoGo's gain minus
GRPO's, its mean over seeds and a t-interval.

It takes hours at horizon 4 and beyond, so a bench is resumable: started again with the same
`out` folder and arguments, it keeps the runs that finished, resumes the interrupted one from its
last checkpoint (`memr2 train --resume auto`) and runs the rest.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from actors.fleet.cluster import init_ray
from common.config import Config, load_config
from common.metrics import run_root
from learner.train import job_asks, run
from learner.warmstart import run_warmstart

ARMS = ("logo", "grpo")


def arm_overrides(arm: str, cfg: Config) -> list[str]:
    if arm == "logo":
        return []
    if arm == "grpo":
        matched = cfg.rollout.n_global + round(cfg.algo.local_prob * cfg.rollout.m_local)
        return ["algo.local_prob=0", f"rollout.n_global={matched}"]
    raise ValueError(f"bench learning: unknown arm {arm!r} (arms: {', '.join(ARMS)})")


def run_learning_bench(arms: list[str], seeds: int, overrides: list[str], console: Console | None = None,
                       out: str | Path | None = None) -> dict:
    start = time.perf_counter()
    base = load_config(None, overrides)
    plans = {arm: arm_overrides(arm, base) for arm in arms}  # unknown arms fail before any work
    root = Path(out) if out else run_root(base) / time.strftime("bench-learning-%Y%m%d-%H%M%S")
    _claim(root, {"arms": arms, "seeds": seeds, "overrides": overrides})
    init_ray(base.cluster, job_asks(base))
    warm = _shared_warmstart(base, root / "warmstart")
    runs: dict[str, list[dict]] = {arm: [] for arm in plans}
    for seed in range(seeds):  # seed by seed, so a bench cut short holds pairs of runs
        for arm, extra in plans.items():
            name = f"{arm}-seed{seed}"
            cfg = load_config(None, [*overrides, *extra, f"seed={seed}", f"metrics.run_dir={root}", f"metrics.run_name={name}"])
            runs[arm].append(_one_run(_finished(root / name) or _train(cfg, warm, root / name), root / name))
    result: dict = {"seeds": seeds, "arms": {
        arm: {"overrides": plans[arm], **_mean_se(rs, "val_f1_gain"), **_mean_se(rs, "val_f1_end"), **_mean_se(rs, "val_m_fail_end"),
              "samples_per_step": statistics.fmean(r["samples_per_step"] for r in rs), "runs": rs}
        for arm, rs in runs.items()}}
    if {"logo", "grpo"} <= result["arms"].keys():
        logo, grpo = result["arms"]["logo"]["runs"], result["arms"]["grpo"]["runs"]
        result["logo_minus_grpo"] = paired(logo, grpo, "val_f1_gain")
        # Every run starts from one warm start, so the final F1s compare the policies directly,
        # without each run's own step-0 validation (greedy, but bf16 batches differ run to run).
        result["logo_minus_grpo_end"] = paired(logo, grpo, "val_f1_end")
        result["logo_minus_grpo_m_fail"] = paired(logo, grpo, "val_m_fail_end")  # lower keeps more evidence
    result["wall_s"] = time.perf_counter() - start  # this invocation's; each run's own is in its row
    result["out"] = str(root)
    (console or Console(stderr=True)).print(render(result))
    return result


def _claim(root: Path, args: dict) -> None:
    """A bench folder holds one bench: resuming it with other arguments would mix two."""
    path = root / "bench.json"
    if path.is_file() and json.loads(path.read_text()) != args:
        raise ValueError(f"bench learning: {root} holds a bench of other arguments ({path.read_text().strip()}); "
                         "use the same ones or another --out")
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(args))


def _finished(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _train(cfg: Config, warm: Path | None, run_dir: Path) -> dict:
    if warm is not None and not (run_dir / "warmstart" / "config.json").is_file():
        shutil.rmtree(run_dir / "warmstart", ignore_errors=True)  # a copy cut short
        shutil.copytree(warm, run_dir / "warmstart")
    return run(cfg, resume="auto")


def _shared_warmstart(cfg: Config, out: Path) -> Path | None:
    if not cfg.train.warmstart.enabled:
        return None
    if not (out / "config.json").is_file():  # save_hf renames a folder in whole: a resumed bench keeps a finished one
        run_warmstart(cfg, cfg.model.name, out)
    return out


def _one_run(summary: dict, run_dir: Path) -> dict:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    vals = [r for r in rows if "val_f1" in r]
    steps = [r["steps"] for r in rows if "reward_mean" in r]
    return {"seed_run": summary["run"], "val_f1_start": summary["val_f1_start"], "val_f1_end": summary["val_f1_end"],
            "val_f1_gain": summary["val_f1_end"] - summary["val_f1_start"], "val_m_fail_end": vals[-1]["val_m_fail"],
            "samples_per_step": statistics.fmean(steps) if steps else 0.0, "wall_s": summary["wall_s"]}


def _mean_se(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return {f"{key}_mean": statistics.fmean(values), f"{key}_se": se}


def paired(logo: list[dict], grpo: list[dict], key: str) -> dict:
    """LoGo's `key` minus GRPO's, seed by seed: mean, standard error and a 95% t-interval."""
    from scipy import stats

    diffs = [a[key] - b[key] for a, b in zip(logo, grpo, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "se": None, "ci": None, "seeds": len(diffs)}
    se = statistics.stdev(diffs) / len(diffs) ** 0.5
    half = stats.t.ppf(0.975, len(diffs) - 1) * se
    return {"mean": mean, "se": se, "ci": [mean - half, mean + half], "seeds": len(diffs)}


def render(result: dict) -> Table:
    table = Table(title=f"LoGo-GRPO vs GRPO at equal samples ({result['seeds']} seeds, mean ± s.e.)")
    for header in ("arm", "val F1 gain", "val F1 (end)", "val M-Fail (end)", "samples / step"):
        table.add_column(header, justify="left" if header == "arm" else "right")

    def fmt(stats: dict, key: str) -> str:
        se = stats[f"{key}_se"]
        return f"{stats[f'{key}_mean']:+.3f}" + ("" if se is None else f" ± {se:.3f}")

    for arm, stats in result["arms"].items():
        table.add_row(arm, fmt(stats, "val_f1_gain"), fmt(stats, "val_f1_end").lstrip("+"), fmt(stats, "val_m_fail_end").lstrip("+"),
                      f"{stats['samples_per_step']:.0f}")
    lines = []
    for what, key in (("gain", "logo_minus_grpo"), ("end F1", "logo_minus_grpo_end"), ("M-Fail (end)", "logo_minus_grpo_m_fail")):
        diff = result.get(key)
        if diff and diff["ci"]:
            lines.append(f"logo − grpo {what}, seed by seed: {diff['mean']:+.3f} (95% t-interval {diff['ci'][0]:+.3f} … {diff['ci'][1]:+.3f})")
    table.caption = "\n".join(lines) or None
    return table
