"""The learner's side of a collective weight sync (learner.weight_sync; driver: learner.weight_sync).

Every learner rank holds a `Transfer` while a group exists. Rank 0 is the sender: vLLM's trainer
engine (its factory picks nccl or gloo, actors.engines.weight_transfer) streams the weights from
a `DeepSpeedSource` in packed buckets and drives the engines through a `FleetClient`. Under
ZeRO-3 the other ranks iterate the same source, in lockstep, only to join the gathers.
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

from actors.engines.weight_transfer import trainer_init_info, transfer_backend


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
