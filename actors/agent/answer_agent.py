"""The frozen answer agent (DESIGN §1): answers questions from a final memory bank.

Retrieval is shared by every agent (`build_queries`: top-k memories per speaker for the question);
answering is pluggable behind one batched protocol, `AnswerAgent.answer(queries) -> list[str]`:

- `ReaderAgent`: a deterministic, model-free reader for CPU runs and tests;
- `EngineAnswerAgent`: an LLM behind our `Engine` interface (e.g. a vLLM engine with its own model);
- `OpenAIAnswerAgent`: any OpenAI-compatible HTTP endpoint (a vLLM server, a hosted API).

The two LLM agents share one prompt (`answer_prompt`) and one reply parser (`first_line`), so
swapping the serving path never changes what the model is asked.

An endpoint that fails is never scored as a wrong answer (actors.agent.endpoint, shared with the
judge): a transient error (refused, timeout, 408/409/429, 5xx) is retried with capped exponential backoff
while the work waits, up to `reward.answer_agent.outage_timeout_s` from the request's first
failure; past it, or at once for a request refused for good (400, 401, 404), `EndpointDown` (a
ValueError, one line: url, model, last error) stops the run. Retries are counted per caller
(`RequestCounts`: answer_retries / answer_failures in every step's metrics). `check_endpoint` is
the start probe: the url answers GET /models and serves the model.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from actors.agent.endpoint import RequestCounts, check_endpoint, run_all, send_until_up
from actors.engines.base import Engine, SamplingSpec
from common.config import AnswerAgentConfig
from common.text import STOPWORDS, index_terms, stem
from common.types import QA, MemoryItem
from memory_service.bank import MemoryBank

log = logging.getLogger(__name__)

NO_INFO = "No information available"  # also what LoCoMo's category-5 scoring looks for


@dataclass(frozen=True, slots=True)
class AnswerQuery:
    question: str
    memories: dict[str, list[MemoryItem]]  # speaker -> retrieved memories, best first


class AnswerAgent(Protocol):
    def answer(self, queries: Sequence[AnswerQuery], counts: RequestCounts | None = None) -> list[str]:
        """One answer per query, in order; an endpoint's retries are added to `counts`. Never an
        empty answer for a failed request: it raises (EndpointDown) instead."""
        ...


def build_queries(bank: MemoryBank, questions: Sequence[str | QA], speakers: Sequence[str], k: int) -> list[AnswerQuery]:
    """Retrieve the top-k memories of each speaker for each question (k = memory.answer_top_k)."""
    speakers = list(dict.fromkeys(speakers))  # a repeated speaker would duplicate its memories
    out = []
    for q in questions:
        text = q.question if isinstance(q, QA) else q
        out.append(AnswerQuery(text, {s: bank.retrieve(text, k, speaker=s) for s in speakers}))
    return out


# -- the built-in reader -------------------------------------------------------------------------

_WORD_SPAN = re.compile(r"[^\W_]+(?:['’.-][^\W_]+)*")  # words, keeping "1.5", "ice-cream", "Alice's"
_YES_NO = frozenset("is are was were do does did has have had can could will would should".split())
_MONTH = "January|February|March|April|May|June|July|August|September|October|November|December"
# A date with the preposition that introduces it: "on 1 April, 2022", "since May", "in 2021".
_DATE = re.compile(rf"(?:\b(?:on|since|in|from)\s+)?(?:\b\d{{1,2}}\s+)?\b(?:{_MONTH})\b(?:\s+\d{{1,2}}\b)?(?:,?\s+\d{{4}}\b)?"
                   rf"|(?:\b(?:on|since|in|from)\s+)?\b\d{{4}}\b", re.IGNORECASE)
# A question in the perfect ("Which cities has Alice lived in?") asks for every value, not the latest.
_HISTORY = re.compile(r"^\s*(?:which|what|who)\b.*\b(?:has|have)\b", re.IGNORECASE)


def _stems(words: str) -> frozenset[str]:
    return frozenset(stem(w) for w in words.split())


# Words a question and a memory use for the same relation ("Where does Alice live?" / "Alice moved
# to Denver"), as any reader of English would take them; each maps to its group's first stem.
_SAME_RELATION = {s: group[0] for group in (("live", *_stems("lives lived moved based relocated city cities home")),
                                            ("job", *_stems("jobs work works worked career")),
                                            ("car", *_stems("cars drive drives owned"))) for s in group}
# Words that say a fact stopped being true: such a memory answers a yes/no question with "No".
_ENDED = _stems("quit sold stopped gave broke died rehomed left ended")
# Words of aspect, not content: "Alice started a new job as a nurse" answers "nurse".
_ASPECT = _stems("started start new now got took up currently")


def _terms(text: str) -> set[str]:
    # index_terms splits "Alice's" into "alic" + "s"; one-letter leftovers would make every
    # possessive question overlap every possessive memory, so only digits may be one character.
    return {_SAME_RELATION.get(t, t) for t in index_terms(text) if len(t) > 1 or t.isdigit()}


class ReaderAgent:
    """A deterministic extractive reader: no model, so its answers are only as good as the memory.

    It stands in on CPU for the paper's LLM answer agent, so it reads the way such a model would,
    with rules instead of weights. Per query:
      1. The question's terms are its stemmed, stop-word-free terms (`common.text.index_terms`),
         with words for one relation taken as one term (live / moved / based, job / works, car /
         drives). Terms of the speakers' names are split off: a name alone says who, not what, so
         a memory that shares only the name with the question does not count as relevant.
      2. Every retrieved memory (all speakers) is ranked by: how many of the question's name
         terms it carries (in its text or as its speaker), so a question about Alice is answered
         from Alice's memories; then how many distinct non-name question terms it contains; then
         recency (the later memory is the latest word on its subject, as the session times an
         LLM sees tell it); then its retrieval rank; then its speaker's order in `memories`.
      3. If the best memory shares no non-name term with the question, the subject has no
         relevant memory: the answer is "No information available".
      4. A yes/no question is answered "No" if the memory says the fact ended (quit, sold,
         stopped, ...) and "Yes" otherwise.
      5. A "when" question is answered with the memory's date ("1 April, 2022"). Any other is
         answered with what the memory adds to the question: its content without its dates,
         without the words the question already says (names included), without stop words and
         words of aspect (started, new, now, ...), in the original order and casing; adjacent
         surviving words keep the text between them. "Alice moved to Denver on 2 May, 2023."
         answers "Where does Alice live now?" with "Denver". If nothing survives, the whole content.
      6. A question in the perfect ("Which cities has Alice lived in?") is answered from every
         memory tied for best, joined by commas, as LoCoMo's multi-hop answers are.

    Why this serves as a reward: an UPDATEd memory yields the new value and a stale one the old;
    a DELETEd fact yields "No information available" (half-credit F1 against a gold "No") where a
    stale bank yields "Yes"; a missing fact yields no answer; a memory that keeps history answers
    the history questions. Memory quality moves the F1.
    """

    def answer(self, queries: Sequence[AnswerQuery], counts: RequestCounts | None = None) -> list[str]:
        return [self.answer_one(q) for q in queries]

    def answer_one(self, query: AnswerQuery) -> str:
        q_terms = _terms(query.question)
        name_terms = set().union(*(_terms(s) for s in query.memories)) if query.memories else set()
        content_terms = q_terms - name_terms
        ranked = []
        for s_idx, items in enumerate(query.memories.values()):
            for rank, item in enumerate(items):
                m_terms = _terms(item.content) | _terms(item.speaker)
                recency = int(item.id) if item.id.isdigit() else -1  # bank ids grow with every insert
                key = (len(q_terms & name_terms & m_terms), len(content_terms & m_terms), recency, -rank, -s_idx)
                ranked.append((key, item))
        if not ranked:
            return NO_INFO
        best_key, best = max(ranked, key=lambda r: r[0])
        if best_key[1] == 0:
            return NO_INFO
        first = query.question.strip().split(maxsplit=1)
        if first and first[0].lower() in _YES_NO and not _HISTORY.match(query.question):
            return "No" if _terms(best.content) & _ENDED else "Yes"
        if not _HISTORY.match(query.question):
            return self._extract(best.content, query.question, q_terms)
        tied = [item for key, item in sorted(ranked, key=lambda r: r[0], reverse=True) if key[:2] == best_key[:2]]
        return ", ".join(dict.fromkeys(self._extract(item.content, query.question, q_terms) for item in tied))

    @staticmethod
    def _extract(content: str, question: str, q_terms: set[str]) -> str:
        if question.strip().lower().startswith("when"):
            dates = [m.group().split(maxsplit=1)[-1] if m.group().split()[0].lower() in ("on", "since", "in", "from") else m.group()
                     for m in _DATE.finditer(content)]
            if dates:
                return dates[0].strip()
        text = _DATE.sub(" ", content) if _DATE.sub(" ", content).strip(" .,") else content
        runs: list[list[re.Match]] = []  # maximal runs of adjacent surviving words
        prev_kept = False
        for m in _WORD_SPAN.finditer(text):
            terms = _terms(m.group())
            kept = m.group().lower() not in STOPWORDS and bool(terms) and not terms <= (q_terms | _ASPECT)
            if kept and prev_kept:
                runs[-1].append(m)
            elif kept:
                runs.append([m])
            prev_kept = kept
        # A run keeps its inner punctuation ("Portland, Maine"), not what lies outside it.
        return " ".join(text[r[0].start() : r[-1].end()] for r in runs) if runs else content


# -- the prompt shared by the LLM agents ---------------------------------------------------------

SYSTEM_PROMPT = (
    "You answer questions about two people from memories of their conversations. "
    "Use only the memories given. Reply with the answer alone, as briefly as possible "
    "(a few words, a name, a date), on one line. Resolve relative dates with the memory's "
    "session time. If the memories do not contain the answer, reply exactly: " + NO_INFO
)


def answer_prompt(query: AnswerQuery) -> tuple[str, str]:
    """(system, user) messages: memories grouped by speaker, each with its session time."""
    blocks = []
    for speaker, items in query.memories.items():
        lines = [f"- [{m.session_time}] {m.content}" if m.session_time else f"- {m.content}" for m in items]
        blocks.append(f"Memories of {speaker}:\n" + ("\n".join(lines) if lines else "(none)"))
    user = "\n\n".join(blocks) + f"\n\nQuestion: {query.question}\nAnswer:"
    return SYSTEM_PROMPT, user


_ANSWER_PREFIX = re.compile(r"^\s*answer\s*:\s*", re.IGNORECASE)


def first_line(text: str | None) -> str:
    """The reply's first non-empty line, stripped, without an echoed "Answer:" label."""
    for line in (text or "").splitlines():
        line = _ANSWER_PREFIX.sub("", line).strip()
        if line:
            return line
    return ""


class EngineAnswerAgent:
    """An LLM behind our Engine interface; one batched generate call per `answer` (greedy default)."""

    def __init__(self, engine: Engine, temperature: float = 0.0, max_new_tokens: int = 64):
        self.engine = engine
        self.spec = SamplingSpec(temperature=temperature, max_new_tokens=max_new_tokens)

    def answer(self, queries: Sequence[AnswerQuery], counts: RequestCounts | None = None) -> list[str]:
        if not queries:
            return []
        prompts = [self.engine.chat_prompt(*answer_prompt(q)) for q in queries]
        return [first_line(g.text) for g in self.engine.generate(prompts, self.spec)]


class OpenAIAnswerAgent:
    """Any OpenAI-compatible chat endpoint (base URL like "http://host:8000/v1").

    A batch's requests run concurrently on a small thread pool. A failed request is never an
    answer (an empty one would score F1 0 and turn a server restart into wrong rewards): it is
    retried under `send_until_up`'s rule, and the rollout waits, for up to `outage_timeout_s`
    from its first failure (keep it below cluster.task_timeout_s); then, or at once for a request
    refused for good (4xx but 408/409/429), `answer` raises EndpointDown naming url, model and last
    error, and the run stops. A 400 here is a config error: most often a prompt longer than the
    server's context (lower memory.answer_top_k, or raise the server's max_model_len).

    Retries are counted per call (`answer(queries, counts)`: the caller's RequestCounts, so tasks
    sharing this agent on one worker each get their own) and over the agent's life (`counts`).
    The API key is read from the env var `api_key_env`; "EMPTY" if unset, which vLLM servers accept.
    """

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.0,
                 max_new_tokens: int = 64, timeout: float = 60.0, concurrency: int = 8, outage_timeout_s: float = 600.0,
                 backoff: float = 0.5, max_backoff: float = 15.0):
        self.url, self.model, self.api_key_env = url, model, api_key_env
        self.temperature, self.max_new_tokens, self.timeout = temperature, max_new_tokens, timeout
        self.concurrency, self.outage_timeout_s = max(1, concurrency), outage_timeout_s
        self.backoff, self.max_backoff = backoff, max_backoff
        self.counts = RequestCounts()  # every call's, over this agent's life
        self._client = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # The HTTP client holds sockets and locks; an agent shipped to a Ray actor builds its own.
        state = self.__dict__.copy()
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _get_client(self):
        with self._lock:
            if self._client is None:
                import openai  # only this agent needs the package

                self._client = openai.OpenAI(
                    base_url=self.url, api_key=os.environ.get(self.api_key_env) or "EMPTY",
                    timeout=self.timeout, max_retries=0,  # retries are ours: counted and bounded
                )
            return self._client

    def answer(self, queries: Sequence[AnswerQuery], counts: RequestCounts | None = None) -> list[str]:
        if not queries:
            return []
        client = self._get_client()
        results = run_all(lambda q, stop: self._ask(client, q, stop), queries, self.concurrency)
        call = RequestCounts(sum(r for _, r in results), sum(r > 0 for _, r in results))
        with self._lock:
            self.counts.add(call)
        if counts is not None:
            counts.add(call)
        return [a for a, _ in results]

    def _ask(self, client, query: AnswerQuery, stop: threading.Event) -> tuple[str, int]:
        system, user = answer_prompt(query)

        def send():
            return client.chat.completions.create(
                model=self.model, temperature=self.temperature, max_tokens=self.max_new_tokens,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            )

        resp, retries = send_until_up(send, f"reward.answer_agent {self.model!r} at {self.url}", self.outage_timeout_s,
                                      self.backoff, self.max_backoff, stop, _HINT_400)
        return first_line(resp.choices[0].message.content if resp.choices else ""), retries


_HINT_400 = ("; a config error, e.g. a prompt longer than the server's context: lower memory.answer_top_k "
             "or raise the server's max_model_len")


def make_answer_agent(cfg: AnswerAgentConfig, engine: Engine | None = None) -> AnswerAgent:
    """The agent `reward.answer_agent` names. kind "vllm" takes an engine the caller built from
    cfg.model (engine construction belongs to actors/engines, with its resources)."""
    if cfg.kind == "reader":
        return ReaderAgent()
    if cfg.kind == "vllm":
        if engine is None:
            raise ValueError("reward.answer_agent kind 'vllm' needs an engine built from reward.answer_agent.model")
        return EngineAnswerAgent(engine, cfg.temperature, cfg.max_new_tokens)
    if cfg.kind == "openai":
        return OpenAIAnswerAgent(cfg.url or "", cfg.model or "", cfg.api_key_env, cfg.temperature, cfg.max_new_tokens,
                                 timeout=cfg.timeout_s, outage_timeout_s=cfg.outage_timeout_s)
    raise ValueError(f"unknown answer agent kind {cfg.kind!r}")


def check_answer_agent(cfg: AnswerAgentConfig) -> None:
    """At a run's start, in one line: an openai endpoint that does not answer or does not serve
    the model, or kind vllm, which only `memr2 eval`-style callers that build an engine can use."""
    if cfg.kind == "openai":
        check_endpoint(cfg.url or "", cfg.model or "", "reward.answer_agent", cfg.api_key_env)
    if cfg.kind == "vllm":
        raise ValueError("reward.answer_agent.kind=vllm: rollout workers build no answer engine; serve the model "
                         "with vLLM's OpenAI server and set kind=openai with its url")
