"""Snapshots that outlive the worker that took them.

Within a process a snapshot is a reference to an immutable bank (`MemoryBank.fork`, O(1)). A
snapshot that another actor needs (the anchor rollout's `M_{t-1}`, re-run by a local task on any
worker) is handed by value to the step's `SnapshotKeeper` the moment it exists. The keeper puts it
in the object store itself, so the object is owned by the keeper and stored on the keeper's node:
it survives the death of the worker process *and* the loss of the worker's node (an object a
worker `ray.put`s, even with `_owner=`, still lives in that node's store). The driver starts the
keeper on its own node, so it lives as long as the job.
"""

from __future__ import annotations

import asyncio

import ray

from memory_service.bank import MemoryBank


class SnapshotNotFound(KeyError):
    def __str__(self) -> str:
        return f"no snapshot with id {self.args[0]!r}"


@ray.remote(num_cpus=0)
class SnapshotKeeper:
    """Snapshot id -> object ref owned here. All methods are async: `wait` parks until `publish`."""

    def __init__(self) -> None:
        self._refs: dict[str, ray.ObjectRef] = {}
        self._published: dict[str, asyncio.Event] = {}

    async def publish(self, snapshot_id: str, bank: MemoryBank) -> bool:
        """Keep `bank` under `snapshot_id`. The first copy wins: a task re-run after its worker died
        publishes the same id again, and the local task may already be running from the first."""
        if snapshot_id in self._refs:
            return False
        self._refs[snapshot_id] = ray.put(bank)
        self._event(snapshot_id).set()
        return True

    async def wait(self, snapshot_id: str) -> list[ray.ObjectRef]:
        """The snapshot's ref, wrapped in a list so Ray hands over the ref, not the bank; returns
        once it is published (the driver holds this call's result as a readiness signal)."""
        await self._event(snapshot_id).wait()
        return [self._refs[snapshot_id]]

    async def lookup(self, snapshot_id: str) -> list[ray.ObjectRef]:
        ref = self._refs.get(snapshot_id)
        if ref is None:
            raise SnapshotNotFound(snapshot_id)
        return [ref]

    async def release(self, prefix: str) -> int:
        """Forget every snapshot whose id starts with `prefix` (the end of a step)."""
        gone = [k for k in self._refs if k.startswith(prefix)]
        for k in gone:
            del self._refs[k]
            self._published.pop(k, None)
        return len(gone)

    async def size(self) -> int:
        return len(self._refs)

    def _event(self, snapshot_id: str) -> asyncio.Event:
        return self._published.setdefault(snapshot_id, asyncio.Event())
