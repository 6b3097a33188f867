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


def disturbed_step(fleet, plan, act) -> tuple:
    """Run `plan` undisturbed, then again with `act` applied to the global task's worker once a
    global and a local task are in flight. Asserts what every fault must keep: the same group
    ids, each once. Returns the step's faults and what was hit."""
    calm = fleet.run(plan)
    assert fleet.take_faults() == {"worker_failures": 0, "tasks_retried": 0, "duplicate_results": 0}
    thread, seen = when_global_and_local_in_flight(fleet, act)
    disturbed = fleet.run(plan)
    thread.join()
    assert seen, "never saw a global and a local task in flight"
    assert sorted(disturbed.group_ids) == sorted(calm.group_ids)
    assert len(disturbed.group_ids) == len(set(disturbed.group_ids)) == calm.global_groups + calm.local_groups
    assert (disturbed.global_groups, disturbed.local_groups) == (calm.global_groups, calm.local_groups)
    return fleet.take_faults(), seen
