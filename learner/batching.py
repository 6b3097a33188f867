"""How a batch of step rows is split across data-parallel ranks, mini-batches and micro-batches.

Every rank must run the same number of optimizer steps, each with the same number of backward
passes, or the ranks' collective calls fall out of step and hang.  So the shape of the work is
fixed by the driver, not by each rank's row count:

- rows are dealt round-robin over ranks after the group tables are concatenated in order, so
  each group's steps spread evenly and shard sizes differ by at most one row;
- every rank cuts each epoch into the same number K of mini-batches, K = ceil(rows / mini_batch)
  over the whole batch, and every mini-batch into exactly `accum` micro-batches. Rows are drawn
  alone; learner.mini_batch_by=prompt draws rows with one prompt (the n lanes' extractor calls
  on a chunk, a local group's branches) together, as verl draws a prompt's n responses: more
  prompts shared per pass, but another update (the embedded default's F1 gain vanished). With
  learner.shared_prefix the mini-batch's rows are then put in session and prompt order and cut
  where prompts change (`balanced_split`), so rows with one prompt share a pass: which rows an
  optimizer step sees is unchanged, and so is its gradient (each micro-batch's loss is its share
  of the mini-batch's pooled loss, ranks.py);
- a micro-batch that comes out empty (fewer rows than slots) runs a zero-weight dummy forward and
  backward so the rank still joins the gradient reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa
import torch


@dataclass(slots=True)
class Rows:
    """The columns of a shard the loss needs, as Python lists (cheap to index per micro-batch)."""

    prompts: list[list[int]]
    responses: list[list[int]]
    old_logprobs: list[list[float]]
    advantages: list[float]
    is_local: list[bool]
    sessions: list[tuple[str, int]]  # (conversation, session): rows that may share prompts
    prox_logprobs: list[list[float]] | None = None  # algo.off_policy=decoupled: the proximal policy's

    @classmethod
    def from_table(cls, table: pa.Table) -> Rows:
        rows = cls(
            table["prompt_ids"].to_pylist(),
            table["response_ids"].to_pylist(),
            table["logprobs"].to_pylist(),
            table["advantage"].to_pylist(),
            [k == "local" for k in table["group_kind"].to_pylist()],
            list(zip(table["conversation"].to_pylist(), table["session"].to_pylist())),
        )
        for i, (r, lp) in enumerate(zip(rows.responses, rows.old_logprobs)):
            if len(r) != len(lp):
                raise ValueError(f"row {i}: {len(r)} response tokens but {len(lp)} behaviour logprobs")
        return rows

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: list[int]) -> Rows:
        cols = (self.prompts, self.responses, self.old_logprobs, self.advantages, self.is_local, self.sessions)
        prox = None if self.prox_logprobs is None else [self.prox_logprobs[i] for i in idx]
        return Rows(*([col[i] for i in idx] for col in cols), prox)

    def by_prompt(self) -> list[list[int]]:
        """Rows with identical prompts, in order of first appearance; each row once."""
        units: dict[tuple[int, ...], list[int]] = {}
        for i, prompt in enumerate(self.prompts):
            units.setdefault(tuple(prompt), []).append(i)
        return list(units.values())

    def drawn_together(self, mini_batch_by: str) -> list[list[int]] | None:
        """plan_epoch's units under learner.mini_batch_by: a prompt's rows, or None (each row alone)."""
        return self.by_prompt() if mini_batch_by == "prompt" else None

    def old_logprobs_tensor(self, width: int, proximal: bool = False) -> torch.Tensor:
        """Behaviour (or proximal) logprobs right-padded to the packed response width."""
        out = torch.zeros(len(self), width, dtype=torch.float32)
        for b, lp in enumerate(self.prox_logprobs if proximal else self.old_logprobs):
            out[b, : len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
        return out


def split_round_robin(table: pa.Table, world_size: int) -> list[pa.Table]:
    """Deal rows to ranks in turn: shard k gets rows k, k+W, k+2W, ..."""
    return [table.take(list(range(k, table.num_rows, world_size))) for k in range(world_size)]


def mini_batches_per_epoch(total_rows: int, mini_batch: int) -> int:
    return max(1, math.ceil(total_rows / mini_batch))


def plan_epoch(
    n_rows: int, n_mini: int, accum: int, generator: torch.Generator, together: list[list[int]] | None = None
) -> list[list[list[int]]]:
    """A shuffled epoch: n_mini mini-batches, each of exactly `accum` micro-batches (some may be empty).
    `together`: units of rows shuffled as one (Rows.by_prompt), then laid out in that order and
    cut into mini-batches whose sizes still differ by at most one, so a unit is split only where a
    cut falls inside it. None: every row its own unit (the same order as singletons give)."""
    units = together if together is not None else [[i] for i in range(n_rows)]
    if sorted(i for unit in units for i in unit) != list(range(n_rows)):
        raise ValueError(f"plan_epoch: the units must hold each of the {n_rows} rows once")
    order = [i for k in torch.randperm(len(units), generator=generator).tolist() for i in units[k]]
    return [_split(mini, accum) for mini in _split(order, n_mini)]


def _split(items: list[int], parts: int) -> list[list[int]]:
    """`parts` contiguous runs whose sizes differ by at most one (the first ones are longer)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + q + (k < r)
        out.append(items[start:end])
        start = end
    return out


def split_by_tokens(rows: Rows, idx: list[int], budget: int, shared: bool = False) -> list[list[int]]:
    """Micro-batches of at most `budget` padded tokens each. A row longer than the budget alone
    goes alone (`memr2 plan` sizes the budget to the longest).

    Unshared: rows x (longest prompt + longest response), the shape `learner.logprobs.pack`
    builds; longest rows first, so rows of a length share a micro-batch and little is padding.
    Shared: the tokens `learner.shared_prefix.pack_shared` packs, rows kept in their order
    (sessions, then prompts), so rows with one prompt stay together. The pooled loss does not
    depend on the grouping."""
    if shared:
        from learner.shared_prefix import padded_tokens

        order, cost = list(idx), lambda micro: padded_tokens([rows.prompts[i] for i in micro], [rows.responses[i] for i in micro])
    else:
        order = sorted(idx, key=lambda i: (len(rows.prompts[i]) + len(rows.responses[i]), i), reverse=True)
        cost = lambda micro: len(micro) * (max(len(rows.prompts[i]) for i in micro) + max(len(rows.responses[i]) for i in micro))  # noqa: E731
    out: list[list[int]] = []
    for i in order:
        if out and cost(out[-1] + [i]) <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def balanced_split(rows: Rows, idx: list[int], parts: int) -> list[list[int]]:
    """`parts` runs of `idx` in session and prompt order (some may be empty) whose largest shared-prefix cost
    (learner.shared_prefix.padded_tokens) is as small as it can be, then their total: the runs
    follow prompt boundaries, so 8 rows of one prompt can share a pass where 4 unshared rows
    would fill it. Equal row counts would cut them apart."""
    from learner.shared_prefix import padded_tokens

    idx = sorted(idx, key=lambda i: (rows.sessions[i], rows.prompts[i], i))  # one prompt's rows side by side
    n = len(idx)
    cost = [[0] * (n + 1) for _ in range(n + 1)]  # cost[j][i]: rows idx[j:i] in one pass
    for j in range(n):
        for i in range(j + 1, n + 1):
            cost[j][i] = padded_tokens([rows.prompts[k] for k in idx[j:i]], [rows.responses[k] for k in idx[j:i]])
    best = [(0, 0, None)] + [(cost[0][i], cost[0][i], None) for i in range(1, n + 1)]  # (max, sum, cut) with 1 part
    cuts = [[None] * (n + 1)]
    for _ in range(parts - 1):
        row, choice = [], []
        for i in range(n + 1):
            options = [(max(best[j][0], cost[j][i]), best[j][1] + cost[j][i], j) for j in range(i + 1)]
            pick = min(options)
            row.append(pick)
            choice.append(pick[2])
        best, cuts = row, cuts + [choice]
    out, end = [], n
    for choice in reversed(cuts[1:]):
        start = choice[end]
        out.append(idx[start:end])
        end = start
    out.append(idx[:end])
    return out[::-1]
