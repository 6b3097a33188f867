"""Snapshot ids cross Ray actors: one actor forks and shares, another restores the same state."""

import pytest

from common.types import Operation
from memory_service.bank import MemoryBank
from memory_service.snapshots import SnapshotStore, snapshot_registry

pytestmark = pytest.mark.slow


def test_a_snapshot_taken_in_one_actor_restores_in_another(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self):
            self.store = SnapshotStore()

        def build_and_share(self, contents):
            bank = MemoryBank.empty()
            for c in contents:
                bank = bank.apply(Operation("INSERT", speaker="Alice", content=c, dia_id="D1:1"))
            sid = self.store.put(bank)
            self.store.share(sid)
            return sid, bank.as_dict()

        def restore_and_extend(self, sid, content):
            bank = self.store.get(sid)
            before = bank.as_dict()
            after = bank.apply(Operation("INSERT", speaker="Bob", content=content))
            return before, after.as_dict(), [m.id for m in after.retrieve(content, 1)]

        def release(self):
            self.store.release_all()

    registry = snapshot_registry()  # owned (and kept alive) by the driver, as in actors.fleet.fleet
    anchor, other = Holder.remote(), Holder.remote()
    sid, state = ray.get(anchor.build_and_share.remote(["Alice moved to Denver.", "Alice has a dog."]))
    before, after, hit = ray.get(other.restore_and_extend.remote(sid, "Bob sold his car."))
    assert before == state
    assert len(after) == 3 and after["2"]["content"] == "Bob sold his car." and hit == ["2"]
    # The anchor's own state is untouched by the other actor's branch.
    before_again, _, _ = ray.get(anchor.restore_and_extend.remote(sid, "x"))
    assert before_again == state
    ray.get(anchor.release.remote())
    assert ray.get(registry.lookup.remote(sid)) is None
