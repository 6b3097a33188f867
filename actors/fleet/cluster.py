"""Joining or starting the Ray cluster the job runs on."""

from __future__ import annotations

import json
import math
import os
import time

import ray

from actors.fleet.scaling import autoscale_bounds
from actors.fleet.slots import worker_resources
from common.config import ClusterConfig, Config

# Every actor runs offline (models come from folders or packages) and quietly.
ACTOR_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}


Asks = dict[str, list[dict[str, float]]]  # what, e.g. "rollout actor" -> one resource bundle per actor


def fleet_asks(cfg: Config) -> Asks:
    """The rollout fleet at its minimum size: what the cluster must hold for the job to start."""
    return {"rollout actor": [worker_resources(cfg)] * autoscale_bounds(cfg)[0]}


def init_ray(cfg: ClusterConfig, asks: Asks) -> None:
    """`address=None` starts a local cluster (a laptop, CI); "auto" or ray://... joins one
    (under `ray job submit` Ray sets RAY_ADDRESS and this joins the job's cluster). Then the
    cluster must be able to hold every actor the job `asks` for (`require_resources`).

    A local cluster gets at least the CPUs asked for: rollouts and updates alternate, so the
    rollout actors and learner ranks can all be placed at once on a small machine without
    competing for its cores."""
    if not ray.is_initialized():
        _start_or_join(cfg, sum(b.get("CPU", 0.0) for group in asks.values() for b in group))
    require_resources(asks, cfg.placement_timeout_s)


def _start_or_join(cfg: ClusterConfig, cpus_needed: float) -> None:
    local = cfg.address is None and not os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    try:
        _init(cfg, cpus_needed, local)
    except ConnectionError as err:  # cluster.address names no running cluster
        raise ValueError(f"cluster.address={cfg.address or os.environ.get('RAY_ADDRESS')}: no Ray cluster there "
                         f"({str(err).splitlines()[0]}); start one (`ray start --head`), submit with `ray job submit`, "
                         "or unset cluster.address for a local one") from None


def _init(cfg: ClusterConfig, cpus_needed: float, local: bool) -> None:
    ray.init(
        # "local", not None: None joins whatever cluster /tmp/ray/ray_current_cluster names (a
        # `ray start` or a `ray.cluster_utils.Cluster` of another process) and then refuses num_cpus.
        address="local" if local else cfg.address,
        num_cpus=(cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(cpus_needed))) if local else None,
        # A job joining a cluster brings its own runtime env (deploy/runtime_env.yaml); Ray
        # refuses to merge a second one into it.
        runtime_env={"env_vars": ACTOR_ENV} if local else None,
        include_dashboard=False if local else None,
        log_to_driver=cfg.log_to_driver,
        configure_logging=False,
    )


def require_resources(asks: Asks, timeout_s: float | None) -> None:
    """Stop with one line, instead of waiting forever, when the cluster cannot hold the job's actors.

    Ray queues an actor that no node can take until such a node joins, so a job asking for GPUs on
    a CPU cluster used to hang silently. Where the cluster's ceiling is known (`_ceiling`: no
    autoscaler, so its nodes are all it will have, or an autoscaler that published its node
    groups), a job that exceeds it stops at once. Otherwise every bundle of `asks` is reserved at
    once as a placement group, a probe that is released straight away. It may take up to
    `timeout_s` while an autoscaler adds nodes, unless the autoscaler (v2) reports the probe
    infeasible; None waits as Ray does.
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{k: v for k, v in b.items() if v > 0} for group in asks.values() for b in group]
    if timeout_s is None or not bundles:
        return
    _fail_if_never(asks, bundles, _ceiling())
    probe = placement_group(bundles, strategy="PACK")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if probe.wait(timeout_seconds=max(1, math.ceil(min(_POLL_S, left)))):  # whole seconds: Ray drops fractions
                return
            if left <= _POLL_S:
                break
            # Whether an autoscaler is there may only show once the monitor has reported (~5 s).
            _fail_if_never(asks, bundles, _ceiling())
            if _autoscaler_says_infeasible(probe.id.hex()):
                raise ValueError(_cannot_hold(asks, "and never will: its autoscaler reports it infeasible (more than its node types and max workers allow)"))
    finally:
        remove_placement_group(probe)
    raise ValueError(_cannot_hold(asks, f"after {timeout_s:g} s"))


_POLL_S = 2  # seconds between looks at the autoscaler while the probe waits


class _Ceiling:
    """All the cluster will ever hold: its nodes (and those an autoscaler may add) and the totals.
    `node` and `most` phrase the two limits for the one line a job over them fails with."""

    def __init__(self, nodes: list[dict[str, float]], total: dict[str, float], node: str, most: str):
        self.nodes, self.total, self.node, self.most = nodes, total, node, most


def _ceiling() -> _Ceiling | None:
    """What the cluster can ever hold, or None where an autoscaler may add nodes of unknown size.

    Known: an autoscaler's published node groups (its ClusterConfig in the GCS: node resources and
    max counts), or no autoscaler at all, where the live nodes are final. Never raises: a cluster
    it cannot read (Ray client, an older GCS) counts as unknown and the job waits as before."""
    try:
        nodes = [{k: float(v) for k, v in n["Resources"].items()} for n in ray.nodes() if n.get("Alive")]
        found = _autoscaler_groups()
        if found is not None:
            groups, cap = found
            total: dict[str, float] = {}
            for resources, count in groups:
                for k, v in resources.items():
                    total[k] = total.get(k, 0.0) + (math.inf if count < 0 else v * count)
            total = {k: min(v, cap.get(k, math.inf)) for k, v in total.items()}
            for k, v in _totals(nodes).items():
                total[k] = max(total.get(k, 0.0), v)
            return _Ceiling(nodes + [r for r, count in groups if count != 0], total,
                            "no node, now or of its autoscaler's node groups, has", "its autoscaler's node groups reach")
        if _no_autoscaler():
            return _Ceiling(nodes, _totals(nodes), "it has no autoscaler, and no node has", "it has no autoscaler, and has")
    except Exception:  # noqa: BLE001 - unknown is the safe answer: wait as before
        return None
    return None


def _totals(nodes: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for n in nodes:
        for k, v in n.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _autoscaler_groups() -> tuple[list[tuple[dict[str, float], int]], dict[str, float]] | None:
    """An autoscaler's node groups (resources, max count; -1: no limit) and its cluster-wide
    max_resources, where one published them (Ray's ClusterConfig in the GCS, which Ray Train and
    Ray Data read the same way)."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    groups = [({k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in config.node_group_configs]
    return groups, {k: float(v) for k, v in config.max_resources.items()}


def _no_autoscaler() -> bool:
    """True only where nothing will add nodes: a local cluster this process started without an
    autoscaling config, or a cluster whose monitor runs Ray's read-only provider (`ray start` by
    hand, `ray.cluster_utils.Cluster`): it names every node `node_<id>`. An autoscaler v2 is left
    to its own verdict (`_autoscaler_says_infeasible`)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    node = ray._private.worker._global_node
    if node is not None and node.head:  # ray.init() started it, in this process
        return not node._ray_params.autoscaling_config
    gcs = ray._private.worker.global_worker.gcs_client
    v2 = gcs.internal_kv_get(ray._raylet.GCS_AUTOSCALER_V2_ENABLED_KEY.encode(),
                             namespace=ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE.encode())
    if v2 == b"1":
        return False
    status = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = json.loads(status).get("autoscaler_report") if status else None
    mapping = (report or {}).get("node_type_mapping") or {}
    return bool(mapping) and all(kind == f"node_{node_id}" for node_id, kind in mapping.items())


def _autoscaler_says_infeasible(pg_id: str) -> bool:
    """Whether an autoscaler v2 has reported the placement group `pg_id` as one no node type it
    may launch can hold (its verdict counts the node types' resources and max workers)."""
    try:
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        gcs = ray._private.worker.global_worker.gcs_client
        reply = GetClusterStatusReply()
        reply.ParseFromString(gcs.get_cluster_status(timeout_s=5))
        return any(pg_id in gang.details for gang in reply.autoscaling_state.infeasible_gang_resource_requests)
    except Exception:  # noqa: BLE001 - no verdict: wait as before
        return False


def _fail_if_never(asks: Asks, bundles: list[dict[str, float]], ceiling: _Ceiling | None) -> None:
    """One line at once when a bundle is larger than every node (of every kind the autoscaler may
    add), or the bundles together exceed the cluster's total."""
    if ceiling is None:
        return
    reason = None
    for b in bundles:
        if any(all(node.get(k, 0.0) >= v for k, v in b.items()) for node in ceiling.nodes):
            continue
        # GPUs first: a CPU count is a node's size, a missing GPU the thing to fix.
        short = next((k for k, v in sorted(b.items(), key=lambda kv: kv[0] != "GPU")
                      if v > max((n.get(k, 0.0) for n in ceiling.nodes), default=0.0)), None)
        if short is not None:
            most = max((n.get(short, 0.0) for n in ceiling.nodes), default=0.0)
            reason = f"{ceiling.node} {b[short]:g} {short} (the most one has is {most:g})"
        else:
            reason = f"{ceiling.node} {_resources(b, b)} at once"
        break
    if reason is None:
        need = _totals(bundles)
        short = next((k for k, v in need.items() if v > ceiling.total.get(k, 0.0)), None)
        if short is None:
            return
        reason = f"{ceiling.most} {ceiling.total.get(short, 0.0):g} {short} of the {need[short]:g} asked in all"
    raise ValueError(_cannot_hold(asks, f"and never will: {reason}"))


def _cannot_hold(asks: Asks, why: str) -> str:
    keys = {k for group in asks.values() for b in group for k, v in b.items() if v > 0}
    wanted = " + ".join(f"{len(group)} {what}(s) of {_resources(group[0], keys)}" for what, group in asks.items() if group)
    return (f"the cluster cannot hold {wanted} (it has {_resources(ray.cluster_resources(), keys)}) {why}: lower rollout.num_actors / "
            "cpus_per_actor / gpus_per_actor / resources or learner.num_ranks / cpus_per_rank / gpus_per_rank / "
            "resources, or add nodes")


def _resources(bundle: dict[str, float], keys=()) -> str:
    """CPU and GPU always, then any custom resource in `keys`, in a fixed order."""
    names = ["CPU", "GPU", *sorted(k for k in keys if k not in ("CPU", "GPU"))]
    return ", ".join(f"{bundle.get(k, 0):g} {k}" for k in names)
