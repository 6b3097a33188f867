"""The answer agents: the built-in reader on hand-made banks, the OpenAI-compatible agent against a
real loopback HTTP server, the engine agent with a minimal in-test engine, and the factory."""

import pickle
import re
import threading

import pytest

from actors.agent.answer_agent import (
    NO_INFO,
    AnswerQuery,
    EngineAnswerAgent,
    OpenAIAnswerAgent,
    ReaderAgent,
    build_queries,
    make_answer_agent,
)
from actors.agent.endpoint import EndpointDown, RequestCounts
from actors.engines.base import Generation
from common.config import AnswerAgentConfig
from common.types import QA, MemoryItem, Operation
from memory_service.bank import MemoryBank
from tests.fake_openai import ErrorReply, FakeOpenAI

SPEAKERS = ("Alice", "Vera")


def bank_of(*facts: tuple[str, str], time: str = "1:00 pm on 8 May, 2023") -> MemoryBank:
    bank = MemoryBank.empty()
    for i, (speaker, content) in enumerate(facts):
        bank = bank.apply(Operation("INSERT", speaker=speaker, content=content, dia_id=f"D1:{i + 1}"), time)
    return bank


def read(bank: MemoryBank, question: str) -> str:
    return ReaderAgent().answer(build_queries(bank, [question], SPEAKERS, k=30))[0]


BASE = bank_of(
    ("Alice", "Alice lives in Boston."),
    ("Alice", "Alice works as a nurse."),
    ("Vera", "Vera adopted Bandit on 1 April, 2022."),
    ("Vera", "Vera lives in Lisbon."),
)


# -- retrieval -----------------------------------------------------------------------------------
def test_build_queries_retrieves_per_speaker_in_rank_order_and_accepts_qa():
    qa = QA("Where does Vera live?", "Lisbon", 4, ("D1:4",))
    (q,) = build_queries(BASE, [qa], SPEAKERS + ("Vera",), k=1)  # the repeated speaker is ignored
    assert q.question == "Where does Vera live?"
    assert list(q.memories) == ["Alice", "Vera"]
    assert [m.content for m in q.memories["Vera"]] == ["Vera lives in Lisbon."]
    assert all(m.speaker == "Alice" for m in q.memories["Alice"]) and len(q.memories["Alice"]) == 1


# -- the reader ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "question, answer",
    [
        ("Where does Alice live now?", "Boston"),
        ("Where does Vera live?", "Lisbon"),  # the subject's memory, though Alice's also says "live"
        ("When did Vera adopt Bandit?", "1 April, 2022"),  # inner punctuation kept, period dropped
        ("Does Alice still work as a nurse?", "Yes"),  # the memory only restates the question
        ("What car does Alice drive?", NO_INFO),  # only the name overlaps: nothing about cars
        ("What is the capital of Peru?", NO_INFO),
    ],
)
def test_reader_answers_exactly(question, answer):
    assert read(BASE, question) == answer


def test_reader_follows_updates_and_deletes_so_the_reward_tracks_memory_quality():
    moved = BASE.apply(Operation("UPDATE", memory_id="0", content="Alice lives in Denver since May."), "2 pm on 1 June, 2023")
    assert read(moved, "Where does Alice live now?") == "Denver"  # the date is not the place
    assert read(BASE, "Where does Alice live now?") == "Boston"  # the stale bank keeps the old value
    quit_job = BASE.apply(Operation("DELETE", memory_id="1"))
    assert read(quit_job, "Does Alice still work as a nurse?") == NO_INFO
    assert read(MemoryBank.empty(), "Where does Alice live now?") == NO_INFO


def test_reader_reads_relations_dates_endings_and_histories_as_an_llm_would():
    bank = bank_of(
        ("Alice", "Alice lived in Boston."),
        ("Alice", "Alice moved to Portland, Maine on 2 May, 2023."),
        ("Alice", "Alice started a new job as a paramedic on 3 May, 2023."),
        ("Vera", "Vera took up archery on 1 April, 2022."),
        ("Vera", "Vera sold the Honda Civic on 9 June, 2023."),
    )
    assert read(bank, "Where does Alice live now?") == "Portland, Maine"  # moved = lives; no date
    assert read(bank, "When did Alice move to Portland, Maine?") == "2 May, 2023"
    assert read(bank, "What is Alice's job now?") == "paramedic"  # job = works; aspect words dropped
    assert read(bank, "Is Vera still into archery?") == "Yes"
    assert read(bank, "Does Vera still drive the Honda Civic?") == "No"  # the memory says it ended
    assert read(bank, "Which cities has Alice lived in?") in ("Boston, Portland, Maine", "Portland, Maine, Boston")
    assert read(bank, "Who is Vera dating?") == NO_INFO


def test_reader_ties_go_to_the_latest_memory_then_the_higher_ranked_and_it_is_deterministic():
    def item(i, content, id_=None):
        return MemoryItem(str(i) if id_ is None else id_, "Alice", content, "", ())

    q = AnswerQuery("Which city did Alice visit?", {"Alice": [item(0, "Alice visited Rome."), item(1, "Alice visited Oslo.")], "Vera": []})
    assert ReaderAgent().answer([q, q]) == ["Oslo", "Oslo"]  # memory 1 came later
    swapped = AnswerQuery(q.question, {"Alice": list(reversed(q.memories["Alice"])), "Vera": []})
    assert ReaderAgent().answer([swapped]) == ["Oslo"]
    no_ids = AnswerQuery(q.question, {"Alice": [item(0, "Alice visited Rome.", "a"), item(1, "Alice visited Oslo.", "b")]})
    assert ReaderAgent().answer([no_ids]) == ["Rome"]  # no order known: retrieval rank decides
    # More shared terms beat rank: "favourite food" outranks the first memory's lone "Alice".
    food = AnswerQuery("What is Alice's favourite food?", {"Alice": [item(0, "Alice visited Rome."), item(1, "Alice's favourite food is sushi.")]})
    assert ReaderAgent().answer([food]) == ["sushi"]


# -- the OpenAI-compatible agent -----------------------------------------------------------------
class _Answerer:
    """The fake endpoint's reply, which depends on the request: the question's last word, then a
    line to be ignored. `mode` plays a server that is down, flaky (each question's first attempt
    fails) or refuses the request (400)."""

    def __init__(self) -> None:
        self.mode, self.attempts, self.lock = "ok", {}, threading.Lock()

    def __call__(self, prompt: str) -> str:
        question = prompt.split("Question:")[-1].split("\n")[0].strip()
        with self.lock:
            self.attempts[question] = self.attempts.get(question, 0) + 1
            first = self.attempts[question] == 1
        if self.mode == "down" or (self.mode == "flaky" and first):
            raise ErrorReply(500, "overloaded")
        if self.mode == "bad":
            raise ErrorReply(400, "bad request")
        return question.rstrip("?").split()[-1] + "\nbecause the memories say so"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy in the environment must not see loopback
    with FakeOpenAI(_Answerer(), models={"judge-model"}) as srv:
        yield srv


def _agent(srv, **kw):
    return OpenAIAnswerAgent(srv.url, "judge-model", api_key_env="ANSWER_TEST_KEY", temperature=0.0, max_new_tokens=32,
                             timeout=5, backoff=0.01, **kw)


def _queries(*questions):
    return build_queries(BASE, questions, SPEAKERS, k=30)


def test_openai_agent_sends_model_temperature_memories_and_returns_first_lines(server, monkeypatch):
    monkeypatch.setenv("ANSWER_TEST_KEY", "sk-loopback")
    agent = _agent(server)
    got = agent.answer(_queries("Where does Alice live?", "Who adopted Bandit?", "When did Vera adopt Bandit?"))
    assert got == ["live", "Bandit", "Bandit"] and agent.counts == RequestCounts()
    assert len(server.requests) == 3
    # Requests run concurrently, so find the one for the Bandit date question by its content.
    (headers, body), = [(h, b) for h, b in zip(server.headers, server.requests)
                        if "Question: When did Vera" in b["messages"][-1]["content"]]
    assert headers["authorization"] == "Bearer sk-loopback"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["max_tokens"] == 32
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    assert NO_INFO in system
    assert "Memories of Alice:" in user and "Memories of Vera:" in user
    assert "[1:00 pm on 8 May, 2023] Vera adopted Bandit on 1 April, 2022." in user
    # Shipped to a Ray actor (pickled) after use, the agent rebuilds its HTTP client and still works.
    clone = pickle.loads(pickle.dumps(agent))
    assert clone.answer(_queries("Who adopted Bandit?")) == ["Bandit"] and len(server.requests) == 4


def test_openai_agent_retries_transient_errors_and_counts_them_per_call(server, monkeypatch):
    monkeypatch.delenv("ANSWER_TEST_KEY", raising=False)
    server.reply.mode = "flaky"
    agent, counts = _agent(server), RequestCounts()
    assert agent.answer(_queries("Where does Alice live?", "Who adopted Bandit?"), counts) == ["live", "Bandit"]
    assert counts == agent.counts == RequestCounts(retries=2, failures=2) and sorted(server.reply.attempts.values()) == [2, 2]
    assert server.headers[0]["authorization"] == "Bearer EMPTY"  # vLLM servers accept any key
    other = RequestCounts()  # another caller of the same agent counts only its own requests
    assert agent.answer(_queries("Who adopted Bandit?"), other) == ["Bandit"] and other == RequestCounts()


def test_openai_agent_never_answers_for_a_failed_request(server):
    server.reply.mode = "down"  # 500s: retried until outage_timeout_s, then one line
    agent = _agent(server, outage_timeout_s=0.3)
    with pytest.raises(EndpointDown, match=r"^reward\.answer_agent 'judge-model' at http://127\.0\.0\.1:\d+/v1: no answer for 0\.\d s "
                                           r"\(outage_timeout_s 0\.3\); last error: HTTP 500: overloaded$"):
        agent.answer(_queries("Where does Alice live?"))
    assert server.reply.attempts["Where does Alice live?"] > 2
    server.reply.mode = "bad"  # a 400 is not transient: one attempt, and a config error
    with pytest.raises(EndpointDown, match=r"request refused \(HTTP 400: bad request\); a config error.*memory\.answer_top_k"):
        agent.answer(_queries("Who adopted Bandit?"))
    assert server.reply.attempts["Who adopted Bandit?"] == 1


def test_openai_agent_unreachable_endpoint_stops_with_the_connection_error(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with FakeOpenAI(_Answerer()) as srv:
        url = srv.url  # bound then closed: nothing listens there any more
    agent = OpenAIAnswerAgent(url, "m", timeout=2, outage_timeout_s=0.3, backoff=0.01)
    with pytest.raises(EndpointDown, match=re.escape(url) + r".*last error: ConnectError: .*Connection refused"):
        agent.answer(_queries("Where does Alice live?"))


# -- the engine agent ----------------------------------------------------------------------------
class TinyEngine:
    """Implements the Engine protocol just enough: prompts are kept, replies are canned."""

    name, policy_version = "tiny", 0

    def __init__(self):
        self.chats, self.specs = [], []

    def chat_prompt(self, system, user):
        self.chats.append((system, user))
        return [len(self.chats) - 1]

    def generate(self, prompts, spec):
        self.specs.append(spec)
        return [Generation([1], [-0.1], f"  Answer: reply {p[0]}  \nsecond line", "stop") for p in prompts]

    def load_weights(self, weights, version):
        raise AssertionError("the answer agent is frozen")


def test_engine_agent_prompts_with_memories_and_question_and_returns_the_first_line():
    engine = TinyEngine()
    agent = EngineAnswerAgent(engine)
    got = agent.answer(_queries("Where does Alice live?", "When did Vera adopt Bandit?"))
    assert got == ["reply 0", "reply 1"]
    assert len(engine.specs) == 1 and engine.specs[0].temperature == 0 and engine.specs[0].max_new_tokens == 64
    assert "- [1:00 pm on 8 May, 2023] Alice lives in Boston." in engine.chats[0][1]
    system, user = engine.chats[1]
    assert NO_INFO in system
    assert "- [1:00 pm on 8 May, 2023] Vera adopted Bandit on 1 April, 2022." in user
    assert "Memories of Alice:\n(none)" in user  # BM25 finds nothing of Alice's for this question
    assert user.rstrip().endswith("Question: When did Vera adopt Bandit?\nAnswer:")
    assert agent.answer([]) == [] and len(engine.specs) == 1  # no empty batch reaches the engine


# -- the factory ---------------------------------------------------------------------------------
def test_make_answer_agent_builds_what_the_config_names():
    assert isinstance(make_answer_agent(AnswerAgentConfig()), ReaderAgent)
    with pytest.raises(ValueError, match="needs an engine"):
        make_answer_agent(AnswerAgentConfig(kind="vllm", model="ckpt"))
    eng = make_answer_agent(AnswerAgentConfig(kind="vllm", model="ckpt", temperature=0.5, max_new_tokens=16), TinyEngine())
    assert isinstance(eng, EngineAnswerAgent) and eng.spec.temperature == 0.5 and eng.spec.max_new_tokens == 16
    oa = make_answer_agent(AnswerAgentConfig(kind="openai", url="http://127.0.0.1:1/v1", model="m", api_key_env="K",
                                             timeout_s=7, outage_timeout_s=90))
    assert isinstance(oa, OpenAIAnswerAgent) and (oa.url, oa.model, oa.api_key_env) == ("http://127.0.0.1:1/v1", "m", "K")
    assert (oa.timeout, oa.outage_timeout_s) == (7, 90) and AnswerAgentConfig().outage_timeout_s == 600
