"""cluster.colocate on CPU: learner rank i and rollout worker i in bundle i of one placement group.
Two steps of LoGo-GRPO colocated give the losses of the disaggregated run of the same seed, and
after each sync every engine holds the weights the disaggregated run's engines hold (bit for bit:
a fingerprint; test_weight_sync proves those the learner's, and the end of this test checks the
colocated learner's directly). A worker killed with SIGKILL comes back on its bundle. vLLM has no
sleep mode on CPU: the step's sleep and wake calls run and report it. The learner's states go to
host memory and back every step through DeepSpeed's own offload calls, as on GPU."""

import os
import signal

import pytest
import ray

from actors.fleet.ahead import RolloutsAhead
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from common.config import ConfigError, load_config
from common.data import load_dataset, split
from learner.deepspeed_learner import Learner
from learner.plan import resolve_offload_states
from learner.train import colocate, job_asks, train_step
from learner.weight_sync import sync_weights
from tests.tiny_world import WORLD

pytestmark = pytest.mark.slow
# The warm-started tiny model at temperature 1 (its groups carry signal, so steps update), two
# ranks and two workers in fractions of the 2-CPU test cluster.
SETTINGS = [*WORLD, "rollout.temperature=1.0", "rollout.n_global=4", "rollout.m_local=2", "rollout.max_new_tokens=192",
            "algo.local_prob=1.0", "learner.num_ranks=2", "rollout.num_actors=2", "learner.cpus_per_rank=0.5",
            "rollout.cpus_per_actor=0.5", "learner.mini_batch=8", "learner.micro_batch=2", "learner.lr=1e-5",
            "metrics.prometheus=false", "rollout.deterministic=true", "rollout.tasks_per_worker=1"]  # batches free of timing


def run_two_steps(cfg, check=None):
    """Two train steps; each step's loss and the engines' fingerprints after its sync."""
    colocation = colocate(cfg)
    learner = Learner(cfg.model.name, cfg.algo, cfg.learner, cfg.seed, colocation)
    learner.offload = resolve_offload_states(cfg, None) == "on"  # as train.run: colocated auto, unsized, is on
    learner.offload_states()
    fleet = RolloutFleet(cfg, colocation=colocation)
    conversations = split(load_dataset(cfg.data), cfg.data)["train"]
    out = []
    try:
        sync_weights(learner, fleet)
        for step in range(2):
            row = train_step(fleet, learner, RolloutsAhead(fleet, 0), plan_step(cfg, conversations, 2, step), None)
            prints = ray.get([s.handle.weight_fingerprint.remote() for s in sorted(fleet.live(), key=lambda s: s.worker_id)])
            out.append((row.get("loss"), row["sleep_s"], row["wake_s"], prints))
        if check:
            check(learner, fleet, colocation)
    finally:
        fleet.shutdown()
        learner.shutdown()
        if colocation:
            colocation.remove()
    return out


def test_colocated_steps_match_the_disaggregated_run_and_a_killed_worker_returns_to_its_bundle(ray_local, warm_tiny, tmp_path):
    def check(learner, fleet, colocation):
        nodes = colocation.nodes()
        assert sorted(s.bundle for s in fleet.live()) == [0, 1]
        assert all(s.info["node"] == nodes[s.bundle] for s in fleet.live())  # worker i beside rank i
        assert ray.util.placement_group_table(learner.group)["placement_group_id"] == colocation.group.id.hex()
        victim = next(s for s in fleet.live() if s.bundle == 1)
        os.kill(victim.info["pid"], signal.SIGKILL)
        conversations = split(load_dataset(cfg.data), cfg.data)["train"]
        row = train_step(fleet, learner, RolloutsAhead(fleet, 0), plan_step(cfg, conversations, 2, 2), None)
        assert row["worker_failures"] == 1
        fleet.await_target()
        back = next(s for s in fleet.live() if s.bundle == 1)
        assert back.worker_id != victim.worker_id and back.info["node"] == nodes[1]
        learner.save_pretrained(str(tmp_path / "learner"))
        held.extend(ray.get([s.handle.weight_fingerprint.remote() for s in fleet.live()]))

    cfg = load_config(None, [*SETTINGS, f"model.name={warm_tiny}", "cluster.colocate=true"])
    held = []
    colocated = run_two_steps(cfg, check)
    # The colocated learner's own weights, in a fresh engine (once its group has gone: it holds
    # every CPU here), give the fingerprint its workers held, the replacement's too.
    fresh = RolloutFleet(cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": str(tmp_path / "learner")}),
                                                "rollout": cfg.rollout.model_copy(update={"num_actors": 1}),
                                                "cluster": cfg.cluster.model_copy(update={"colocate": False})}))
    try:
        assert held == [ray.get(fresh.live()[0].handle.weight_fingerprint.remote())] * 2
    finally:
        fresh.shutdown()
    apart = run_two_steps(load_config(None, [*SETTINGS, f"model.name={warm_tiny}"]))
    for (loss, sleep_s, wake_s, prints), (loss_apart, *_, prints_apart) in zip(colocated, apart):
        assert loss is not None and loss == loss_apart
        assert prints[0] == prints[1] == prints_apart[0]
        assert sleep_s >= 0 and wake_s >= 0
    assert colocated[0][3] != colocated[1][3]  # the steps did change the weights


def test_colocated_asks_one_bundle_a_pair_and_refuses_an_autoscaled_fleet():
    cfg = load_config(None, ["cluster.colocate=true", "learner.num_ranks=2", "rollout.num_actors=2",
                             "learner.cpus_per_rank=1", "rollout.cpus_per_actor=1"])
    assert job_asks(cfg) == {"colocated rank + worker": [{"CPU": 2.0}, {"CPU": 2.0}]}
    with pytest.raises(ConfigError, match="fixed at learner.num_ranks"):
        load_config(None, ["cluster.colocate=true", "learner.num_ranks=2", "rollout.num_actors=3"])
    with pytest.raises(ConfigError, match="fixed at learner.num_ranks"):
        load_config(None, ["cluster.colocate=true", "learner.num_ranks=2", "rollout.num_actors=2", "cluster.autoscale_max_actors=4"])
