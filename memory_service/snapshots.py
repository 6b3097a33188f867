"""Snapshot ids: hold a bank state by name, restore it here or in another Ray actor.

Within a process a snapshot is just a reference to an immutable bank (O(1) to take and restore).
A snapshot is serialised only when another actor asks for it: `share()` puts it in the Ray object
store once and registers the object ref under its id with a named registry actor, so a local
rerollout can run on a different actor than its anchor rollout.
"""

from __future__ import annotations

import itertools
import uuid

import ray

from memory_service.bank import MemoryBank

REGISTRY_NAME = "memr2-snapshot-registry"


class SnapshotNotFound(KeyError):
    def __str__(self) -> str:
        return f"no snapshot with id {self.args[0]!r}"


@ray.remote(num_cpus=0)
class SnapshotRegistry:
    """Snapshot id -> object ref. Holding the ref keeps the object alive until `release`."""

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}

    def publish(self, snapshot_id: str, wrapped_ref: list) -> None:
        # The ref arrives wrapped in a list so Ray passes the ref itself, not the value behind it.
        self._refs[snapshot_id] = wrapped_ref[0]

    def lookup(self, snapshot_id: str) -> list | None:
        ref = self._refs.get(snapshot_id)
        return None if ref is None else [ref]

    def release(self, prefix: str) -> int:
        gone = [k for k in self._refs if k.startswith(prefix)]
        for k in gone:
            del self._refs[k]
        return len(gone)

    def size(self) -> int:
        return len(self._refs)


def snapshot_registry() -> ray.actor.ActorHandle:
    """The job's registry, created on first use. Its lifetime is its creator's: the driver creates
    it up front (see actors.fleet.fleet) so that it outlives any one rollout worker."""
    return SnapshotRegistry.options(name=REGISTRY_NAME, get_if_exists=True).remote()


class SnapshotStore:
    """Snapshots of this process by id; ids are unique across the cluster (a random namespace)."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace or uuid.uuid4().hex[:10]
        self._snapshots: dict[str, MemoryBank] = {}
        self._shared: set[str] = set()
        self._counter = itertools.count()
        self.forks = 0  # snapshots taken, for the rollout metrics

    def put(self, bank: MemoryBank) -> str:
        snapshot_id = f"{self.namespace}:{next(self._counter)}"
        self._snapshots[snapshot_id] = bank
        self.forks += 1
        return snapshot_id

    def get(self, snapshot_id: str) -> MemoryBank:
        """A fork of the snapshot: from this process if it is here, else from the registry."""
        bank = self._snapshots.get(snapshot_id)
        if bank is None:
            bank = self._fetch(snapshot_id)
            self._snapshots[snapshot_id] = bank
        return bank.fork()

    def share(self, snapshot_id: str) -> None:
        """Make the snapshot restorable from any actor of the Ray cluster (idempotent)."""
        if snapshot_id in self._shared:
            return
        if snapshot_id not in self._snapshots:
            raise SnapshotNotFound(snapshot_id)
        ref = ray.put(self._snapshots[snapshot_id])
        ray.get(snapshot_registry().publish.remote(snapshot_id, [ref]))
        self._shared.add(snapshot_id)

    def release_all(self) -> None:
        """Forget this store's snapshots here and in the registry (end of a training step)."""
        if self._shared and ray.is_initialized():
            ray.get(snapshot_registry().release.remote(f"{self.namespace}:"))
        self._snapshots.clear()
        self._shared.clear()

    def __len__(self) -> int:
        return len(self._snapshots)

    def _fetch(self, snapshot_id: str) -> MemoryBank:
        if not ray.is_initialized():
            raise SnapshotNotFound(snapshot_id)
        wrapped = ray.get(snapshot_registry().lookup.remote(snapshot_id))
        if wrapped is None:
            raise SnapshotNotFound(snapshot_id)
        return ray.get(wrapped[0])
