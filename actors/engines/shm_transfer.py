"""vLLM's `ipc` weight-transfer engines on a CPU: shared-memory handles instead of CUDA IPC ones.

A colocated learner rank and rollout engine (one placement-group bundle) cannot share an NCCL
group, so on GPU the weights go by vLLM's stock `ipc` backend: every trainer rank exports CUDA
IPC handles of its weights keyed by its GPU's UUID, rank 0 all-gathers them over the default
torch.distributed group and ships the merged handles through the client, and each engine maps
the tensors of its own GPU's UUID and loads them (packed: one reusable buffer per rank, shipped
chunk by chunk; unpacked: one handle per parameter).

A CPU has no CUDA IPC and no GPU UUID. The `shm` backend here is vLLM's IPC engines, subclassed,
with only these swapped, for the engines' own calls (`_on_shm`):

- the handle export (`reduce_tensor`) and rebuild (`rebuild_cuda_tensor`, and the packed
  consumer's `PackedBufferImporter.rebuild`): torch's own file-system shared memory
  (`UntypedStorage._share_filename_cpu_` / `_new_shared_filename_cpu`, the calls torch's
  `file_system` sharing strategy makes), which two unrelated processes of one node can open by
  name: a handle is (torch_shm_manager socket, /dev/shm name, size, dtype, shape, stride, -,
  storage offset), index 6 being the slot vLLM overwrites with the receiver's device index;
- the packed producer's buffer (`torch.empty(..., device="cuda")`): allocated in shared memory;
- the device identity (`torch.cuda.get_device_properties(i).uuid`): a key naming the colocated
  pair, `colocated_key(i)` for learner rank i and rollout worker i (the trainer's init info
  carries its own, each worker's init info its own);
- the CUDA calls a CPU torch raises on: device index, synchronize, the producer's stream sync;
  `torch.cuda.ipc_collect()` (vLLM's "release what the consumers are done with", after every
  chunk and after the finish) releases the copies the exporter made.

The packing, the handle all-gather, the per-chunk barriers, the refcounted buffer importer and
the layerwise reload into the model are vLLM's own code. The swaps are module-scoped (the
`torch` name inside vLLM's ipc_engine, packed_tensor and base modules), process-wide while a
call runs: one engine side per process at a time, as the gloo backend's.

Lifetime (no /dev/shm file outlives a sync): a shared file is refcounted by its mappings and
unlinked by the last one closed. The packed buffer is mapped by its producer for the send and by
the engine until `finish_weight_update`; an unpacked export copies the parameter into a fresh
shared tensor that the trainer holds until the post-send barrier, past the engines' finish. No
handle carries a reference of its own (torch's `reduce_storage` increfs one for its consumer),
so a handle no engine opens (a rank without a live worker) leaks nothing. A process killed while
it maps a file leaves that file until the producer exits (torch_shm_manager unlinks it then).
Both processes need one /tmp (the manager's socket) and one /dev/shm: one node, one container.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar
from unittest import mock

import torch
from vllm.distributed.weight_transfer import base, ipc_engine, packed_tensor
from vllm.distributed.weight_transfer.ipc_engine import (
    IPCTrainerInitInfo,
    IPCTrainerWeightTransferEngine,
    IPCWeightTransferEngine,
    IPCWeightTransferInitInfo,
)
from vllm.distributed.weight_transfer.packed_tensor import PackedBufferImporter

DEVICE_SLOT = 6  # vLLM overwrites args[6] (CUDA IPC's storage device) with the receiver's device index


def colocated_key(index: int) -> str:
    """The device identity of colocated pair `index`: learner rank i and rollout worker i."""
    return f"colocated-{index}"


# ---------------------------------------------------------------- handles


def shm_empty(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in a fresh /dev/shm file that another process can open by name."""
    storage = torch.UntypedStorage._new_using_filename_cpu(max(int(nbytes), 1))  # mmap refuses 0 bytes
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (int(nbytes),), (1,))


def export_tensor(tensor: torch.Tensor, hold: list[torch.Tensor] | None = None) -> tuple:
    """A handle to `tensor` in shared memory. A tensor already there (the packed buffer) is
    exported as it is: the receiver sees what is written to it later. Any other is copied into a
    fresh shared tensor, appended to `hold`: the caller keeps it until every receiver is done.
    Parameters are never moved into shared memory themselves."""
    if tensor.device.type != "cpu":
        raise ValueError(f"shared-memory handles are for CPU tensors, not {tensor.device}")
    if not tensor.numel():  # nothing to map: the receiver builds an empty tensor
        return (None, None, 0, _dtype_name(tensor.dtype), tuple(tensor.shape), tuple(tensor.stride()), None, 0)
    if not tensor.untyped_storage().is_shared():
        if hold is None:
            raise ValueError("an exported copy must be held by the caller until the receivers are done")
        src = tensor.detach()
        copy = shm_empty(src.numel() * src.element_size()).view(src.dtype).view(src.shape)
        copy.copy_(src)
        hold.append(copy)
        tensor = copy
    manager, name, nbytes = tensor.untyped_storage()._share_filename_cpu_()
    return (manager, name, nbytes, _dtype_name(tensor.dtype), tuple(tensor.shape), tuple(tensor.stride()), None,
            tensor.storage_offset())


def rebuild_tensor(manager: bytes | None, name: bytes | None, nbytes: int, dtype: str, shape: tuple, stride: tuple,
                   device: Any = None, offset: int = 0) -> torch.Tensor:
    """The exporter's tensor, mapped from its /dev/shm file (`device`: vLLM's slot, unused here)."""
    if name is None:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, name, nbytes)
    return torch.empty(0, dtype=getattr(torch, dtype)).set_(storage, offset, tuple(shape), tuple(stride))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ShmBufferImporter(PackedBufferImporter):
    """vLLM's one-slot cache of the packed buffer's mapping (one mapping per transfer, released at
    the finish or when the next transfer's buffer arrives), mapping shared memory."""

    def rebuild(self, list_args: list) -> torch.Tensor:
        key = tuple(list_args)
        if self._entry is not None and self._entry[0] == key:
            return self._entry[1]
        self._entry = None  # release the previous transfer's mapping first
        packed = rebuild_tensor(*list_args)
        self._entry = (key, packed)
        return packed


# ---------------------------------------------------------------- the swaps


class _NoStream:
    def synchronize(self) -> None:
        pass


class _TorchOnShm:
    """`torch` as vLLM's ipc/packed code sees it during a shm call: CUDA's device identity is the
    colocated pair's key, "cuda" memory is shared memory, and the syncs are no-ops (CPU work is
    done when the call returns). Everything else is torch."""

    def __init__(self, key: str | None, release) -> None:
        props = SimpleNamespace(uuid=key)
        self.cuda = SimpleNamespace(get_device_properties=lambda device=None: props,
                                    synchronize=lambda device=None: None,
                                    ipc_collect=release,
                                    current_stream=lambda device=None: _NoStream())
        self.accelerator = SimpleNamespace(current_device_index=lambda: -1, synchronize=lambda device=None: None)

    def empty(self, *size, device=None, dtype=None, **kwargs) -> torch.Tensor:
        if str(device) != "cuda":
            return torch.empty(*size, device=device, dtype=dtype, **kwargs)
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        dtype = dtype or torch.get_default_dtype()
        numel = 1
        for n in shape:
            numel *= n
        return shm_empty(numel * dtype.itemsize).view(dtype).view(shape)

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextmanager
def _on_shm(key: str | None, hold: list[torch.Tensor]) -> Iterator[None]:
    """Run vLLM's IPC engine code on shared memory (see the module's docstring)."""
    proxy = _TorchOnShm(key, hold.clear)

    def reduce(tensor: torch.Tensor):
        return rebuild_tensor, export_tensor(tensor, hold)

    with ExitStack() as stack:
        for module in (ipc_engine, packed_tensor, base):
            stack.enter_context(mock.patch.object(module, "torch", proxy))
        for module in (ipc_engine, packed_tensor):
            stack.enter_context(mock.patch.object(module, "reduce_tensor", reduce))
        stack.enter_context(mock.patch.object(ipc_engine, "rebuild_cuda_tensor", rebuild_tensor))
        yield


# ---------------------------------------------------------------- worker side


@dataclass
class ShmWeightTransferInitInfo(IPCWeightTransferInitInfo):
    """vLLM's IPC init info plus the key of this worker's colocated pair (`colocated_key(i)`)."""

    device_key: str | None = None


class ShmWeightTransferEngine(IPCWeightTransferEngine):
    """Worker side: vLLM's IPC engine, mapping the shared-memory tensors of its pair's key."""

    init_info_cls = ShmWeightTransferInitInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._packed_importer = ShmBufferImporter()
        self.device_key: str | None = None

    def init_transfer_engine(self, init_info: ShmWeightTransferInitInfo) -> None:
        if not init_info.device_key:
            raise ValueError("the shm weight-transfer engine needs the device_key of its colocated learner rank")
        super().init_transfer_engine(init_info)
        self.device_key = init_info.device_key

    def update_weights(self, update_info: dict) -> None:
        with _on_shm(self.device_key, []):
            super().update_weights(update_info)


# ---------------------------------------------------------------- trainer side


@dataclass
class ShmTrainerInitInfo(IPCTrainerInitInfo):
    """vLLM's IPC trainer init info; `device_key` defaults to `colocated_key(rank)`."""

    backend: ClassVar[str] = "shm"
    device_key: str | None = None


class ShmTrainerWeightTransferEngine(IPCTrainerWeightTransferEngine):
    """Trainer side: vLLM's IPC trainer engine, exporting shared-memory handles under its key."""

    init_info_cls = ShmTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: ShmTrainerInitInfo, *, client, source=None):
        key = init_info.device_key or colocated_key(init_info.rank)
        with _on_shm(key, []):  # __init__ reads the device's identity
            engine = super().trainer_init(init_info, client=client, source=source)
        engine._held = []  # the unpacked path's shared copies, until the engines are done
        return engine

    def send_weights(self) -> None:
        try:
            with _on_shm(self.gpu_uuid, self._held):
                super().send_weights()
        finally:
            self._held.clear()

    def shutdown(self) -> None:
        self._held.clear()
        super().shutdown()
