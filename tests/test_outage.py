"""An answer agent / judge endpoint that fails is never scored as a wrong answer: through a
fault-injecting proxy (tests/flaky_proxy.py) in front of the loopback fake (tests/fake_openai.py),
an outage window (503s, then refused connections, then requests that hang past the client's
timeout) changes no answer, reward or verdict and is counted; an endpoint down past
outage_timeout_s, or refusing a request for good, stops with one line naming url, model and the
last error; the start probe (`check_endpoint`) names what is wrong."""

import re
import time

import pytest

from actors.agent.answer_agent import OpenAIAnswerAgent
from actors.agent.endpoint import EndpointDown, RequestCounts, check_endpoint
from actors.agent.episode import EpisodeRunner
from actors.agent.groups import GroupCollector
from actors.eval.judge import Judge
from common.config import JudgeConfig
from memr2.cli import main
from tests.fake_openai import FakeOpenAI
from tests.fakes import ScriptedEngine
from tests.flaky_proxy import FlakyProxy
from tests.test_answer_agent import _Answerer, _queries
from tests.test_episode import cfg, conversation, respond  # noqa: F401 - cfg is a fixture
from tests.test_judge import ITEMS, _fake_judge

MODEL = "judge-model"
OUTAGE = [("503", 1.0), ("refuse", 1.0), ("hang", 1.5)]  # every kind of failure, 3.5 s in all
QUESTIONS = ("Where does Alice live?", "Who adopted Bandit?", "When did Vera adopt Bandit?", "What is Alice's job?",
             "Where does Vera live?", "Does Alice work?")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not see loopback


def _agent(url: str, **kw) -> OpenAIAnswerAgent:
    kw = {"timeout": 0.5, "outage_timeout_s": 30, "backoff": 0.05, "max_backoff": 0.25, "concurrency": 3, **kw}
    return OpenAIAnswerAgent(url, MODEL, **kw)


def _memory_reply(prompt: str) -> str:
    """An answer that depends on the memories: the first remembered line (or "none")."""
    lines = [ln for ln in prompt.splitlines() if ln.startswith("- ")]
    return lines[0][2:] if lines else "none"


def test_an_outage_window_changes_no_answer_and_every_retry_is_counted():
    with FakeOpenAI(_Answerer(), models={MODEL}) as srv:
        calm = _agent(srv.url).answer(_queries(*QUESTIONS))
        with FlakyProxy(srv.url, OUTAGE, trigger=3) as proxy:
            agent, counts = _agent(proxy.url), RequestCounts()
            start = time.monotonic()
            disturbed = agent.answer(_queries(*QUESTIONS), counts)
            took = time.monotonic() - start
    assert disturbed == calm == ["live", "Bandit", "Bandit", "job", "live", "work"]
    assert proxy.over() and {"503", "refuse", "hang"} <= proxy.modes_seen
    assert took >= 3.0  # the work waited out the outage
    # Requests 3.. met the outage: each was re-sent until it passed, each counted once as failing.
    assert counts == agent.counts and counts.failures >= 1 and counts.retries >= proxy.faulted >= counts.failures


def test_an_outage_mid_rollout_leaves_every_reward_as_an_undisturbed_run_has_it(cfg):  # noqa: F811
    def rollout(url: str):
        collector = GroupCollector(EpisodeRunner(ScriptedEngine(respond), cfg), _agent(url), cfg)
        result = collector.run_global(conversation(), horizon=2, n=3, key="step0/global/c1")
        return [g.rewards for g in result.groups], [s.f1 for s in result.final_scores], result.stats

    with FakeOpenAI(_memory_reply, models={MODEL}) as srv:
        calm_rewards, calm_f1, calm_stats = rollout(srv.url)
        with FlakyProxy(srv.url, [("503", 0.5), ("refuse", 0.5), ("hang", 1.0)], trigger=2) as proxy:
            rewards, f1, stats = rollout(proxy.url)
    assert proxy.faulted > 0 and (calm_stats.answer_retries, calm_stats.answer_failures) == (0, 0)
    assert rewards == calm_rewards and f1 == calm_f1 and max(f1) > 0  # the answers read the memories
    assert stats.answer_retries >= stats.answer_failures >= 1


def test_an_endpoint_down_past_the_outage_timeout_stops_in_one_line():
    with FakeOpenAI(_Answerer(), models={MODEL}) as srv:
        for phase, last_error in (("503", r"HTTP 503: .*Service Unavailable"), ("hang", "request timed out"),
                                  ("refuse", r"ConnectError: .*Connection refused")):
            with FlakyProxy(srv.url, [(phase, 1e9)]) as proxy:
                agent = _agent(proxy.url, outage_timeout_s=1.0, concurrency=2)
                start = time.monotonic()
                with pytest.raises(EndpointDown) as err:
                    agent.answer(_queries(*QUESTIONS))
                took = time.monotonic() - start
            msg = str(err.value)
            assert re.fullmatch(rf"reward\.answer_agent '{MODEL}' at {re.escape(proxy.url)}: no answer for [\d.]+ s "
                                rf"\(outage_timeout_s 1\); last error: {last_error}.*", msg), msg
            assert "\n" not in msg and isinstance(err.value, ValueError)
            # The first request down for good stops the call: the queued ones are never sent.
            assert took < 3.0, (phase, took)


def test_a_request_refused_for_good_stops_at_once():
    with FakeOpenAI(_Answerer(), models={MODEL}) as srv:
        agent = OpenAIAnswerAgent(srv.url, "no-such-model", outage_timeout_s=30, concurrency=1)
        with pytest.raises(EndpointDown, match=r"'no-such-model' at .*: request refused \(HTTP 404: The model `no-such-model` does not exist\.\)$"):
            agent.answer(_queries(*QUESTIONS))
        assert len(srv.requests) == 1  # no retry, and no other question sent


def test_the_judge_waits_out_an_outage_with_the_same_verdicts_and_stops_past_its_timeout():
    cfg = {"model": "judge", "temperature": 0.0, "max_tokens": 64, "concurrency": 3, "timeout_s": 0.5, "outage_timeout_s": 30}
    with FakeOpenAI(_fake_judge, models={"judge"}) as srv:
        calm = Judge(JudgeConfig(url=srv.url, **cfg)).judge(ITEMS)
        with FlakyProxy(srv.url, OUTAGE, trigger=2) as proxy:
            judge = Judge(JudgeConfig(url=proxy.url, **cfg), backoff_s=0.05, max_backoff_s=0.25)
            assert judge.judge(ITEMS) == calm
        assert proxy.over() and judge.counts.failures >= 1 and judge.counts.retries >= proxy.faulted
        with FlakyProxy(srv.url, [("503", 1e9)], trigger=3) as proxy:  # the probe passes, the rest do not
            judge = Judge(JudgeConfig(url=proxy.url, **{**cfg, "outage_timeout_s": 1.0}), backoff_s=0.05, max_backoff_s=0.25)
            with pytest.raises(EndpointDown, match=rf"^eval\.judge 'judge' at {re.escape(proxy.url)}: no answer for .*HTTP 503"):
                judge.judge(ITEMS)


def test_check_endpoint_names_what_does_not_answer_or_is_not_served():
    with FakeOpenAI(_Answerer(), models={"a", "b"}) as srv:
        assert check_endpoint(srv.url, "b", "eval.judge") == ["a", "b"]
        with pytest.raises(EndpointDown, match=rf"^reward\.answer_agent\.url {re.escape(srv.url)} serves \['a', 'b'\], not 'x' "):
            check_endpoint(srv.url, "x", "reward.answer_agent")
        with pytest.raises(EndpointDown, match=r"GET /models: HTTP 404"):
            check_endpoint(srv.url.removesuffix("/v1"), "a", "eval.judge")  # the base URL without /v1
        url = srv.url
    start = time.monotonic()
    with pytest.raises(EndpointDown, match=rf"^eval\.judge\.url {re.escape(url)}: no answer \(ConnectError: .*Connection refused\)$"):
        check_endpoint(url, "a", "eval.judge", pause_s=0.1)
    assert time.monotonic() - start < 5



def test_memr2_eval_probes_its_endpoints_before_any_rollout(capsys):
    with FakeOpenAI(_Answerer(), models={"judge"}) as srv:
        base = ["eval", "--policy", "tiny", "data.source=synthetic", "eval.split=all", f"eval.judge.url={srv.url}"]
        assert main([*base, "eval.judge.model=gpt-x"]) == 2
        assert capsys.readouterr().err.strip() == f"memr2: error: eval.judge.url {srv.url} serves ['judge'], not 'gpt-x' (eval.judge.model)"
        assert main([*base, "eval.judge.model=judge", "reward.answer_agent.kind=openai", f"reward.answer_agent.url={srv.url}/x",
                     "reward.answer_agent.model=judge"]) == 2
        assert capsys.readouterr().err.strip().startswith(f"memr2: error: reward.answer_agent.url {srv.url}/x: GET /models: HTTP 404")
        assert srv.requests == []  # nothing was rolled out or judged
