"""How a batch of step rows is split across data-parallel ranks, mini-batches and micro-batches.

Every rank must run the same number of optimizer steps, each with the same number of backward
passes, or the ranks' collective calls fall out of step and hang.  So the shape of the work is
fixed by the driver, not by each rank's row count:

- rows are dealt round-robin over ranks after the group tables are concatenated in order, so
  each group's steps spread evenly and shard sizes differ by at most one row;
- every rank cuts each epoch into the same number K of mini-batches, K = ceil(rows / mini_batch)
  over the whole batch, and every mini-batch into exactly `accum` micro-batches;
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

    @classmethod
    def from_table(cls, table: pa.Table) -> Rows:
        rows = cls(
            table["prompt_ids"].to_pylist(),
            table["response_ids"].to_pylist(),
            table["logprobs"].to_pylist(),
            table["advantage"].to_pylist(),
            [k == "local" for k in table["group_kind"].to_pylist()],
        )
        for i, (r, lp) in enumerate(zip(rows.responses, rows.old_logprobs)):
            if len(r) != len(lp):
                raise ValueError(f"row {i}: {len(r)} response tokens but {len(lp)} behaviour logprobs")
        return rows

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, idx: list[int]) -> Rows:
        cols = (self.prompts, self.responses, self.old_logprobs, self.advantages, self.is_local)
        return Rows(*([col[i] for i in idx] for col in cols))

    def old_logprobs_tensor(self, width: int) -> torch.Tensor:
        """Behaviour logprobs right-padded to the packed response width."""
        out = torch.zeros(len(self), width, dtype=torch.float32)
        for b, lp in enumerate(self.old_logprobs):
            out[b, : len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
        return out


def split_round_robin(table: pa.Table, world_size: int) -> list[pa.Table]:
    """Deal rows to ranks in turn: shard k gets rows k, k+W, k+2W, ..."""
    return [table.take(list(range(k, table.num_rows, world_size))) for k in range(world_size)]


def mini_batches_per_epoch(total_rows: int, mini_batch: int) -> int:
    return max(1, math.ceil(total_rows / mini_batch))


def plan_epoch(n_rows: int, n_mini: int, accum: int, generator: torch.Generator) -> list[list[list[int]]]:
    """A shuffled epoch: n_mini mini-batches, each of exactly `accum` micro-batches (some may be empty)."""
    order = torch.randperm(n_rows, generator=generator).tolist()
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


def split_by_tokens(rows: Rows, idx: list[int], budget: int) -> list[list[int]]:
    """Micro-batches of at most `budget` padded tokens each (rows x (longest prompt + longest
    response), the shape `learner.logprobs.pack` builds). Longest rows first, so rows of a length
    share a micro-batch and little is padding; the pooled loss does not depend on the grouping. A
    row longer than the budget alone goes alone (`memr2 plan` sizes the budget to the longest)."""
    order = sorted(idx, key=lambda i: (len(rows.prompts[i]) + len(rows.responses[i]), i), reverse=True)
    out: list[list[int]] = []
    prompt = response = 0
    for i in order:
        p, r = max(prompt, len(rows.prompts[i])), max(response, len(rows.responses[i]))
        if out and (len(out[-1]) + 1) * (p + r) <= budget:
            out[-1].append(i)
            prompt, response = p, r
        else:
            out.append([i])
            prompt, response = len(rows.prompts[i]), len(rows.responses[i])
    return out
