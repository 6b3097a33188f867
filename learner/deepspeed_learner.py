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

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.fleet.colocation import Colocation
from actors.fleet.errors import one_line
from common.config import AlgoConfig, LearnerConfig
from learner.batching import mini_batches_per_epoch, split_round_robin
from learner.engine import grad_accumulation
from learner.logo_grpo import with_advantages
from learner.ranks import LearnerRank

log = logging.getLogger("memr2.learner")
POLL_S = 5.0  # how often a call in flight checks that every rank's node is still there


class LearnerLost(RuntimeError):
    """A rank died or went silent: Learner.recover starts a new set."""


class LearnerFailed(RuntimeError, ValueError):
    """More losses than learner.max_restarts: a ValueError too, so the CLI ends with its one line."""


def rank_resources(cfg: LearnerConfig) -> dict[str, float]:
    gpus = (1.0 if torch.cuda.is_available() else 0.0) if cfg.gpus_per_rank is None else cfg.gpus_per_rank
    return {"CPU": cfg.cpus_per_rank, "GPU": gpus, **cfg.resources}


class Learner:
    """`model` is what `model.name` takes (tiny, smollm2, a hub id, a folder) and goes to the ranks
    as it is: each rank resolves it on its own node (actors.engines.models.resolve_model), as
    rollout workers do, so no folder that exists on the driver's node alone reaches another node.
    A folder must be one every rank's node sees (the run directory: the warm start, a best)."""

    rank_class = LearnerRank  # tests put a rank in its place that fails as a disk or a node does

    def __init__(
        self,
        model: str,
        algo: AlgoConfig,
        cfg: LearnerConfig,
        seed: int = 0,
        colocation: Colocation | None = None,
    ) -> None:
        grad_accumulation(cfg, cfg.num_ranks)  # fail here, not inside an actor
        self.algo, self.cfg, self.seed = algo, cfg, seed
        self.colocation = colocation  # cluster.colocate: rank i on bundle i of the shared group
        self.offload = False  # colocated: states to host while the engines are awake (set by train.run)
        self.model = self.model_dir = model  # as given, unresolved (model_dir: its older name)
        self.version = 0  # policy version: bumped by every train() call, stamped on trajectories
        self.train_calls = 0
        self.transfer_group = None  # the collective weight sync's group, kept by learner.weight_sync
        # In-job recovery (recover): where new ranks start from, and what changed them since.
        self.checkpoint: tuple[str, str] | None = None  # (directory, tag) last saved or loaded
        self.journal: list[Callable[[], Any]] = []  # weight changes since it, to replay in order
        self.restarts = 0  # rank sets started again after a loss
        self._restarts_reported = 0
        self.stale_groups = 0  # groups left out for exceeding train.max_staleness (prepare)
        self.group, self.ranks = None, []
        start = time.perf_counter()
        self._start_ranks()
        self.startup_s = time.perf_counter() - start  # as the driver sees it, incl. actor start

    def _start_ranks(self) -> None:
        need = self.colocation.rank if self.colocation else rank_resources(self.cfg)
        threads = max(1, int(self.cfg.cpus_per_rank))
        # One placement group, PACK: the ranks share a node wherever one holds them all, so ZeRO's
        # reduce-scatter of every step stays off the network (Ray's default packing may split them).
        # Colocated, the group is the one every pair shares.
        if self.colocation:
            self.group = self.colocation.group
        else:
            self.group = placement_group([{k: v for k, v in need.items() if v > 0}] * self.cfg.num_ranks, strategy="PACK")
        actor = ray.remote(self.rank_class)
        self.ranks = [actor.options(num_cpus=need["CPU"], num_gpus=need["GPU"], resources=dict(self.cfg.resources),
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=r))
                      .remote(r, self.cfg.num_ranks, threads) for r in range(self.cfg.num_ranks)]
        try:
            master = self._rendezvous()
            setup = [r.setup.remote(master, self.model, self.algo.model_dump(), self.cfg.model_dump()) for r in self.ranks]
            self.setup_s = max(self._wait(setup))  # inside the ranks: process group + engine
        except BaseException:
            self.shutdown()  # ranks that did join would wait for the others until the pg timeout
            raise

    def _rendezvous(self) -> tuple[str, int]:
        """Rank 0 hosts the process group; loopback when every rank shares its node."""
        ip, port = self._wait([self.ranks[0].address.remote()])[0]
        ips = self._wait([r.address.remote() for r in self.ranks[1:]])
        same_node = all(other_ip == ip for other_ip, _ in ips)
        return ("127.0.0.1" if same_node else ip), port

    # ------------------------------------------------------------------ a lost rank

    def _on_ranks(self, call: Callable[[], list[ray.ObjectRef]]) -> list:
        """The results of `call` (which sends one method to ranks). A rank lost meanwhile: the
        ranks are recovered to the state before the call, and it is sent again."""
        while True:
            try:
                return self._wait(call())
            except LearnerLost as lost:
                self.recover(str(lost))

    def _wait(self, refs: list[ray.ObjectRef]) -> list:
        """Every result, or LearnerLost as soon as a rank is seen dead or all stay silent past
        learner.timeout_s (a rank whose peer died may block in a collective until gloo's or
        NCCL's own timeout, 30 min, so a hang is a loss too)."""
        pending, timeout = list(refs), self.cfg.timeout_s
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = POLL_S if deadline is None else min(POLL_S, max(0.0, deadline - time.monotonic()))
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready and deadline is not None and time.monotonic() >= deadline:
                raise LearnerLost(f"a learner rank answered nothing for {timeout:g} s (learner.timeout_s)")
            if not ready:
                self._check_nodes()
                continue
            try:
                ray.get(ready[0])
            except RayActorError as err:
                raise LearnerLost(f"a learner rank died: {one_line(err)}") from None
            except RayTaskError as err:
                # The survivors of a dead rank fail in their next collective: a loss, not a bug.
                if self._any_dead(pending):
                    raise LearnerLost(f"a learner rank died: {one_line(err)}") from None
                raise
        return ray.get(list(refs))

    def _check_nodes(self) -> None:
        """A rank's node lost: its call may never fail (the survivors wait in a collective until
        gloo's 10-minute timeout), but the placement group says so at once."""
        if self.group is not None and ray.util.placement_group_table(self.group).get("state") != "CREATED":
            raise LearnerLost("a learner rank's node was lost (its placement group is being rescheduled)")

    @staticmethod
    def _any_dead(refs: list[ray.ObjectRef], grace_s: float = 10.0) -> bool:
        """Whether any of these calls ends with its rank dead (Ray takes a moment to tell)."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=grace_s) if refs else ([], [])
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError:
                return True
            except RayTaskError:
                pass
        return False

    def lost_rank(self) -> bool:
        """Whether a rank is dead (a call that failed elsewhere, as a weight sync, asks)."""
        return self._any_dead([r.address.remote() for r in self.ranks])

    def recover(self, why: str) -> None:
        """A new set of ranks (new placement group, new rendezvous) in the state the old one had
        after its last completed call: the last checkpoint (or the initial model), then every
        update and weight load since it, replayed from the same rows and seeds. Exact where the
        updates are deterministic (fp32: learner.bf16=off). The weight-transfer group is formed
        again at the next sync (weight_sync compares `restarts`)."""
        version, calls = self.version, self.train_calls
        while True:
            if self.restarts >= self.cfg.max_restarts:
                raise LearnerFailed(f"learner ranks lost {self.restarts + 1} time(s), more than learner.max_restarts="
                                    f"{self.cfg.max_restarts}; the last: {why}")
            self.restarts += 1
            log.warning("memr2: %s; learner restart %d: new ranks from %s, %d update(s) replayed",
                        why, self.restarts, self.checkpoint[1] if self.checkpoint else "the initial model", len(self.journal))
            self.shutdown()
            try:
                self._start_ranks()
                if self.checkpoint:
                    self._wait([r.load_checkpoint.remote(*self.checkpoint) for r in self.ranks])
                for redo in self.journal:
                    redo()
                self._wait([r.set_version.remote(version) for r in self.ranks])
                break
            except LearnerLost as again:
                why = str(again)
        self.version, self.train_calls = version, calls

    def take_restarts(self) -> int:
        """Restarts since the last call (a metrics row's share)."""
        new, self._restarts_reported = self.restarts - self._restarts_reported, self.restarts
        return new

    def take_stale_groups(self) -> int:
        """Groups left out by prepare since the last call."""
        new, self.stale_groups = self.stale_groups, 0
        return new

    # ------------------------------------------------------------------ training

    def admit(self, tables: Sequence[pa.Table], max_staleness: int) -> list[pa.Table]:
        """The groups no row of which is more than `max_staleness` updates behind these weights;
        the others are left out (counted in stale_groups): no update sees an older sample."""
        fresh = [t for t in tables if t.num_rows and self.version - pc.min(t["policy_version"]).as_py() <= max_staleness]
        self.stale_groups += len(tables) - len(fresh)
        return fresh

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
        objective "sft" (the warm start) maximises the responses' token-mean log-likelihood.
        The shards stay in the object store until the next checkpoint: a restart replays them."""
        shards = [ray.put(s) for s in split_round_robin(batch, self.cfg.num_ranks)]
        n_mini = mini_batches_per_epoch(batch.num_rows, self.cfg.mini_batch)
        seed, version = self.seed * 1_000_003 + self.train_calls, self.version + 1

        def send() -> list[ray.ObjectRef]:
            return [r.train.remote(s, n_mini, seed, objective, version) for r, s in zip(self.ranks, shards)]

        results = self._on_ranks(send)
        self.journal.append(lambda: self._wait(send()))
        self.train_calls += 1
        self.version += 1
        metrics = dict(results[0])
        metrics["train_s_max"] = max(m["train_s"] for m in results)  # the slowest rank sets the pace
        metrics["groups"] = float(len(set(batch["group_id"].to_pylist())))
        lag = self.version - 1 - pc.min(batch["policy_version"]).as_py()  # updates since the oldest row
        metrics["policy_lag_max"] = float(lag)
        metrics["staleness_mean"] = self.version - 1 - pc.mean(batch["policy_version"]).as_py()  # per row
        metrics["policy_version"] = float(self.version)
        return metrics

    def offload_states(self) -> float:
        """Colocated: the GPU to the engines for the sync and rollouts (LearnerRank.offload_states,
        states to host where learner.offload_states resolved on); seconds."""
        return self._timed(lambda r: r.offload_states.remote(self.offload)) if self.colocation else 0.0

    def reload_states(self) -> float:
        """Colocated with offloaded states: back to the GPU for the update; seconds."""
        return self._timed(lambda r: r.reload_states.remote()) if self.colocation and self.offload else 0.0

    def _timed(self, call: Callable[[Any], ray.ObjectRef]) -> float:
        start = time.perf_counter()
        self._on_ranks(lambda: [call(r) for r in self.ranks])
        return time.perf_counter() - start

    def publish_weights(self) -> list:
        """The full weights put in the object store by rank 0 (every rank joins: ZeRO-3 gathers);
        returned wrapped in a list so the ref, not the weights, travels to the rollout workers."""
        return next(w for w in self._on_ranks(lambda: [r.put_state_dict.remote() for r in self.ranks]) if w is not None)

    # ------------------------------------------------------------------ collective weight sync
    # Not recovered here: a rank lost in a sync fails it, and learner.weight_sync recovers.

    def _gathering_ranks(self) -> list:
        """The ranks a full copy of the weights needs: all under ZeRO-3 (they gather), else rank 0."""
        return self.ranks if self.cfg.zero_stage == 3 else self.ranks[:1]

    def open_transfer_port(self) -> tuple[str, int, str]:
        """Rank 0's (ip, port, backend) for a new group; the port listens until the group forms."""
        return self._wait([self.ranks[0].open_transfer_port.remote()])[0]

    def init_weight_transfer(self, workers: list, address: tuple[str, int], dtype: str | None) -> int:
        """A new group of rank 0 and `workers` (engine i at rank 1 + i); bytes one sync sends."""
        return self._wait([r.init_weight_transfer.remote(workers, address, dtype) for r in self._gathering_ranks()])[0]

    def init_colocated_weight_transfer(self, workers: list, pairs: list[int], dtype: str | None) -> int:
        """Colocated: every rank exports its weights to the worker on its bundle (`workers[j]`
        beside rank `pairs[j]`), vLLM's ipc on GPU, shm on CPU; bytes one sync sends."""
        return self._wait([r.init_colocated_weight_transfer.remote(workers, dtype, pairs) for r in self.ranks])[0]

    def send_weights(self) -> list[ray.ObjectRef]:
        """Rank 0 broadcasts the current weights to its group (colocated: every rank exports its
        own, chunk by chunk, in step); refs to wait on."""
        ranks = self.ranks if self.colocation else self._gathering_ranks()
        return [r.send_weights.remote(self.version) for r in ranks]

    def weight_sources(self) -> list:
        """The ranks that make a full copy of the weights when a late worker asks the policy store
        (actors.fleet.policy_store): rank 0, or all under ZeRO-3 (they gather)."""
        return self._gathering_ranks()

    def close_weight_transfer(self) -> None:
        self._wait([r.close_weight_transfer.remote() for r in self.ranks])

    # ------------------------------------------------------------------ weights

    def logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Current policy's response logprobs on rank 0 (ranks hold identical weights)."""
        ranks = self.ranks if self.cfg.zero_stage == 3 else self.ranks[:1]  # a ZeRO-3 forward gathers: all join
        return self._on_ranks(lambda: [r.logprobs.remote(prompts, responses) for r in ranks])[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._on_ranks(lambda: [r.state_dict.remote() for r in self.ranks])[0]

    def rank_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Every rank's full weights (tests: data-parallel ranks must agree)."""
        return self._on_ranks(lambda: [r.state_dict.remote(on_every_rank=True) for r in self.ranks])

    def save_checkpoint(self, directory: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, our counters); every rank writes its
        partition, so across nodes `directory` must be on a shared file system. A restart
        starts from it from now on."""
        state = {"version": self.version, "train_calls": self.train_calls, "seed": self.seed}
        self._on_ranks(lambda: [r.save_checkpoint.remote(directory, tag, state) for r in self.ranks])
        self.checkpoint, self.journal = (directory, tag), []

    def checkpoint_bytes(self, weights_only: bool = False) -> int:
        """What one checkpoint writes, every rank's files together, or a model folder's weights
        (weights_only): a write that fails says what it needed."""
        parts = self._on_ranks(lambda: [r.checkpoint_bytes.remote() for r in self.ranks])
        return sum(w for w, _ in parts) + (0 if weights_only else sum(o for _, o in parts))

    def load_checkpoint(self, directory: str, tag: str, *, as_new_version: bool = False) -> None:
        """Weights, optimizer state, policy version and the shuffle counter of a saved run.

        as_new_version: going back to earlier weights within a run (a curriculum stage restarting
        from the best checkpoint) publishes them as the next version, with the counters running
        on: versions only grow, so no trajectory's version can name two different policies."""
        states = self._on_ranks(lambda: [r.load_checkpoint.remote(directory, tag) for r in self.ranks])
        if as_new_version:
            self.version += 1
            self.journal.append(lambda: self._wait([r.load_checkpoint.remote(directory, tag) for r in self.ranks]))
        else:
            self.version = int(states[0].get("version", 0))
            self.train_calls = int(states[0].get("train_calls", 0))
            self.checkpoint, self.journal = (directory, tag), []
        self._on_ranks(lambda: [r.set_version.remote(self.version) for r in self.ranks])

    def save_pretrained(self, directory: str) -> None:
        self._on_ranks(lambda: [r.save_pretrained.remote(directory) for r in self.ranks])

    def load_pretrained(self, directory: str) -> None:
        """The weights of a model folder (save_pretrained's) on every rank, with fresh optimizer
        state: a curriculum stage restarting from the best weights starts a new optimization.
        Published as the next version, the counters running on (see load_checkpoint)."""

        def send() -> list[ray.ObjectRef]:
            return [r.load_pretrained.remote(directory) for r in self.ranks]

        self._on_ranks(send)
        self.journal.append(lambda: self._wait(send()))
        self.version += 1
        self._on_ranks(lambda: [r.set_version.remote(self.version) for r in self.ranks])

    def shutdown(self) -> None:
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []
        if self.group is not None and not self.colocation:  # a shared group outlives the ranks
            remove_placement_group(self.group)
        self.group = None

    def __enter__(self) -> Learner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
