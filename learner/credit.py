"""Credit fidelity: do a group's advantages rank its steps the way their oracle scores do?

Memory-R2's claim (DESIGN §3): once rollouts' memories diverge, a global group's trajectory-level
advantage credits each memory operation noisily, and a local group's branches from one anchor's
snapshot credit it more fairly. With oracle scores per step (actors.agent.oracle) that is
measurable:

  cell        the samples of one group with the same session, chunk and role: one decision point,
              taken once by each rollout (global) or branch (local) that reached it;
  cell value  Spearman's rank correlation between the samples' advantage and their oracle score;
              undefined (skipped) with fewer than MIN_CELL samples, a constant advantage or a
              constant oracle (no ranking to compare), and samples without an oracle (NaN) are left out;
  group value the mean over its defined cells; a group with none is not counted;
  per kind    the mean over groups, with a bootstrap 95% interval over groups (common.scoring);
  paired      local minus global where both kinds credited the same decisions (one conversation
              and session; a session's local groups averaged first), with its bootstrap interval:
              the two kinds' intervals overlap more than their paired difference does.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
from scipy.stats import spearmanr

from common.scoring import bootstrap_ci
from common.types import GroupKind

MIN_CELL = 3  # Spearman on two points is always +-1: no evidence either way
KINDS: tuple[GroupKind, ...] = ("global", "local")
COLUMNS = ("group_id", "group_kind", "conversation", "session", "chunk", "role", "advantage", "oracle")


@dataclass(frozen=True, slots=True)
class GroupCredit:
    group_id: str
    kind: GroupKind
    value: float | None  # mean Spearman over its defined cells; None: no defined cell
    cells: int  # defined cells
    where: tuple[str, int]  # (conversation, session) whose steps the group credits


def cell_correlation(advantages: list[float], oracles: list[float]) -> float | None:
    """Spearman's rho of one cell, or None where it is undefined (see the module docstring)."""
    if len(advantages) < MIN_CELL or len(set(advantages)) == 1 or len(set(oracles)) == 1:
        return None
    return float(spearmanr(advantages, oracles).statistic)


def group_credit(table: pa.Table) -> list[GroupCredit]:
    """Every group of a step table (rows carrying their advantages), in order of first appearance."""
    cols = table.select(list(COLUMNS)).to_pydict()
    kinds: dict[str, GroupKind] = {}
    where: dict[str, tuple[str, int]] = {}
    cells: dict[str, dict[tuple, tuple[list[float], list[float]]]] = defaultdict(dict)
    for gid, kind, conversation, session, chunk, role, adv, oracle in zip(*(cols[c] for c in COLUMNS)):
        kinds.setdefault(gid, kind)
        where.setdefault(gid, (conversation, session))
        cell = cells[gid].setdefault((session, chunk, role), ([], []))
        if oracle is not None and not math.isnan(oracle):
            cell[0].append(adv)
            cell[1].append(oracle)
    out = []
    for gid, kind in kinds.items():
        rhos = [r for advs, oracles in cells[gid].values() if (r := cell_correlation(advs, oracles)) is not None]
        out.append(GroupCredit(gid, kind, statistics.fmean(rhos) if rhos else None, len(rhos), where[gid]))
    return out


def values_by_kind(groups: Iterable[GroupCredit]) -> dict[str, list[float]]:
    """The counted groups' values per kind (groups without a defined cell left out)."""
    out: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for g in groups:
        if g.value is not None:
            out[g.kind].append(g.value)
    return out


def summarize(values: dict[str, list[float]]) -> dict[str, dict]:
    """Per kind: corr_mean over groups, its bootstrap 95% interval, and the groups counted."""
    out = {}
    for kind in KINDS:
        v = values.get(kind, [])
        ci = bootstrap_ci(v)
        out[kind] = {"corr_mean": statistics.fmean(v) if v else None, "ci": list(ci) if ci else None, "groups": len(v)}
    return out


def paired_difference(groups: Iterable[GroupCredit]) -> dict:
    """Local minus global per (conversation, session) both kinds counted: mean, interval, pairs."""
    by_kind: dict[str, dict[tuple[str, int], list[float]]] = {kind: defaultdict(list) for kind in KINDS}
    for g in groups:
        if g.value is not None:
            by_kind[g.kind][g.where].append(g.value)
    diffs = [statistics.fmean(local) - statistics.fmean(by_kind["global"][w])
             for w, local in by_kind["local"].items() if w in by_kind["global"]]
    ci = bootstrap_ci(diffs)
    return {"mean": statistics.fmean(diffs) if diffs else None, "ci": list(ci) if ci else None, "pairs": len(diffs)}


def step_metrics(table: pa.Table) -> dict[str, float]:
    """A training step's credit_corr_global / credit_corr_local: the mean over that step's counted
    groups of each kind; a kind without one is absent (never a NaN in metrics.jsonl)."""
    values = values_by_kind(group_credit(table))
    return {f"credit_corr_{kind}": statistics.fmean(v) for kind, v in values.items() if v}
