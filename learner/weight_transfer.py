"""The learner's side of a collective weight sync (learner.weight_sync; driver: learner.weight_sync).

Every learner rank holds a `Transfer` while a group exists. Rank 0 is the sender: vLLM's trainer
engine (its factory picks nccl or gloo, actors.engines.weight_transfer) streams the weights from
a `DeepSpeedSource` in packed buckets and drives the engines through a `FleetClient`. Under
ZeRO-3 the other ranks iterate the same source, in lockstep, only to join the gathers.

Colocated (learner rank i and rollout worker i on one device: `ColocatedTransfer`), vLLM's
`ipc` engine on GPU and our `shm` one on CPU (actors.engines.shm_transfer): EVERY rank exports
its own full copy (ZeRO-1/2 hold full weights on every rank; ZeRO-3 gathers on every rank),
packed into one reusable buffer per rank; the handles are all-gathered over the default
torch.distributed group, which in a learner rank is DeepSpeed's group of all the ranks
(`deepspeed.init_distributed` calls `torch.distributed.init_process_group`), and rank 0 ships
them through a `ColocatedFleetClient` to every worker, each of which maps its own rank's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import ray
import torch
from vllm.distributed.weight_transfer import ParamMeta, RayVLLMWeightSyncClient, WeightSource
from vllm.distributed.weight_transfer.base import WeightTransferInitRequest, layerwise_groups
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from actors.engines.weight_transfer import colocated_init_info, trainer_init_info, transfer_backend


class DeepSpeedSource(WeightSource):
    """The policy's parameters under their HF names (vLLM's `load_weights` maps them), in the
    engines' dtype: a bf16 engine gets bf16 bytes, half of an fp32 learner's, rounded as vLLM
    would round them on load. Tied weights appear once (named_parameters), as vLLM wants them.

    ZeRO-3 gathers one decoder layer at a time (vLLM's `layerwise_groups`): every rank must
    iterate, in the same order, and peak memory is one layer's full parameters plus a bucket."""

    def __init__(self, engine: Any, dtype: str | None) -> None:
        self.zero3 = engine.zero_optimization_stage() == 3
        params = dict(engine.module.named_parameters())
        order = [n for group in layerwise_groups(list(params)) for n in group]
        self.params = {n: params[n] for n in order}  # iteration and metadata() in one order
        self.dtype = getattr(torch, dtype) if dtype else None
        self._pass: Iterator | None = None

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, self.dtype or p.dtype, tuple(p.ds_shape if self.zero3 else p.shape))
                for n, p in self.params.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._pass = self._gathered()
        return self._pass

    def _gathered(self) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        for names in layerwise_groups(list(self.params)):
            params = [self.params[n] for n in names]
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if self.zero3 else nullcontext()
            with gather:
                for name, p in zip(names, params):
                    # A copy under ZeRO-3: the gathered storage is released when the layer's
                    # block ends, while vLLM may still hold the tensor for the current bucket.
                    yield name, p.detach().to(self.dtype or p.dtype, copy=self.zero3)

    def finish_gathers(self) -> None:
        """After a failed send: run the rest of this pass's gathers, which the other ZeRO-3 ranks
        are waiting in, so the ranks' collectives stay aligned for what follows."""
        if self.zero3 and self._pass is not None:
            for _ in self._pass:
                pass
        self._pass = None


class FleetClient(RayVLLMWeightSyncClient):
    """vLLM's Ray client over our rollout workers (actors.fleet.worker), with two changes.
    Each worker is its own vLLM instance, so worker i joins the group at rank offset 1 + i (vLLM's
    trainer engine sends one payload, for offset 1). And the finish carries the policy version,
    which every engine stamps on what it generates from then on."""

    def __init__(self, workers: list) -> None:
        super().__init__(list(workers))
        self.version = 0

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        ray.get([h.init_weight_transfer_engine.remote(WeightTransferInitRequest({**init_info, "rank_offset": 1 + i}))
                 for i, h in enumerate(self.handles)])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        ray.get([h.finish_weight_update.remote(self.version) for h in self.handles])


class Transfer:
    """One learner rank's part in a group with `workers` (rank 0 hosts it at `address`)."""

    def __init__(self, engine: Any, rank: int, workers: list, address: tuple[str, int], dtype: str | None,
                 bucket_mb: int) -> None:
        self.source, self.client = DeepSpeedSource(engine, dtype), FleetClient(workers)
        info = trainer_init_info(transfer_backend(), address, 1 + len(workers), bucket_mb << 20, rank)
        self.trainer = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=self.source)

    def bytes(self) -> int:
        return sum(m.dtype.itemsize * torch.Size(m.shape).numel() for m in self.source.metadata())

    def send(self, version: int) -> None:
        self.client.version = version
        try:
            self.trainer.send_weights()
        except BaseException:
            self.source.finish_gathers()
            raise

    def shutdown(self) -> None:
        self.trainer.shutdown()


class ColocatedFleetClient(FleetClient):
    """The FleetClient of a colocated group: no rank offsets (there is no process group with the
    engines); on CPU each worker learns the key of its pair (`colocated_key(r)`: the worker maps
    learner rank r's tensors), on GPU the engine finds its GPU's UUID itself (`keys` None)."""

    def __init__(self, workers: list, keys: list[str] | None = None) -> None:
        super().__init__(workers)
        if keys is not None and len(keys) != len(self.handles):
            raise ValueError(f"{len(self.handles)} workers but {len(keys)} device keys")
        self.keys = keys

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        keys = self.keys or [None] * len(self.handles)
        ray.get([h.init_weight_transfer_engine.remote(
                     WeightTransferInitRequest({**init_info, **({"device_key": k} if k is not None else {})}))
                 for h, k in zip(self.handles, keys)])


class ColocatedTransfer(Transfer):
    """One learner rank's part in a colocated sync. `workers[j]` shares a device with learner rank
    `pairs[j]` (default: rank j); the same lists on every rank. Every rank builds one and every
    rank calls `send` together (they all-gather the handles, chunk by chunk); rank 0 drives the
    workers. A rank whose worker is gone still exports: nothing maps it, and it is released after
    the sync. A worker without a rank of its own fails the sync (no handle for its key).

    The packed buffer is `bucket_mb`, raised to the largest tensor sent where that is larger
    (vLLM's IPC producer refuses a tensor over its buffer): on a 7B model the embedding alone is
    ~1 GB in bf16. `packed=False` (one handle per parameter) is vLLM's other mode: on GPU it
    shares the parameters themselves; on CPU it copies the whole model into /dev/shm for the
    sync, hence packed by default."""

    def __init__(self, engine: Any, rank: int, workers: list, dtype: str | None, bucket_mb: int,
                 pairs: list[int] | None = None, packed: bool = True) -> None:
        from actors.engines.shm_transfer import colocated_key

        backend = transfer_backend(colocated=True)  # ipc on GPU, shm (registered here) on CPU
        pairs = list(range(len(workers))) if pairs is None else list(pairs)
        if len(pairs) != len(workers) or len(set(pairs)) != len(pairs):
            raise ValueError(f"pairs {pairs} must name one distinct learner rank for each of {len(workers)} workers")
        # vLLM all-gathers the handles over the default group: it must be the learner's ranks (in a
        # LearnerRank, DeepSpeed's: deepspeed.init_distributed -> torch.distributed.init_process_group).
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        if (torch.distributed.get_rank() if grouped else 0) != rank:
            raise ValueError(f"learner rank {rank} is rank {torch.distributed.get_rank() if grouped else 'none'} of "
                             "the default torch.distributed group, which the colocated sync all-gathers over")
        self.source = DeepSpeedSource(engine, dtype)
        self.client = ColocatedFleetClient(workers, [colocated_key(p) for p in pairs] if backend == "shm" else None)
        largest = max((m.dtype.itemsize * torch.Size(m.shape).numel() for m in self.source.metadata()), default=1)
        info = colocated_init_info(backend, max(bucket_mb << 20, largest), rank, packed)
        self.trainer = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=self.source)
