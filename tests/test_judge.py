"""The LLM judge behind J: verdict parsing, and a Judge against a real loopback OpenAI-compatible
server (tests/fake_openai.py) that plays a judge with a known rule."""

import re
import socket
import threading
import time

import pytest

from actors.agent.endpoint import EndpointDown, RequestCounts
from actors.eval.judge import JUDGE_PROMPT, Judge, Verdict, j_score, make_judge, parse_verdict
from common.config import JudgeConfig
from tests.fake_openai import FakeOpenAI

UNDECIDABLE = "What did Caroline paint last summer?"


@pytest.mark.parametrize("reply, label", [
    ('{"label": "CORRECT"}', "CORRECT"),
    ('The answer names the same city.\n{"label": "WRONG"}', "WRONG"),
    ('Same date, other format.\n```json\n{"label": "CORRECT"}\n```', "CORRECT"),
    ('{"label": "correct"}', "CORRECT"),
    ("{'label': 'wrong'}", "WRONG"),
    # The last labelled object wins, whatever the reasoning says before it.
    ('It looks wrong at first. {"label": "WRONG"} On reflection: {"label": "CORRECT"}', "CORRECT"),
    ('{"label": "PARTIAL"}', None),
    ("CORRECT", "CORRECT"),
    ("wrong.", "WRONG"),
    ("It is not WRONG, it is CORRECT", None),
    ("INCORRECT", None),  # whole words only: "INCORRECT" is neither label
    ("I cannot decide", None),
    ("", None),
    (None, None),
])
def test_parse_verdict(reply, label):
    assert parse_verdict(reply) == label


def _field(prompt: str, name: str) -> str:
    return re.search(rf"^{name}: (.*)$", prompt, re.MULTILINE).group(1)


def _fake_judge(prompt: str) -> str:
    """CORRECT iff the gold answer's text is in the prediction. One early item answers slowest, so
    replies arrive out of order and the test sees that verdicts keep the items' order."""
    question = _field(prompt, "Question")
    if question == UNDECIDABLE:
        return "I cannot decide"
    time.sleep(0.2 if question == ITEMS[1][0] else 0)
    correct = _field(prompt, "Gold answer").lower() in _field(prompt, "Generated answer").lower()
    return f'Compared the two.\n```json\n{{"label": "{"CORRECT" if correct else "WRONG"}"}}\n```'


ITEMS = [
    ("Where does Alice live?", "Denver", "She lives in Denver now"),
    ("Are they friends?", "Yes", "no"),
    ("When did Vera adopt Bandit?", "1 April, 2022", "on 1 April, 2022"),
    (UNDECIDABLE, "a lake", "a lake at sunset"),
    ("Who is Bandit?", "a dog", "a cat"),
    ("What is Alice's job?", "nurse", "Nurse at the city hospital"),
]


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not see loopback
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with FakeOpenAI(_fake_judge, models={"judge"}) as srv:
        yield srv


def _cfg(url: str, **kw) -> JudgeConfig:
    return JudgeConfig(**{"url": url, "model": "judge", "api_key_env": "JUDGE_TEST_KEY", "temperature": 0.0,
                          "max_tokens": 64, "concurrency": 3, "timeout_s": 10, **kw})


def test_judge_labels_items_in_order_and_j_counts_unparsable_as_not_correct(fake):
    judge = make_judge(_cfg(fake.url))
    verdicts = judge.judge(ITEMS)
    assert [v.label for v in verdicts] == ["CORRECT", "WRONG", "CORRECT", None, "WRONG", "CORRECT"]
    assert verdicts[3] == Verdict(None, "I cannot decide") and '"label"' in verdicts[0].reply
    assert j_score(verdicts) == 3 / 6 and judge.counts == RequestCounts()
    assert len(fake.requests) == len(ITEMS)
    prompts = [body["messages"][0]["content"] for body in fake.requests]
    for question, gold, prediction in ITEMS:
        (prompt,) = [p for p in prompts if _field(p, "Question") == question]
        assert prompt == JUDGE_PROMPT.format(question=question, gold=gold, prediction=prediction)
        assert f"Gold answer: {gold}\n" in prompt and f"Generated answer: {prediction}\n" in prompt
        assert "generous" in prompt and "same date or period" in prompt and "longer" in prompt
        assert '{"label": "CORRECT"} or {"label": "WRONG"}' in prompt
    for body in fake.requests:
        assert [m["role"] for m in body["messages"]] == ["user"]
        assert body["model"] == "judge" and body["temperature"] == 0.0 and body["max_tokens"] == 64


def _flaky_judge(fail_first: int):
    """A judge whose every question fails (500) its first `fail_first` attempts; attempts per question."""
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def reply(prompt: str) -> str:
        question = _field(prompt, "Question")
        with lock:
            attempts[question] = attempts.get(question, 0) + 1
            n = attempts[question]
        if n <= fail_first:
            raise RuntimeError("overloaded")  # the fake turns this into a 500: transient, retried
        return '{"label": "CORRECT"}'

    return reply, attempts


def test_a_failing_row_is_retried_and_counted_never_a_failed_verdict(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    reply, attempts = _flaky_judge(fail_first=2)
    with FakeOpenAI(reply) as srv:
        judge = Judge(_cfg(srv.url), backoff_s=0.01)
        verdicts = judge.judge(ITEMS[:3])
    assert verdicts == [Verdict("CORRECT", '{"label": "CORRECT"}')] * 3 and j_score(verdicts) == 1.0
    assert sorted(attempts.values()) == [3, 3, 3] and judge.counts == RequestCounts(retries=6, failures=3)


def test_a_judge_down_past_its_outage_timeout_stops_the_eval_in_one_line(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    reply, attempts = _flaky_judge(fail_first=10**9)
    with FakeOpenAI(reply) as srv:
        with pytest.raises(EndpointDown, match=r"^eval\.judge 'judge' at " + re.escape(srv.url) +
                           r": no answer for [\d.]+ s \(outage_timeout_s 0\.3\); last error: HTTP 500: .*overloaded.*$"):
            Judge(_cfg(srv.url, outage_timeout_s=0.3), backoff_s=0.01).judge(ITEMS)
    assert list(attempts) == [ITEMS[0][0]]  # the probe: no other row was sent
    with pytest.raises(ValueError, match="a failed request"):
        j_score([Verdict(None, None)])  # no J from a failed request


def test_unknown_model_raises_one_clear_error(fake):
    with pytest.raises(ValueError, match=r"'no-such-model'.*" + re.escape(fake.url)):
        Judge(_cfg(fake.url, model="no-such-model")).judge(ITEMS)
    assert len(fake.requests) == 1  # a 404 is not transient: one probe, no retries, no other rows


def test_unreachable_endpoint_raises(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound then closed: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(ValueError, match=re.escape(url) + r".*ConnectError"):
        Judge(_cfg(url, outage_timeout_s=0.3), backoff_s=0.01).judge(ITEMS[:2])


def test_no_url_no_judge_and_empty_inputs(fake):
    assert make_judge(JudgeConfig()) is None
    assert Judge(_cfg(fake.url)).judge([]) == [] and fake.requests == []
    assert j_score([]) is None
