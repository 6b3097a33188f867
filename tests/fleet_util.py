"""Shared by the fleet fault tests: act on a worker once the fleet has given tasks of both kinds."""

import threading
import time

from actors.fleet.tasks import GlobalTask, LocalTask


def when_global_and_local_in_flight(fleet, act, timeout_s: float = 300.0) -> tuple[threading.Thread, dict]:
    """In a background thread: wait until a global and a local task are running, then call
    act(slot) on the worker running the global task. Returns the thread and what it saw."""
    seen: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = fleet.in_flight()
            kinds = {type(task) for _, task in running}
            if GlobalTask in kinds and LocalTask in kinds:
                slot, task = next((s, t) for s, t in running if isinstance(t, GlobalTask))
                seen.update(worker=slot.worker_id, pid=slot.info["pid"], node=slot.info["node"], task=task.task_id,
                            in_flight=sorted(t.task_id for _, t in running))
                act(slot)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, seen
