"""Weights from the learner to every rollout engine after each update (DESIGN §4).

collective: learner rank 0 and every live engine form one process group (world 1 + N, engine i
at rank 1 + i) and the weights go through vLLM's own weight-transfer engines, NCCL on GPU and gloo
on CPU (actors.engines.weight_transfer), streamed in packed buckets of learner.weight_bucket_mb
(learner.weight_transfer). The group is formed at the first sync, and again, on a new port, at a
sync whose live workers differ from its members (one joined, died, was replaced or retired since);
the old group is first torn down on every member still there.
object_store: rank 0 puts the full HF-named state dict in the Ray object store once; every live
worker loads it in place (vLLM's `reload_weights`).
auto: collective where it works (every engine is vLLM with the learner's backend, and reaches
rank 0's port), else object_store; decided again whenever the members change.
Colocated (cluster.colocate), collective has no process group: every rank exports its own weights
to the engine on its GPU through vLLM's ipc weight-transfer engine (shm on CPU), rank 0 driving.

Workers that start between syncs (a replacement, an autoscaled worker) pull the latest version
from the policy store (actors.fleet.policy_store). In collective mode the store holds no weights,
only the ranks that make a copy when a worker asks: no 15 GB gather and put at every 7B sync for
workers that may never join. A copy asked for during an update is made after it and says so
(LearnerRank.versioned_state_dict): the worker then holds, and stamps, that newer version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError

from actors.fleet.errors import one_line
from actors.fleet.fleet import RolloutFleet
from actors.fleet.slots import Slot
from common.config import Config
from learner.deepspeed_learner import Learner, LearnerLost

log = logging.getLogger("memr2.weight_sync")
PING_S = 10.0  # at a sync every worker is idle and answers in milliseconds


@dataclass
class TransferGroup:
    members: tuple[str, ...]  # worker ids; engine i is rank 1 + i
    handles: tuple  # their actor handles
    collective: bool  # False: auto found that these members cannot form one
    restarts: int = 0  # the learner's restarts when it formed: new ranks need a new group
    bytes: int = 0  # what one sync sends


def check_sync_mode(cfg: Config) -> None:
    """Fail here, before anything starts, when the mode cannot work with the configured engine."""
    if cfg.learner.weight_sync == "collective" and cfg.rollout.engine != "vllm":
        raise ValueError(f"learner.weight_sync=collective needs rollout.engine=vllm (vLLM's weight-transfer API), "
                         f"not {cfg.rollout.engine}; use auto or object_store")


def sync_weights(learner: Learner, fleet: RolloutFleet) -> float:
    """Push the learner's current weights to every live worker, stamped with its version; seconds."""
    start = time.perf_counter()
    slots = _live(fleet)
    try:
        collective = _collective_group(learner, slots)
        if collective:
            sends = learner.send_weights()
            ray.get(fleet.policy_store.publish.remote(learner.version, sources=learner.weight_sources()))
            ray.get(sends)
    except (RayError, LearnerLost) as err:
        _lost_member(learner, fleet, slots, err)
        collective = False
    if not collective:
        _through_object_store(learner, fleet)
    return time.perf_counter() - start


def _live(fleet: RolloutFleet) -> list[Slot]:
    """The live workers, less any that died since the fleet last heard from them (an idle worker's
    death goes unseen until it is sent something): a dead member must not reach a group."""
    dead = _dead(fleet.live())
    if dead:
        fleet.drop_workers(dead, "was found dead at a weight sync")
    return fleet.live()


def _dead(slots: list[Slot]) -> list[Slot]:
    """Workers whose actor has died (a ping each; one that does not answer in time counts as alive)."""
    pings = {s.handle.info.remote(): s for s in slots}
    answered, _ = ray.wait(list(pings), num_returns=len(pings), timeout=PING_S)
    dead = []
    for ref in answered:
        try:
            ray.get(ref)
        except RayActorError:
            dead.append(pings[ref])
    return dead


def _through_object_store(learner: Learner, fleet: RolloutFleet) -> None:
    wrapped = learner.publish_weights()
    ray.get(fleet.policy_store.publish.remote(learner.version, wrapped))  # first: workers starting now pull it
    fleet.load_weights(wrapped, learner.version)


def _collective_group(learner: Learner, slots: list[Slot]) -> bool:
    """Whether this sync goes through the group, (re-)formed here if the live workers changed."""
    if learner.cfg.weight_sync == "object_store" or not slots:
        return False
    ids = tuple(s.worker_id for s in slots)
    group = learner.transfer_group
    if group is not None and group.members == ids and group.restarts == learner.restarts:
        return group.collective
    _tear_down(learner)
    if learner.colocation:
        return _colocated_group(learner, slots, ids)
    ip, port, backend = learner.open_transfer_port()  # listens until the group forms
    problem = _why_not(slots, (ip, port), backend)
    if problem:
        learner.close_weight_transfer()
        if learner.cfg.weight_sync == "collective":
            raise ValueError(f"learner.weight_sync=collective: {problem}")
        log.warning("memr2: weights go through the object store: %s", problem)
        learner.transfer_group = TransferGroup(ids, (), collective=False, restarts=learner.restarts)
        return False
    group = learner.transfer_group = TransferGroup(ids, tuple(s.handle for s in slots), True, learner.restarts)
    group.bytes = learner.init_weight_transfer(list(group.handles), (ip, port), slots[0].info["weight_dtype"])
    return True


def _colocated_group(learner: Learner, slots: list[Slot], ids: tuple[str, ...]) -> bool:
    """Colocated: no process group; each rank hands its worker (on its bundle) handles to its own
    weights (vLLM's ipc on GPU, shm on CPU: actors.engines.shm_transfer)."""
    from actors.engines.weight_transfer import transfer_backend  # imports vLLM: not at the CLI's start

    backend = transfer_backend(colocated=True)
    other = [s.worker_id for s in slots if s.info.get("transfer_backend") != backend]
    if other:
        raise ValueError(f"cluster.colocate: worker(s) {', '.join(other)} cannot take {backend} weight transfers")
    group = learner.transfer_group = TransferGroup(ids, tuple(s.handle for s in slots), True, learner.restarts)
    group.bytes = learner.init_colocated_weight_transfer(list(group.handles), [s.bundle for s in slots], slots[0].info["weight_dtype"])
    return True


def _why_not(slots: list[Slot], address: tuple[str, int], backend: str) -> str | None:
    """What keeps these workers from one group with learner rank 0, if anything."""
    other = [f"{s.worker_id} ({s.info['engine']})" for s in slots if s.info.get("transfer_backend") != backend]
    if other:
        return f"worker(s) {', '.join(other)} cannot join the learner's {backend} weight-transfer group"
    reached = ray.get([s.handle.can_reach.remote(address) for s in slots])
    cut = [s.worker_id for s, ok in zip(slots, reached) if not ok]
    if cut:
        return f"worker(s) {', '.join(cut)} cannot reach learner rank 0 at {address[0]}:{address[1]}"
    return None


def _tear_down(learner: Learner) -> None:
    """Release the old group on rank 0 and on every member still there (a dead or retired one has
    nothing left to release)."""
    group, learner.transfer_group = learner.transfer_group, None
    learner.close_weight_transfer()
    for ref in [h.shutdown_weight_transfer_engine.remote() for h in group.handles] if group else []:
        try:
            ray.get(ref)
        except RayActorError:
            pass


def _lost_member(learner: Learner, fleet: RolloutFleet, slots: list[Slot], err: RayError | LearnerLost) -> None:
    """A collective sync failed. Unless a worker or a learner rank died, that is a bug: raised. A
    lost rank: the learner recovers (new ranks, same weights). If the group had started forming or
    sending, every member is dropped: the others may hold half-loaded weights or wait in a
    rendezvous or broadcast that will not finish. The fleet replaces them; this sync then goes
    through the object store, whose push drops any other dead worker, and the replacements pull
    this version from the policy store."""
    group, learner.transfer_group = learner.transfer_group, None
    recovered = isinstance(err, LearnerLost) or learner.lost_rank()
    if recovered:
        learner.recover(f"{err if isinstance(err, LearnerLost) else one_line(err)} (in a weight sync)")
    learner.close_weight_transfer()  # rank 0 lets go of the group: members blocked in it fail out
    if not (recovered or _dead(slots)):
        raise err
    if group is not None and group.collective:
        members = [s for s in slots if s.worker_id in group.members]
        fleet.drop_workers(members, f"left with a collective weight sync that lost a member ({one_line(err)})")
