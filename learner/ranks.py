"""One data-parallel learner rank: a DeepSpeed engine inside a Ray actor.

The driver (`learner.deepspeed_learner.Learner`) creates the ranks, rendezvouses them, and hands
each its shard of rows; the loss is learner.logo_grpo's.  Gradients: each micro-batch's loss is
its share of the mini-batch's pooled loss (weights from the pool's counts, summed over ranks),
times world_size because DeepSpeed averages gradients over data-parallel ranks, and backward runs
with scale_wrt_gas=False because the shares already add up to the mini-batch's loss.  The update is
therefore the exact pooled LoGo-GRPO gradient of the whole mini-batch, however it is split.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pyarrow as pa
import ray
import torch

from common.config import AlgoConfig, LearnerConfig
from learner import engine as eng
from learner.batching import Rows, balanced_split, plan_epoch, split_by_tokens
from learner.logo_grpo import logo_grpo_loss, mismatch, pool_weights
from learner.sft import sft_loss
from learner.logprobs import Packed, pack, packed_logprobs, response_logprobs
from learner.shared_prefix import SharedPacked, pack_shared, shared_logprobs
from learner.trunk import TrunkCache, TrunkTap, trunk_passes, upper_layers

# Metrics pooled per mini-batch (summed over micro-batches and ranks) and per-sample means.
POOLED = ("loss", "pg_loss", "kl", "entropy")
PER_SAMPLE = ("clip_frac", "dual_clip_frac", "cap_frac", "ratio_mean", "tis_weight_mean")
# Summed over the epochs: tokens computed with and without shared prefixes, and by the frozen
# trunk (once per step when cached); the engine/learner logprob gap on the first mini-batch,
# before any optimizer step (|d logp|, k3 KL, tokens).
TOKENS = ("computed_tokens", "unshared_tokens", "trunk_tokens")
MISMATCH = ("mismatch_abs_sum", "mismatch_k3_sum", "mismatch_tokens")


class LearnerRank:
    def __init__(self, rank: int, world_size: int, num_threads: int = 1) -> None:
        self.rank, self.world = rank, world_size
        torch.set_num_threads(max(1, num_threads))  # Ray sets OMP_NUM_THREADS=1 in actors
        eng.prepare_env()
        self.transfer = None  # this rank's part in a collective weight sync's group, once formed
        self.version = 0  # the policy version these weights are (the driver's count)
        self._probe: socket.socket | None = None

    # ------------------------------------------------------------------ set-up

    def address(self) -> tuple[str, int]:
        """This node's IP and a port free on it, for rank 0 to host the rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(self, master: tuple[str, int], model: str, algo: dict, learner: dict) -> float:
        """Join the process group and build the engine; returns seconds taken.

        `model` is resolved here, on this rank's node (a hub id into this node's HF cache, `tiny`
        built here): a folder the driver resolved may exist on the driver's node only."""
        from actors.engines.models import resolve_model

        start = time.perf_counter()
        self.algo, self.cfg = AlgoConfig(**algo), LearnerConfig(**learner)
        self.model_dir = model_dir = str(resolve_model(model))  # save_pretrained copies its tokenizer files
        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world),
            LOCAL_RANK="0",  # each actor sees only its own device (Ray sets CUDA_VISIBLE_DEVICES)
        )
        import deepspeed

        backend = eng.resolve_backend(self.cfg.backend)
        deepspeed.init_distributed(backend, auto_mpi_discovery=False, rank=self.rank, world_size=self.world)
        self.bf16 = eng.resolve_bf16(self.cfg.bf16)
        self.accum = eng.grad_accumulation(self.cfg, self.world)
        self.shared_prefix = eng.resolve_shared_prefix(self.cfg)
        self.engine = eng.build_engine(model_dir, self.cfg, self.world, self.bf16)
        self.ref = self.trunk = self.cache = None
        if self.algo.kl_beta > 0:
            self.ref = eng.build_reference(model_dir, self.cfg, self.world, self.engine.device, self.bf16)
            if self.cfg.frozen_layers > 0:  # the reference reads the policy's frozen trunk
                self.trunk = TrunkTap(self.engine.module, self.cfg.frozen_layers)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ training

    def train(self, shard: pa.Table, n_mini: int, seed: int, objective: str = "logo_grpo", version: int | None = None) -> dict[str, float]:
        """`ppo_epochs` epochs of `n_mini` optimizer steps over this rank's shard; the weights are
        then policy `version` (what a copy of them says it holds: versioned_state_dict)."""
        if objective not in ("logo_grpo", "sft"):
            raise ValueError(f"unknown objective {objective!r}")
        self.objective = objective
        self.sharing = self.shared_prefix and objective == "logo_grpo"  # warm-start examples share only instructions
        start = time.perf_counter()
        rows = Rows.from_table(shard)
        sums = dict.fromkeys(POOLED + PER_SAMPLE + TOKENS + MISMATCH + ("grad_norm",), 0.0)
        generator = torch.Generator().manual_seed(seed * 1009 + self.rank)
        together = rows.drawn_together(self.cfg.mini_batch_by)
        epochs = [plan_epoch(len(rows), n_mini, self.accum, generator, together) for _ in range(self.cfg.ppo_epochs)]
        try:
            if self.sharing and self.cfg.frozen_layers > 0:
                self.cache = self._trunk_cache(rows)
                sums["trunk_tokens"] += self.cache.computed_tokens
            if objective == "logo_grpo" and self.algo.off_policy in ("proximal", "decoupled"):
                rows.prox_logprobs = self._proximal(rows, epochs[0])
            for epoch, plan in enumerate(epochs):
                for k, micro_idx in enumerate(plan):
                    self._mini_batch(rows, micro_idx, sums, objective == "logo_grpo" and epoch == k == 0)  # before any update
        finally:
            self.cache = None  # the next step's trunk output differs: its rows differ
        steps = self.cfg.ppo_epochs * n_mini
        keys = POOLED + PER_SAMPLE + TOKENS + MISMATCH
        totals = self._all_reduce([sums[k] for k in keys] + [float(len(rows)), float(sum(len(r) for r in rows.responses))])
        total = dict(zip(keys, totals))
        metrics = {k: total[k] / steps for k in POOLED}
        seen = max(totals[-2] * self.cfg.ppo_epochs, 1.0)
        metrics |= {k: total[k] / seen for k in PER_SAMPLE}
        scored = max(total["mismatch_tokens"], 1.0)
        metrics |= {
            "prefix_token_ratio": total["computed_tokens"] / max(total["unshared_tokens"], 1.0),
            "trunk_token_ratio": total["trunk_tokens"] / max(total["unshared_tokens"], 1.0),
            "logp_mismatch": total["mismatch_abs_sum"] / scored,  # mean |engine - learner| per token
            "logp_mismatch_kl": total["mismatch_k3_sum"] / scored,  # k3 KL(engine || learner) per token
            "grad_norm": sums["grad_norm"] / steps,  # before clipping, averaged over steps
            "samples": totals[-2],
            "tokens": totals[-1],
            "steps": float(steps),
            "lr": self.engine.get_lr()[0],  # after the schedule's last step; learner.lr=None resolves by precision
            "train_s": time.perf_counter() - start,
        }
        if version is not None:
            self.version = version
        return metrics

    def _mini_batch(self, rows: Rows, micro_idx: list[list[int]], sums: dict[str, float], before_update: bool) -> None:
        """One optimizer step: `accum` backward passes (or as many as the token budget cuts the
        longest rank's rows into), then the update. `before_update`: no optimizer step yet, so
        the learner's logprobs are the engine's policy's, in the learner's numerics."""
        flat = [i for micro in micro_idx for i in micro]
        n_local = sum(rows.is_local[i] for i in flat)
        counts = self._all_reduce([float(len(flat) - n_local), float(n_local)])
        micro_idx = self._passes(rows, micro_idx)
        if self.cfg.max_tokens_per_micro_batch is not None:  # as many passes on every rank: the longest split sets the count
            passes = int(self._all_reduce([float(len(micro_idx))], op="max")[0])
            micro_idx += [[] for _ in range(passes - len(micro_idx))]
        for k, idx in enumerate(micro_idx):
            # The boundary is set by hand: under a token budget the number of passes varies.
            self.engine.set_gradient_accumulation_boundary(k == len(micro_idx) - 1)
            if idx:
                self._micro_batch(rows, idx, (int(counts[0]), int(counts[1])), sums, before_update)
            else:
                self._dummy_backward()
            self.engine.step()  # DeepSpeed only updates at the accumulation boundary
        norm = self.engine.get_global_grad_norm()
        sums["grad_norm"] += float(norm) if norm is not None else float("nan")

    def _passes(self, rows: Rows, micro_idx: list[list[int]]) -> list[list[int]]:
        """The backward passes of one mini-batch: its planned micro-batches, or as many cut where
        prompts change (learner.shared_prefix), or as many as the token budget needs."""
        flat = [i for micro in micro_idx for i in micro]
        if self.cfg.max_tokens_per_micro_batch is not None:
            return split_by_tokens(rows, flat, self.cfg.max_tokens_per_micro_batch, self.sharing)
        return balanced_split(rows, flat, len(micro_idx)) if self.sharing else micro_idx

    def _proximal(self, rows: Rows, plan: list[list[list[int]]]) -> list[list[float]]:
        """The proximal policy's logprobs (these weights, before the update), without gradient,
        in the first epoch's own passes: the anchor of algo.off_policy=proximal and decoupled.
        The same passes make the first mini-batch's ratio 1 (tested to 1e-6 in fp32)."""
        out: list[list[float]] = [[] for _ in range(len(rows))]
        with torch.no_grad():
            for micro_idx in plan:
                for idx in filter(None, self._passes(rows, micro_idx)):
                    lp, _, _ = self._forward(rows, idx, with_entropy=False)
                    for b, i in enumerate(idx):
                        out[i] = lp[b, : len(rows.responses[i])].float().tolist()
        return out

    def _trunk_cache(self, rows: Rows) -> TrunkCache:
        """The step's trunk output and reference logprobs (learner.trunk), in as many passes on
        every rank."""
        passes = trunk_passes(rows)
        if self.world > 1:  # ZeRO-3 gathers in every forward, the policy's or a sharded reference's
            most = int(self._all_reduce([float(len(passes))], op="max")[0])
            passes += [[] for _ in range(most - len(passes))]
        return TrunkCache.build(self.engine.module, self.ref, self.cfg.frozen_layers, rows, passes, self.engine.device)

    def _forward(self, rows: Rows, idx: list[int], with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, Packed | SharedPacked]:
        """Response logprobs [B, R] of rows `idx` (and entropy) under these weights, prompts shared
        or not; with the step's trunk cache, from the layers above the trunk only."""
        rows = rows.select(idx)
        if not self.sharing:
            packed = pack(rows.prompts, rows.responses).to(self.engine.device)
            return (*packed_logprobs(self.engine, packed, with_entropy), packed)
        packed = pack_shared(rows.prompts, rows.responses).to(self.engine.device)
        if self.cache is None:
            return (*shared_logprobs(self.engine, packed, with_entropy), packed)
        with upper_layers(self.engine.module, self.cfg.frozen_layers):
            return (*shared_logprobs(self.engine, packed, with_entropy, trunk=self.cache.inputs(idx, packed)), packed)

    def _micro_batch(self, all_rows: Rows, idx: list[int], counts: tuple[int, int], sums: dict[str, float], before_update: bool) -> None:
        with self._tapped():
            new, entropy, packed = self._forward(all_rows, idx, with_entropy=True)
        rows = all_rows.select(idx)
        score, mask = (shared_logprobs if self.sharing else packed_logprobs), packed.response_mask
        tokens = sum(len(p) + len(r) for p, r in zip(rows.prompts, rows.responses))
        sums["computed_tokens"] += packed.computed_tokens if self.sharing else tokens
        sums["unshared_tokens"] += tokens
        if self.cache is None:  # the trunk runs in this pass
            sums["trunk_tokens"] += packed.computed_tokens if self.sharing else tokens
        if self.algo.entropy_eta == 0:
            entropy = entropy.detach()  # still logged; no bonus, so no backward through it
        ref = None
        if self.cache is not None:
            ref = self.cache.reference_logprobs(idx, mask.shape[1])
        elif self.ref is not None:
            with torch.no_grad():
                ref, _ = score(self.ref, packed, trunk=self._trunk())
        device = new.device
        old = rows.old_logprobs_tensor(mask.shape[1]).to(device)
        if before_update:
            for k, v in zip(MISMATCH, mismatch(new.detach(), old, mask)):
                sums[k] += v
        adv = torch.tensor(rows.advantages, dtype=torch.float32, device=device)
        is_local = torch.tensor(rows.is_local, device=device)
        weights = pool_weights(is_local.cpu(), self.algo.local_weight, *counts).to(device)
        if self.objective == "sft":
            loss, m = sft_loss(new, mask, weights, entropy)
        else:
            prox = None if rows.prox_logprobs is None else rows.old_logprobs_tensor(mask.shape[1], proximal=True).to(device)
            loss, m = logo_grpo_loss(new, old, mask, adv, is_local, self.algo, ref, entropy, weights, prox)
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        sums["loss"] += float(loss.detach())
        for k in POOLED[1:]:
            sums[k] += m[k]
        for k in PER_SAMPLE:
            sums[k] += m[k] * len(rows)

    def _dummy_backward(self) -> None:
        """Zero gradient through the whole model, so an empty micro-batch still joins the reduction."""
        packed = pack([[0]], [[0]]).to(self.engine.device)
        if self.cache is not None:  # every rank's passes run the layers above the trunk only
            with upper_layers(self.engine.module, self.cfg.frozen_layers):
                logprobs, _ = packed_logprobs(self.engine, packed, trunk=self.cache.blank(2))
        else:
            with self._tapped():
                logprobs, _ = packed_logprobs(self.engine, packed)
            if self.ref is not None and hasattr(self.ref, "zero_optimization_stage"):
                with torch.no_grad():  # a sharded reference gathers in its forward: every rank joins
                    packed_logprobs(self.ref, packed, trunk=self._trunk())
        self.engine.backward(logprobs.sum() * 0.0, scale_wrt_gas=False)

    def _tapped(self) -> AbstractContextManager:
        """A policy forward whose trunk output the reference reads next (learner.trunk), unless
        the step's cache holds both."""
        return nullcontext() if self.trunk is None or self.cache is not None else self.trunk.kept()

    def _trunk(self) -> torch.Tensor | None:
        return None if self.trunk is None else self.trunk.take()

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        import deepspeed.comm as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    # ------------------------------------------------------------------ weights and checkpoints

    def logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Current policy's response logprobs and mask, on CPU (tests, weight-sync checks)."""
        with torch.no_grad():
            lp, mask, _ = response_logprobs(self.engine, prompts, responses)
        return lp.float().cpu(), mask.cpu()

    def state_dict(self, on_every_rank: bool = False) -> dict[str, torch.Tensor] | None:
        """Full HF-named CPU weights on rank 0 (every rank must call it: ZeRO-3 gathers)."""
        state = eng.full_state_dict(self.engine)
        return state if (self.rank == 0 or on_every_rank) else None

    def set_version(self, version: int) -> None:
        self.version = version

    def versioned_state_dict(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        """The full weights with the policy version they are, on rank 0 (every gathering rank
        calls it). Asked while an update runs, it runs after it: the version says so."""
        state = eng.full_state_dict(self.engine)
        return (self.version, state) if self.rank == 0 else None

    def put_state_dict(self) -> list | None:
        state = eng.full_state_dict(self.engine)
        return [ray.put(state)] if self.rank == 0 else None

    # ------------------------------------------------------------------ collective weight sync

    def open_transfer_port(self) -> tuple[str, int, str]:
        """Rank 0: this node's IP, a port it listens on until the group forms (the engines probe
        it: can they reach the learner?), and the backend this device sends with."""
        from actors.engines.weight_transfer import transfer_backend

        self._probe = socket.create_server(("", 0))
        return ray.util.get_node_ip_address(), self._probe.getsockname()[1], transfer_backend()

    def init_weight_transfer(self, workers: list, address: tuple[str, int], dtype: str | None) -> int:
        """Join a new group with `workers` (rank 0 hosts it); returns the bytes one sync sends."""
        from learner.weight_transfer import Transfer

        if self._probe is not None:
            self._probe.close()  # the group's store binds the port now
            self._probe = None
        bucket_mb = self.cfg.weight_bucket_mb or (1024 if torch.cuda.is_available() else 16)
        self.transfer = Transfer(self.engine, self.rank, workers, address, dtype, bucket_mb)
        return self.transfer.bytes()

    def init_colocated_weight_transfer(self, workers: list, dtype: str | None, pairs: list[int] | None = None) -> int:
        """Colocated: EVERY rank calls this, with the same `workers`, worker j sharing a device with
        rank `pairs[j]` (default j); vLLM's ipc backend on GPU, shm on CPU. Then every rank calls
        send_weights at each sync, and close_weight_transfer to leave. Returns one sync's bytes."""
        from learner.weight_transfer import ColocatedTransfer

        bucket_mb = self.cfg.weight_bucket_mb or (1024 if torch.cuda.is_available() else 16)
        self.transfer = ColocatedTransfer(self.engine, self.rank, workers, dtype, bucket_mb, pairs)
        return self.transfer.bytes()

    def send_weights(self, version: int) -> None:
        self.transfer.send(version)

    def close_weight_transfer(self) -> None:
        """Leave the group (or stop listening for one that was not formed)."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self.transfer is not None:
            self.transfer.shutdown()
            self.transfer = None

    def save_checkpoint(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state)

    def offload_states(self, offload: bool) -> None:
        """Colocated, after an update: give the awake engine the GPU memory the update used (the
        allocator's cache), and with `offload` the optimizer state and fp32 master weights too
        (DeepSpeed's own offload; on CPU a copy within host memory, the same calls). The bf16
        weights stay: the sync reads them."""
        import gc

        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as State

        if offload:
            self.engine.offload_states(include=[State.optim_states, State.hp_params], pin_memory=torch.cuda.is_available())
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def reload_states(self) -> None:
        self.engine.reload_states()

    def checkpoint_bytes(self) -> tuple[int, int]:
        """What this rank's part of a checkpoint holds: the weights (rank 0 writes them; they are
        also a model folder's size) and its optimizer partition (fp32 master copy, Adam moments)."""
        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        states = size(v for state in inner.state.values() for v in state.values())
        masters = size(getattr(optimizer, "single_partition_of_fp32_groups", []))
        return (size(self.engine.module.state_dict().values()) if self.rank == 0 else 0), states + masters

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        return client_state or {}

    def save_pretrained(self, directory: str) -> None:
        state = eng.full_state_dict(self.engine)
        if self.rank == 0:
            eng.save_hf(self.engine, state, directory, self.model_dir)

    def load_pretrained(self, directory: str) -> None:
        eng.load_pretrained(self.engine, directory)
