"""A learner rank lost mid-update is recovered inside the job (learner.deepspeed_learner.recover):
new ranks, the last checkpoint, the updates since it replayed, the interrupted one repeated. With
fp32 (bf16 off) the weights and the optimizer state then equal an undisturbed twin's, bit for bit.

The ranks that fail are a LearnerRank subclass put in `Learner.rank_class`: it kills its own
process with SIGKILL (as `kill -9` or the OOM killer would) or hangs, part-way through an update;
on a `ray.cluster_utils.Cluster`, a rank's node is removed while the update runs. And a checkpoint
write that fails as a full disk does leaves the previous checkpoint to resume from."""

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from actors.fleet.ahead import RolloutsAhead
from common.config import AlgoConfig, load_config
from learner.deepspeed_learner import Learner, LearnerFailed
from learner.ranks import LearnerRank
from learner.run_outputs import CheckpointWriteError, RunDir, TrainState
from learner.train import _checkpoint as checkpoint
from tests.test_learner import config, make_groups, model_dir  # noqa: F401 - model_dir: a fixture

pytestmark = pytest.mark.slow


def failing_rank(fail: str, mark: Path) -> type[LearnerRank]:
    """A rank class that fails once (the replacement trains on): "kill" and "hang", rank 1 in
    its second optimizer step of an update, leaving `mark`; "slow", every rank, once `mark`
    exists, touches `mark`.started and sleeps a second before each optimizer step. Defined here,
    so Ray ships the class by value to the actors, `mark` with it."""

    class FailingRank(LearnerRank):
        def _mini_batch(self, rows, micro_idx, sums, *rest):
            self._steps = getattr(self, "_steps", 0) + 1
            if fail == "slow" and mark.exists():
                mark.with_suffix(".started").touch()
                time.sleep(1.0)
            elif fail != "slow" and self.rank == 1 and self._steps == 2 and not mark.exists():
                mark.touch()
                if fail == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            return super()._mini_batch(rows, micro_idx, sums, *rest)

    return FailingRank


def learner_of(rank_class, model, **kw):
    cls = type(f"Learner{rank_class.__name__}", (Learner,), {"rank_class": rank_class})
    return cls(model, AlgoConfig(), config(**({"num_ranks": 2} | kw)), seed=1)


def run(lrn, batches, checkpoints, before_last=None):
    """Update on each batch, a checkpoint after the first: a loss in the last replays the second."""
    for i, tables in enumerate(batches):
        if i == len(batches) - 1 and before_last:
            before_last()
        lrn.train(tables)
        if i == 0:
            lrn.save_checkpoint(str(checkpoints), "first")
    lrn.save_checkpoint(str(checkpoints), "last")


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a DeepSpeed checkpoint's files (weights and optimizer state), by path."""
    out = {}

    def walk(prefix, value):
        if torch.is_tensor(value):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for f in sorted(folder.glob("*.pt")):
        walk(f.name, torch.load(f, map_location="cpu", weights_only=False))
    return out


def assert_same_checkpoint(a: Path, b: Path):
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 10
    assert any("optim" in k for k in ta)  # Adam's moments and the fp32 master weights are compared too
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture(scope="module")
def batches(ray_local, model_dir):  # noqa: F811
    with Learner(model_dir, AlgoConfig(), config(num_ranks=2), seed=1) as probe:
        return [make_groups(probe, seed=s)[0] for s in (11, 12, 13)]


@pytest.fixture(scope="module")
def undisturbed(batches, model_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("undisturbed")
    with Learner(model_dir, AlgoConfig(), config(num_ranks=2), seed=1) as lrn:
        run(lrn, batches, out)
        return out / "last", lrn.version


@pytest.mark.parametrize("fail", ["kill", "hang"])
def test_a_rank_killed_or_hung_mid_update_is_recovered_to_the_undisturbed_state(fail, batches, undisturbed, model_dir, tmp_path):  # noqa: F811
    ckpt = tmp_path / "ckpt"
    with learner_of(failing_rank(fail, tmp_path / "failed"), model_dir, timeout_s=30.0 if fail == "hang" else None) as lrn:
        run(lrn, batches, ckpt)
        assert (tmp_path / "failed").exists()  # rank 1 did fail, in the third update
        assert lrn.restarts == 1 and lrn.take_restarts() == 1 and lrn.take_restarts() == 0
        assert lrn.version == undisturbed[1]
        assert_same_checkpoint(ckpt / "last", undisturbed[0])


def test_more_losses_than_max_restarts_stop_in_one_line(batches, model_dir, tmp_path):  # noqa: F811
    with learner_of(failing_rank("kill", tmp_path / "failed"), model_dir, max_restarts=0) as lrn:
        with pytest.raises(LearnerFailed, match=r"learner.max_restarts=0; the last: a learner rank died") as err:
            lrn.train(batches[0])
        assert "\n" not in str(err.value)


def full_disk_rank(mark: Path) -> type[LearnerRank]:
    """Once `mark` exists, a checkpoint write leaves part of its files and fails as a full disk does."""

    class FullDiskRank(LearnerRank):
        def save_checkpoint(self, directory, tag, client_state):
            if not mark.exists():
                return super().save_checkpoint(directory, tag, client_state)
            (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
            (Path(directory) / tag / f"part_rank{self.rank}.pt").write_bytes(b"x" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / tag))

    return FullDiskRank


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_a_resume_continues_from_it(batches, model_dir, tmp_path):  # noqa: F811
    cfg = load_config(None, [f"metrics.run_dir={tmp_path}", "metrics.run_name=r", "metrics.prometheus=false"])
    out, mark = RunDir(cfg, "never"), tmp_path / "disk-full"
    with learner_of(full_disk_rank(mark), model_dir) as lrn:
        lrn.train(batches[0])
        state = TrainState(step=1)
        checkpoint(out, lrn, state, RolloutsAhead(None, 0))
        saved = lrn.state_dict()
        lrn.train(batches[1])
        state.step = 2
        mark.touch()
        with pytest.raises(CheckpointWriteError) as err:
            checkpoint(out, lrn, state, RolloutsAhead(None, 0))
        need = lrn.checkpoint_bytes()
    line = str(err.value)
    assert "\n" not in line and f"could not write {out.checkpoints / 'step2'}" in line
    assert "No space left on device" in line and f"it needs {need / 1e9:.3f} GB" in line and need > 4 * 10**6
    assert "continues from step 1" in line
    assert not (out.checkpoints / "step2").exists()  # the partial files are gone
    resumed = RunDir(cfg, "auto")  # what `memr2 train --resume auto` does first
    state = resumed.load_state()
    assert resumed.resumed and state.step == 1 and state.checkpoint == "step1"
    with Learner(model_dir, AlgoConfig(), config(num_ranks=2), seed=1) as again:
        again.load_checkpoint(str(resumed.checkpoints), state.checkpoint)
        assert again.version == 1
        assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.items())


@pytest.fixture
def cluster(tmp_path):
    if ray.is_initialized():
        ray.shutdown()  # the other tests' local cluster; tests/conftest.py starts it again after
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # One rank a node (PACK cannot put two bundles asking `rank: 1` on one), and a spare node.
    nodes = [c.add_node(num_cpus=1, resources={"rank": 1}) for _ in range(3)]
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def test_a_rank_whose_node_is_removed_is_recovered_on_another_node(cluster, batches, undisturbed, model_dir, tmp_path):  # noqa: F811
    c, nodes = cluster
    mark, ckpt = tmp_path / "go", tmp_path / "ckpt"
    with learner_of(failing_rank("slow", mark), model_dir, resources={"rank": 1.0}, cpus_per_rank=1) as lrn:
        on = ray.util.placement_group_table(lrn.group)["bundles_to_node_id"]
        doomed = next(n for n in nodes if n.node_id == on[1])

        def remove_when_updating():
            while not mark.with_suffix(".started").exists():
                time.sleep(0.05)
            c.remove_node(doomed, allow_graceful=False)

        remover = threading.Thread(target=remove_when_updating, daemon=True)
        run(lrn, batches, ckpt, before_last=lambda: (mark.touch(), remover.start()))
        remover.join(timeout=60)
        assert lrn.restarts == 1
        now = set(ray.util.placement_group_table(lrn.group)["bundles_to_node_id"].values())
        assert doomed.node_id not in now and len(now) == 2
        assert_same_checkpoint(ckpt / "last", undisturbed[0])

