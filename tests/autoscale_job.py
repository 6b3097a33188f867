"""Run inside its own PID and network namespace by tests/test_fleet_autoscaling.py, against a head
started there with the Ray autoscaler's fake multi-node provider (real raylets per node): the
fleet starts at its minimum, grows on backlog as the autoscaler adds nodes, and shrinks when idle.
Prints one JSON object of what it saw."""

import itertools
import json
import sys
import time

import ray


def alive_worker_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)


def main(address: str) -> None:
    from actors.fleet.fleet import RolloutFleet
    from actors.fleet.tasks import plan_step
    from actors.rollout_job import smoke_config
    from common.data import load_dataset, split

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    cfg = smoke_config(None, [
        "rollout.max_new_tokens=24", "metrics.prometheus=false", "rollout.num_actors=1",
        "cluster.autoscale_min_actors=1", "cluster.autoscale_max_actors=2", "cluster.scale_down_delay_s=5",
        "data.synth.conversations=3", "cluster.placement_timeout_s=400",
    ])
    seen: dict = {"nodes_at_start": alive_worker_nodes()}
    start = time.monotonic()
    fleet = RolloutFleet(cfg)  # min = 1: waits for the autoscaler's first node
    seen |= {"first_worker_s": time.monotonic() - start, "workers_at_start": len(fleet.live()), "nodes_first": alive_worker_nodes()}
    # A new policy version before the fleet grows: workers that join later must carry it.
    from transformers import AutoModelForCausalLM

    from actors.engines.models import resolve_model

    state = AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).state_dict()
    wrapped = [ray.put({k: v.clone() for k, v in state.items()})]
    ray.get(fleet.policy_store.publish.remote(5, wrapped))
    fleet.load_weights(wrapped, 5)
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    steps: list[dict] = []
    # Backlog (3 global + up to 12 local tasks) asks for the second worker; its node and engine take
    # tens of seconds to start (longer on a busy machine), so steps go on until it serves or 300 s pass.
    deadline = time.monotonic() + 300
    for step in itertools.count():
        step_start = time.monotonic()
        batch = fleet.run(plan_step(cfg, conversations, cfg.rollout.horizon, step))
        workers = {s.worker_id: s.info for s in fleet.live()}
        steps.append({"step": step, "live": len(workers), "target": fleet.target, "nodes": alive_worker_nodes(),
                      "wall_s": round(time.monotonic() - step_start, 1), "slots": sorted(fleet.slots),
                      "ran_on": sorted(set(fleet.ran_on.values())), "versions": sorted(batch.policy_versions),
                      "worker_versions": sorted(i["policy_version"] for i in ray.get([s.handle.info.remote() for s in fleet.live()]))})
        grown = len(workers) == 2 and len(steps[-1]["ran_on"]) == 2
        if grown or time.monotonic() > deadline:
            break
    seen["steps"], seen["grown"] = steps, grown
    idle_start = time.monotonic()
    fleet.idle(15)  # nothing to do: after scale_down_delay_s the fleet drains to its minimum
    seen["workers_after_idle"] = len(fleet.live())
    deadline = time.monotonic() + 180
    while alive_worker_nodes() > 1 and time.monotonic() < deadline:  # the autoscaler removes the idle node
        time.sleep(2)
    seen |= {"nodes_after_idle": alive_worker_nodes(), "shrink_s": time.monotonic() - idle_start, "faults": fleet.status()}
    fleet.shutdown()
    print(json.dumps(seen))


if __name__ == "__main__":
    main(sys.argv[1])
