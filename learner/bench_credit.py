"""`memr2 bench credit`: credit fidelity of global and local groups against the horizon.

Memory-R2's claim (DESIGN §3): a global group's advantage, one number per rollout and session,
credits each memory operation less fairly the further rollouts' memories have diverged; a local
group's branches start from one anchor's snapshot M_{t-1} and so compare operations on equal
terms. The synthetic world knows each step's quality (its oracle score, actors.agent.oracle), so
per horizon H this bench runs rollouts only (no update) and measures, per group, the Spearman
correlation between the advantages training would give and the oracle scores (learner.credit).

Setting: the warm-started embedded policy (one warm start, as `memr2 bench learning` makes it) at
the training temperature, on synthetic conversations of at least 8 sessions, with
algo.local_prob=1.0 (a local group for every session) and rollout.m_local=8, above training's 2:
a local cell holds at most m samples and Spearman needs three, and with m = n_global local and
global cells are equally large, so their correlations are equally noisy. Horizon H runs
training's step plan (plan_step, fleet.run) over CONVERSATIONS[H] conversations.

Which conversations: only groups whose rewards differ can count, and the 8-session world asks
about its end state, so most questions become answerable late (per conversation on average ~1.6
by session 2, ~4.7 by 4, ~17 by 8). A conversation with nothing to ask by session H gives no
global group at H at all. So horizon H measures on the conversations, out of a pool of POOL,
with the most questions answerable by session H (ties: world order): at H = 2 the 36 richest of
1,000 hold ~5.7 questions, not 1.6. Credit is then measured where the world can give it; the
selection reads the world's questions, never the policy's rollouts. Calibrated on 8
conversations per horizon (SmolLM2 warm start, m = 8, 2 cores): ~1.0 counted group of each kind
per conversation at H = 2 (0.5 before the selection), ~2.5 at H = 4, at ~0.45 s per lane and
session; CONVERSATIONS aims at ~40 of each kind per horizon in ~25 minutes with the warm start.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow as pa

from actors.agent.rewards import final_questions
from actors.engines.models import check_model_name
from actors.fleet.cluster import init_ray
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from common.config import Config, load_config
from common.data import load_dataset, split
from common.metrics import run_root
from common.types import Conversation
from learner.bench_learning import _shared_warmstart
from learner.credit import KINDS, group_credit, paired_difference, summarize, values_by_kind
from learner.logo_grpo import with_advantages
from learner.train import job_asks

POOL = 1000  # conversations of the bench world; each horizon measures on its richest ones
CONVERSATIONS = {2: 36, 4: 16, 8: 8}  # per horizon by default; other horizons: ceil(100 / H^1.5)
MIN_SESSIONS = 8
M_LOCAL = 8
# 8 tasks per worker: no learner shares the cores, and local tasks then run beside the global
# ones they branch from (measured: 18% less rollout time than training's 4 at H = 2).
BENCH = ["data.source=synthetic", "data.synth.val_conversations=0", "algo.local_prob=1.0", f"rollout.m_local={M_LOCAL}",
         "rollout.tasks_per_worker=8"]
ORACLE = {
    "extractor": "soft F1 of the facts it produced (parsed) against the gold facts of the turns it read",
    "manager": "soft F1 of the memory bank's contents after its operations against the gold bank after the same turns "
               "(gold INSERT/UPDATE/DELETE replayed by key over every turn up to the last one the step read)",
    "soft_f1": "precision = mean over produced of the best LoCoMo token F1 against a gold text, recall = mean over gold "
               "of the best against a produced text; both empty 1.0, exactly one empty 0.0",
    "cell": "the samples of one group with the same session, chunk and role; Spearman(advantage, oracle); skipped with "
            "fewer than 3 samples or a constant side; a group is the mean of its defined cells",
}


def parse_horizons(text: str) -> list[int]:
    """"2,4,8" -> [2, 4, 8]; anything else is one line naming it."""
    try:
        horizons = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        horizons = []
    if not horizons or min(horizons) < 1 or len(set(horizons)) != len(horizons):
        raise ValueError(f"bench credit: --horizons takes distinct positive integers separated by commas, e.g. 2,4,8; got {text!r}")
    return sorted(horizons)


def conversations_per_horizon(horizons: list[int], conversations: int | None) -> dict[int, int]:
    """--conversations N at every horizon, or the default: short horizons need more conversations."""
    if conversations is not None and conversations < 1:
        raise ValueError(f"bench credit: --conversations must be at least 1, got {conversations}")
    return {h: conversations or CONVERSATIONS.get(h, math.ceil(100 / h**1.5)) for h in horizons}


def richest(conversations: list[Conversation], horizon: int, count: int, exclude_adversarial: bool) -> list[Conversation]:
    """The `count` conversations with the most questions answerable by session `horizon`, in world order on ties."""
    asked = [len(final_questions(c, horizon, exclude_adversarial)) for c in conversations]
    ranked = sorted(range(len(conversations)), key=lambda i: (-asked[i], i))
    return [conversations[i] for i in ranked[:count]]


def run_credit_bench(horizons: list[int], conversations: int | None = None, overrides: list[str] | None = None) -> dict:
    start = time.perf_counter()
    need = conversations_per_horizon(horizons, conversations)
    cfg = load_config(None, [*BENCH, f"data.synth.sessions={max(MIN_SESSIONS, *horizons)}",
                             f"data.synth.conversations={max(POOL, *need.values())}", *(overrides or [])])
    convs = _conversations(cfg, max(horizons), max(need.values()))
    chosen = {h: richest(convs, h, need[h], cfg.data.exclude_adversarial) for h in horizons}
    check_model_name(cfg.model.name)
    root = run_root(cfg) / time.strftime("bench-credit-%Y%m%d-%H%M%S")
    init_ray(cfg.cluster, job_asks(cfg))
    warm = _shared_warmstart(cfg, root / "warmstart")
    if warm is not None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(warm)})})
    fleet = RolloutFleet(cfg, run=root.name)
    result: dict = {"horizons": {}}
    per_group: dict[str, dict] = {}
    try:
        for h in horizons:
            # Step 0 at every horizon: the same task ids, so a conversation chosen at two horizons
            # draws the same sampling seeds in their common sessions (common random numbers).
            batch = fleet.run(plan_step(cfg, chosen[h], h, step=0))
            # Advantages exactly as training gives them: z-scores within each group with signal.
            tables = [with_advantages(g.table, cfg.algo.adv_eps) for g in batch.groups]
            credit = group_credit(pa.concat_tables(tables)) if tables else []
            summary = summarize(values_by_kind(credit))
            for kind in KINDS:
                summary[kind]["cells"] = sum(g.cells for g in credit if g.kind == kind)
                summary[kind]["with_signal"] = sum(g.kind == kind for g in credit)  # groups whose rewards differ
            summary["local_minus_global"] = paired_difference(credit)
            asked = sum(len(final_questions(c, h, cfg.data.exclude_adversarial)) for c in chosen[h])
            result["horizons"][str(h)] = {**summary, "conversations": need[h], "questions": asked, "global_groups": batch.global_groups,
                                          "local_groups": batch.local_groups, "degenerate_groups": batch.degenerate_groups,
                                          "format_failures": batch.stats.format_failures, "rollout_s": batch.wall_s}
            per_group[str(h)] = {kind: [{"group_id": g.group_id, "value": g.value, "cells": g.cells} for g in credit if g.kind == kind]
                                 for kind in KINDS}
    finally:
        fleet.shutdown()
    result.update({"conversations": {str(h): need[h] for h in horizons}, "pool": len(convs), "sessions": cfg.data.synth.sessions,
                   "n_global": cfg.rollout.n_global, "m_local": cfg.rollout.m_local, "temperature": cfg.rollout.temperature,
                   "local_prob": cfg.algo.local_prob, "policy": cfg.model.name, "oracle": ORACLE,
                   "wall_s": time.perf_counter() - start, "out": str(root)})
    result["plot"] = str(plot(result, root / "credit.png"))
    (root / "credit.json").write_text(json.dumps({**result, "per_group": per_group}, indent=1) + "\n")
    return result


def _conversations(cfg: Config, horizon: int, count: int) -> list[Conversation]:
    """The world's training conversations (the pool); one line if it cannot serve the bench."""
    if cfg.data.source != "synthetic" or cfg.data.synth.sessions < horizon:
        raise ValueError(f"bench credit: horizon {horizon} needs a synthetic world of at least {horizon} sessions "
                         f"(data.source={cfg.data.source}, data.synth.sessions={cfg.data.synth.sessions})")
    convs = split(load_dataset(cfg.data), cfg.data)["train"]
    if len(convs) < count:
        raise ValueError(f"bench credit: {count} conversations needed, the world trains on {len(convs)} "
                         "(raise data.synth.conversations or lower data.synth.val_conversations)")
    return convs


def plot(result: dict, out: Path) -> Path:
    """Correlation against horizon, global and local side by side, with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizons = list(result["horizons"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, kind, color in ((-0.12, "global", "tab:blue"), (0.12, "local", "tab:orange")):
        xs, ys, low, high = [], [], [], []
        for i, h in enumerate(horizons):
            stats = result["horizons"][h][kind]
            if stats["corr_mean"] is None:
                continue
            lo, hi = stats["ci"]
            xs.append(i + offset)
            ys.append(stats["corr_mean"])
            low.append(stats["corr_mean"] - lo)
            high.append(hi - stats["corr_mean"])
        ax.errorbar(xs, ys, yerr=[low, high], fmt="o", capsize=4, color=color, label=f"{kind} groups")
    ax.axhline(0.0, color="grey", lw=0.8)
    counts = [f"H={h}\n{result['horizons'][h]['global']['groups']} global, {result['horizons'][h]['local']['groups']} local"
              for h in horizons]
    ax.set_xticks(range(len(horizons)), counts)  # the groups behind each point
    ax.set_xlim(-0.6, len(horizons) - 0.4)
    ax.set_xlabel("horizon (sessions per rollout), groups counted")
    ax.set_ylabel("Spearman(advantage, oracle score)")
    ax.set_title("Credit fidelity per group (mean, bootstrap 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def render(result: dict) -> str:
    """The table a person reads (without --json)."""
    lines = [f"{'horizon':>8} {'kind':>7} {'corr_mean':>10} {'95% interval':>18} {'groups':>7} {'conversations':>14}"]
    for h, row in result["horizons"].items():
        for kind in KINDS:
            s = row[kind]
            corr = "-" if s["corr_mean"] is None else f"{s['corr_mean']:+.3f}"
            ci = "-" if s["ci"] is None else f"[{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"
            lines.append(f"{h:>8} {kind:>7} {corr:>10} {ci:>18} {s['groups']:>7} {row['conversations']:>14}")
    for h, row in result["horizons"].items():
        d = row["local_minus_global"]
        if d["mean"] is not None:
            lines.append(f"H={h}: local - global {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] over {d['pairs']} paired sessions")
    return "\n".join(lines + [f"plot: {result['plot']}", f"out: {result['out']}"])
