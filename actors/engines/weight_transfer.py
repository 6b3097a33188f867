"""vLLM's weight-transfer engines on any device, for learner.weight_sync=collective (DESIGN §4).

(Colocated learner ranks and engines use the ipc/shm backends: `transfer_backend(colocated=True)`,
`colocated_init_info`, and actors.engines.shm_transfer.)

On GPU the stock `nccl` backend runs as vLLM ships it. A CPU has no NCCL, so `transfer_backend()`
registers a `gloo` backend with both of vLLM's factories (worker and trainer side): the NCCL
engines, subclassed, with only the communicator swapped for a gloo process group. Packing into
buckets, the metadata, the handshake and the layerwise reload into the model are vLLM's own code.

The registration must happen in the process that builds the vLLM worker: our engine runs
in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor "uni"), so that is the rollout actor,
before `LLM(...)` (actors.engines.vllm_engine); and the learner rank that sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar
from unittest import mock

import torch
from vllm.distributed.weight_transfer import nccl_common, packed_tensor
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
)

# A member that dies before the rendezvous, or mid-broadcast, fails the group's calls after this
# long instead of gloo's default 30 minutes; a bucket crosses a LAN in seconds.
GLOO_TIMEOUT = timedelta(minutes=5)
NUM_BUFFERS = 2  # vLLM's default: bucket k+1 is packed while bucket k is on the wire (GPU streams)


def transfer_backend(colocated: bool = False) -> str:
    """The backend for this process's device (registered on first call where it is ours).

    Learner rank 0 and separate engines (one group, a broadcast): nccl on GPU, else gloo.
    Colocated, learner rank i and engine i on one device (actors.engines.shm_transfer): vLLM's
    `ipc` on GPU (CUDA IPC handles), else `shm` (the same engines over shared-memory handles)."""
    if colocated:
        if torch.cuda.is_available():
            return "ipc"
        from actors.engines.shm_transfer import ShmTrainerWeightTransferEngine, ShmWeightTransferEngine

        _register("shm", ShmWeightTransferEngine, ShmTrainerWeightTransferEngine)
        return "shm"
    if torch.cuda.is_available():
        return "nccl"
    _register("gloo", GlooWeightTransferEngine, GlooTrainerWeightTransferEngine)
    return "gloo"


def _register(backend: str, worker_engine: type, trainer_engine: type) -> None:
    for factory, engine in ((WeightTransferEngineFactory, worker_engine), (WeightTransferTrainerFactory, trainer_engine)):
        if backend not in factory._registry:  # once per process; the factory refuses a second one
            factory.register_engine(backend, engine)


def trainer_init_info(backend: str, address: tuple[str, int], world_size: int, bucket_bytes: int,
                      rank: int) -> NCCLTrainerInitInfo:
    """What vLLM's trainer factory needs to build the sending side (`rank` 0 sends)."""
    cls = NCCLTrainerInitInfo if backend == "nccl" else GlooTrainerInitInfo
    return cls(master_address=address[0], master_port=address[1], world_size=world_size, packed=True,
               packed_buffer_size_bytes=bucket_bytes, packed_num_buffers=NUM_BUFFERS, rank=rank)


def colocated_init_info(backend: str, buffer_bytes: int, rank: int, packed: bool = True) -> IPCTrainerInitInfo:
    """What vLLM's trainer factory needs to build a colocated sending side (every rank exports,
    `rank` 0 ships): packed, through one reusable buffer of `buffer_bytes` per rank, which must
    hold the largest tensor sent (vLLM's IPC producer refuses a larger one)."""
    from actors.engines.shm_transfer import ShmTrainerInitInfo

    cls = IPCTrainerInitInfo if backend == "ipc" else ShmTrainerInitInfo
    return cls(packed=packed, packed_buffer_size_bytes=buffer_bytes, rank=rank)


class GlooCommunicator:
    """The part of vLLM's PyNcclCommunicator the NCCL engines use, over a stateless gloo group."""

    def __init__(self, host: str, port: int, rank: int, world_size: int) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.pg = stateless_init_torch_distributed_process_group(host, port, rank, world_size, backend="gloo",
                                                                 timeout=GLOO_TIMEOUT)

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        self.pg.broadcast(tensor, src).wait()  # synchronous on CPU: no stream to order against

    def destroy(self) -> None:
        self.pg.shutdown()


def open_group(backend: str, host: str, port: int, rank: int, world_size: int):
    """A communicator of the kind the backend uses (`broadcast(t, src)`), e.g. for a raw benchmark."""
    if backend == "gloo":
        return GlooCommunicator(host, port, rank, world_size)
    return nccl_common.stateless_init_process_group(host, port, rank, world_size, torch.cuda.current_device())


class _NoStream:
    """Stands in for the CUDA streams of vLLM's packed path: gloo on CPU completes each call."""

    def synchronize(self) -> None:
        pass


@contextmanager
def _on_gloo() -> Iterator[None]:
    """Run vLLM's NCCL engine code over gloo on a CPU torch.

    Its group constructor (`nccl_common.stateless_init_process_group`, used by the worker's and
    the trainer's rendezvous alike) builds a GlooCommunicator instead of a PyNcclCommunicator; and
    the calls a CPU torch raises on become no-ops: `torch.accelerator.current_device_index()`
    (asked for the device of the CUDA streams and of the NCCL communicator),
    `torch.accelerator.synchronize()`, the packed path's CUDA streams, and
    `torch.cuda.current_stream()` (the unpacked path). Scoped to the engine's own calls; the
    patches are process-wide, so two threads of one process must not run such calls at once (they
    do not: a rollout worker holds its engine exclusively for them, a learner rank runs one call).
    """
    def gloo_group(host, port, rank, world_size, device=None):
        return GlooCommunicator(host, port, rank, world_size)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(nccl_common, "stateless_init_process_group", gloo_group))
        stack.enter_context(mock.patch.object(torch.accelerator, "current_device_index", lambda: 0))
        stack.enter_context(mock.patch.object(torch.accelerator, "synchronize", lambda device=None: None))
        stack.enter_context(mock.patch.object(packed_tensor, "_get_streams", lambda device, n: (_NoStream(),) * n))
        stack.enter_context(mock.patch.object(torch.cuda, "current_stream", lambda device=None: None))
        yield


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """Worker side: vLLM's NCCL engine over gloo."""

    def init_transfer_engine(self, init_info) -> None:
        with _on_gloo():
            super().init_transfer_engine(init_info)

    def update_weights(self, update_info: dict) -> None:
        with _on_gloo():
            super().update_weights(update_info)


@dataclass
class GlooTrainerInitInfo(NCCLTrainerInitInfo):
    backend: ClassVar[str] = "gloo"


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """Trainer side: vLLM's NCCL trainer engine over gloo."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info, *, client, source=None):
        with _on_gloo():
            return super().trainer_init(init_info, client=client, source=source)

    def _broadcast(self, source, meta) -> None:
        with _on_gloo():
            super()._broadcast(source, meta)
