"""The driver's handle on the DeepSpeed learner: `num_ranks` data-parallel ranks as Ray actors.

    learner = Learner(model, cfg.algo, cfg.learner, seed=cfg.seed)   # a name each rank resolves
    metrics = learner.train(group_tables)        # one table per group, STEP_SCHEMA
    weights = learner.state_dict()               # HF names, CPU tensors: weight sync
    learner.save_checkpoint(dir, tag); learner.load_checkpoint(dir, tag)   # engine + optimizer
    learner.save_pretrained(dir)                 # HF folder for evaluation / the next stage

Advantages are computed here, per group table (learner.logo_grpo.with_advantages), before the
rows are dealt to ranks, so a group's z-score never depends on how it was split.  See
learner.batching for how rows are split and learner.ranks for the exact pooled gradient.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from common.config import AlgoConfig, LearnerConfig
from learner.batching import mini_batches_per_epoch, split_round_robin
from learner.engine import grad_accumulation
from learner.logo_grpo import with_advantages
from learner.ranks import LearnerRank


def rank_resources(cfg: LearnerConfig) -> dict[str, float]:
    gpus = (1.0 if torch.cuda.is_available() else 0.0) if cfg.gpus_per_rank is None else cfg.gpus_per_rank
    return {"CPU": cfg.cpus_per_rank, "GPU": gpus, **cfg.resources}


class Learner:
    """`model` is what `model.name` takes (tiny, smollm2, a hub id, a folder) and goes to the ranks
    as it is: each rank resolves it on its own node (actors.engines.models.resolve_model), as
    rollout workers do, so no folder that exists on the driver's node alone reaches another node.
    A folder must be one every rank's node sees (the run directory: the warm start, a best)."""

    def __init__(
        self,
        model: str,
        algo: AlgoConfig,
        cfg: LearnerConfig,
        seed: int = 0,
    ) -> None:
        grad_accumulation(cfg, cfg.num_ranks)  # fail here, not inside an actor
        self.algo, self.cfg, self.seed = algo, cfg, seed
        self.model = self.model_dir = model  # as given, unresolved (model_dir: its older name)
        self.version = 0  # policy version: bumped by every train() call, stamped on trajectories
        self.train_calls = 0
        self.transfer_group = None  # the collective weight sync's group, kept by learner.weight_sync
        need = rank_resources(cfg)
        threads = max(1, int(cfg.cpus_per_rank))
        # One placement group, PACK: the ranks share a node wherever one holds them all, so ZeRO's
        # reduce-scatter of every step stays off the network (Ray's default packing may split them).
        self.group = placement_group([{k: v for k, v in need.items() if v > 0}] * cfg.num_ranks, strategy="PACK")
        actor = ray.remote(LearnerRank)
        self.ranks = [actor.options(num_cpus=need["CPU"], num_gpus=need["GPU"], resources=dict(cfg.resources),
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=r))
                      .remote(r, cfg.num_ranks, threads) for r in range(cfg.num_ranks)]
        start = time.perf_counter()
        try:
            master = self._rendezvous()
            setup = [r.setup.remote(master, model, algo.model_dump(), cfg.model_dump()) for r in self.ranks]
            self.setup_s = max(ray.get(setup))  # inside the ranks: process group + engine
        except BaseException:
            self.shutdown()  # ranks that did join would wait for the others until the pg timeout
            raise
        self.startup_s = time.perf_counter() - start  # as the driver sees it, incl. actor start

    def _rendezvous(self) -> tuple[str, int]:
        """Rank 0 hosts the process group; loopback when every rank shares its node."""
        ip, port = ray.get(self.ranks[0].address.remote())
        ips = ray.get([r.address.remote() for r in self.ranks[1:]])
        same_node = all(other_ip == ip for other_ip, _ in ips)
        return ("127.0.0.1" if same_node else ip), port

    # ------------------------------------------------------------------ training

    def prepare(self, tables: Sequence[pa.Table]) -> pa.Table:
        """Advantages per group, then one table in group order."""
        done = [with_advantages(t, self.algo.adv_eps) for t in tables if t.num_rows]
        if not done:
            raise ValueError("train() got no rows")
        return pa.concat_tables(done)

    def train(self, tables: Sequence[pa.Table]) -> dict[str, float]:
        """Advantages per group, then one LoGo-GRPO update."""
        return self.update(self.prepare(tables))

    def update(self, batch: pa.Table, objective: str = "logo_grpo") -> dict[str, float]:
        """One update over rows that carry their advantages; rank 0's (all-reduced) metrics.
        objective "sft" (the warm start) maximises the responses' token-mean log-likelihood."""
        shards = split_round_robin(batch, self.cfg.num_ranks)
        n_mini = mini_batches_per_epoch(batch.num_rows, self.cfg.mini_batch)
        seed = self.seed * 1_000_003 + self.train_calls
        results = ray.get([r.train.remote(s, n_mini, seed, objective, self.version + 1) for r, s in zip(self.ranks, shards)])
        self.train_calls += 1
        self.version += 1
        metrics = dict(results[0])
        metrics["train_s_max"] = max(m["train_s"] for m in results)  # the slowest rank sets the pace
        metrics["groups"] = float(len(set(batch["group_id"].to_pylist())))
        lag = self.version - 1 - pc.min(batch["policy_version"]).as_py()  # updates since the oldest row
        metrics["policy_lag_max"] = float(lag)
        metrics["policy_version"] = float(self.version)
        return metrics

    def publish_weights(self) -> list:
        """The full weights put in the object store by rank 0 (every rank joins: ZeRO-3 gathers);
        returned wrapped in a list so the ref, not the weights, travels to the rollout workers."""
        return next(w for w in ray.get([r.put_state_dict.remote() for r in self.ranks]) if w is not None)

    # ------------------------------------------------------------------ collective weight sync

    def _gathering_ranks(self) -> list:
        """The ranks a full copy of the weights needs: all under ZeRO-3 (they gather), else rank 0."""
        return self.ranks if self.cfg.zero_stage == 3 else self.ranks[:1]

    def open_transfer_port(self) -> tuple[str, int, str]:
        """Rank 0's (ip, port, backend) for a new group; the port listens until the group forms."""
        return ray.get(self.ranks[0].open_transfer_port.remote())

    def init_weight_transfer(self, workers: list, address: tuple[str, int], dtype: str | None) -> int:
        """A new group of rank 0 and `workers` (engine i at rank 1 + i); bytes one sync sends."""
        return ray.get([r.init_weight_transfer.remote(workers, address, dtype) for r in self._gathering_ranks()])[0]

    def send_weights(self) -> list[ray.ObjectRef]:
        """Rank 0 broadcasts the current weights to its group; refs to wait on."""
        return [r.send_weights.remote(self.version) for r in self._gathering_ranks()]

    def weight_sources(self) -> list:
        """The ranks that make a full copy of the weights when a late worker asks the policy store
        (actors.fleet.policy_store): rank 0, or all under ZeRO-3 (they gather)."""
        return self._gathering_ranks()

    def close_weight_transfer(self) -> None:
        ray.get([r.close_weight_transfer.remote() for r in self.ranks])

    # ------------------------------------------------------------------ weights

    def logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Current policy's response logprobs on rank 0 (ranks hold identical weights)."""
        if self.cfg.zero_stage == 3:  # a ZeRO-3 forward gathers parameters: every rank joins
            return ray.get([r.logprobs.remote(prompts, responses) for r in self.ranks])[0]
        return ray.get(self.ranks[0].logprobs.remote(prompts, responses))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get([r.state_dict.remote() for r in self.ranks])[0]

    def rank_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's full weights (tests: data-parallel ranks must agree)."""
        return ray.get([r.state_dict.remote(on_every_rank=True) for r in self.ranks])

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, our counters); every rank writes its
        partition, so across nodes `directory` must be on a shared file system."""
        state = {"version": self.version, "train_calls": self.train_calls, "seed": self.seed}
        ray.get([r.save_checkpoint.remote(directory, tag, state) for r in self.ranks])

    def load_checkpoint(self, directory: str, tag: str, *, as_new_version: bool = False) -> None:
        """Weights, optimizer state, policy version and the shuffle counter of a saved run.

        as_new_version: going back to earlier weights within a run (a curriculum stage restarting
        from the best checkpoint) publishes them as the next version, with the counters running
        on: versions only grow, so no trajectory's version can name two different policies."""
        states = ray.get([r.load_checkpoint.remote(directory, tag) for r in self.ranks])
        if as_new_version:
            self.version += 1
        else:
            self.version = int(states[0].get("version", 0))
            self.train_calls = int(states[0].get("train_calls", 0))
        ray.get([r.set_version.remote(self.version) for r in self.ranks])

    def save_pretrained(self, directory: str) -> None:
        ray.get([r.save_pretrained.remote(directory) for r in self.ranks])

    def load_pretrained(self, directory: str) -> None:
        """The weights of a model folder (save_pretrained's) on every rank, with fresh optimizer
        state: a curriculum stage restarting from the best weights starts a new optimization.
        Published as the next version, the counters running on (see load_checkpoint)."""
        ray.get([r.load_pretrained.remote(directory) for r in self.ranks])
        self.version += 1
        ray.get([r.set_version.remote(self.version) for r in self.ranks])

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None

    def __enter__(self) -> Learner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
