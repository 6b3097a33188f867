"""Snapshots cross Ray actors through the keeper and outlive the actor that took them."""

import os
import signal

import pytest

from common.types import Operation
from memory_service.bank import MemoryBank
from memory_service.snapshots import SnapshotKeeper, SnapshotNotFound

pytestmark = pytest.mark.slow


def test_a_snapshot_outlives_the_actor_that_took_it_and_restores_in_another(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Holder:
        def take(self, keeper, sid, contents):
            bank = MemoryBank.empty()
            for c in contents:
                bank = bank.apply(Operation("INSERT", speaker="Alice", content=c, dia_id="D1:1"))
            assert ray.get(keeper.publish.remote(sid, bank))
            return bank.as_dict(), os.getpid()

        def restore_and_extend(self, bank, content):
            before = bank.as_dict()
            after = bank.fork().apply(Operation("INSERT", speaker="Bob", content=content))
            return before, after.as_dict(), [m.id for m in after.retrieve(content, 1)]

    keeper = SnapshotKeeper.remote()  # owned by the driver, as the fleet's is
    anchor, other = Holder.remote(), Holder.remote()
    ready = keeper.wait.remote("step0/local/c/s2/anchor1")  # parks until the snapshot exists
    state, pid = ray.get(anchor.take.remote(keeper, "step0/local/c/s2/anchor1", ["Alice moved to Denver.", "Alice has a dog."]))
    os.kill(pid, signal.SIGKILL)  # the actor that took it is gone: its objects with it, not the snapshot
    ref = ray.get(ready, timeout=30)[0]
    before, after, hit = ray.get(other.restore_and_extend.remote(ref, "Bob sold his car."))
    assert before == state
    assert len(after) == 3 and after["2"]["content"] == "Bob sold his car." and hit == ["2"]
    # A task re-run after its worker died publishes the same id again: the first copy stays.
    assert ray.get(keeper.publish.remote("step0/local/c/s2/anchor1", MemoryBank.empty())) is False
    assert ray.get(other.restore_and_extend.remote(ray.get(keeper.lookup.remote("step0/local/c/s2/anchor1"))[0], "x"))[0] == state
    assert ray.get(keeper.release.remote("step0/")) == 1 and ray.get(keeper.size.remote()) == 0
    with pytest.raises(SnapshotNotFound, match="no snapshot with id 'step0/local/c/s2/anchor1'"):
        try:
            ray.get(keeper.lookup.remote("step0/local/c/s2/anchor1"))
        except ray.exceptions.RayTaskError as err:
            raise err.cause from None
    ray.kill(keeper)
