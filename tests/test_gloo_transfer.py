"""The gloo weight-transfer backend (actors.engines.weight_transfer) without Ray or an engine: vLLM's
trainer engine sends a module's weights to two stub worker engines, in one process (threads stand in
for the processes), packed across many buckets and one by one; and check_sync_mode's one line."""

import socket
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from actors.rollout_job import smoke_config
from learner.weight_sync import check_sync_mode

transfer = pytest.importorskip("actors.engines.weight_transfer")


class StubModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.got: dict[str, torch.Tensor] = {}

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.got[name] = tensor.clone()


class Client:
    """vLLM's control plane over in-process worker engines, engine i at rank offset 1 + i."""

    def __init__(self, workers, pool) -> None:
        self.workers, self.pool = workers, pool

    def _each(self, calls) -> None:
        for future in [self.pool.submit(*call) for call in calls]:
            future.result()

    def init_weight_transfer_engine(self, info) -> None:
        self._each((w.init_transfer_engine, w.parse_init_info({**info, "rank_offset": 1 + i})) for i, w in enumerate(self.workers))

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, info) -> None:
        self._each((w.update_weights, info) for w in self.workers)

    def finish_weight_update(self, weight_version=None) -> None:
        pass


@pytest.mark.parametrize("packed", [True, False])
def test_gloo_backend_delivers_every_weight_exactly(packed):
    from vllm.distributed.weight_transfer import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    assert transfer.transfer_backend() == "gloo" and transfer.transfer_backend() == "gloo"  # registers once
    parallel = types.SimpleNamespace(parallel_config=types.SimpleNamespace(data_parallel_index=0, world_size=1, rank=0),
                                     model_config=None)
    workers = [transfer.GlooWeightTransferEngine(None, parallel, torch.device("cpu"), StubModel()) for _ in range(2)]
    source = torch.nn.Sequential(*(torch.nn.Linear(100, 100) for _ in range(3))).to(torch.bfloat16)  # 20 kB weights
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    info = transfer.trainer_init_info("gloo", ("127.0.0.1", port), 3, 30_000, rank=0)  # 30 kB: several buckets
    info.packed = packed
    # The backend's patches are process-wide and meant for one engine side per process; here three
    # sides share one, so they stay applied for the whole exchange.
    with transfer._on_gloo(), ThreadPoolExecutor(4) as pool:
        trainer = WeightTransferTrainerFactory.trainer_init(info, client=Client(workers, pool), source=ModuleSource(source))
        trainer.send_weights()
        trainer.shutdown()
        for w in workers:
            w.shutdown()
    for w in workers:
        assert w.model.got.keys() == dict(source.named_parameters()).keys()
        assert all(torch.equal(w.model.got[n], p.detach()) for n, p in source.named_parameters())


def test_collective_sync_needs_vllm_engines():
    check_sync_mode(smoke_config(None, ["learner.weight_sync=collective"]))
    with pytest.raises(ValueError, match=r"^learner.weight_sync=collective needs rollout.engine=vllm .*, not transformers; "):
        check_sync_mode(smoke_config(None, ["learner.weight_sync=collective", "rollout.engine=transformers"]))
