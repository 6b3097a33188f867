"""The LLM judge behind the metric J: the share of answers a judge LLM labels CORRECT.

`JUDGE_PROMPT` is a generous-match prompt of the kind LoCoMo evaluations use (Mem0, Memory-R1,
Memory-R2): the judge sees the question, the gold answer and the generated answer; an answer on the
same fact or topic is CORRECT even if longer or worded differently, and a date in another format,
or a relative reference meaning the same date or period, is CORRECT. The judge may write one
sentence of reasoning, then must reply `{"label": "CORRECT"}` or `{"label": "WRONG"}`. The
template has the placeholders {question}, {gold} and {prediction} (filled with `str.format`).

`Judge` talks to any OpenAI-compatible endpoint (eval.judge: a vLLM server, a hosted API), like
actors.agent.answer_agent.OpenAIAnswerAgent, and under the same outage rule (`send_until_up`): no
J is ever computed from a failed request.
- a request that fails transiently (refused connection, timeout, 408/409/429, 5xx) is retried with
  capped exponential backoff, the eval waiting, for up to `eval.judge.outage_timeout_s` from its
  first failure; still failing then, it stops the eval with one EndpointDown (a ValueError naming
  url, model and last error);
- a request refused for good (400, 401, a 404 unknown model) stops the eval at once, the same way;
- the first item is sent alone, as a probe, so a misconfigured judge fails on one request (and a
  down one waits there) before the rest go out `concurrency` at a time.
Retries are counted (`counts`: judge_retries / judge_failures in eval.json). `j_score` counts every
item: a reply that does not parse is not CORRECT (conservative: it can only lower J).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

from actors.agent.endpoint import RequestCounts, run_all, send_until_up
from common.config import JudgeConfig

Label = Literal["CORRECT", "WRONG"]

JUDGE_PROMPT = """You are grading an answer to a question about a long conversation between two people.

Question: {question}
Gold answer: {gold}
Generated answer: {prediction}

Decide whether the generated answer is CORRECT or WRONG, judging it against the gold answer. Be generous:
- It is CORRECT if it states the same fact or touches on the same topic as the gold answer, even if it \
is longer, worded differently or adds detail.
- A date or time period is CORRECT if it means the same date or period as the gold answer, whatever its \
format ("7 May 2023", "May 7th", "2023-05-07"), and also when it is given relative to another date \
("the week before 14 May 2023", "last year") that resolves to the same date or period.
- It is WRONG if it gives a different fact, contradicts the gold answer, or says the information is not \
available.

Write at most one sentence of reasoning, then end with the label as JSON and nothing after it: \
{{"label": "CORRECT"}} or {{"label": "WRONG"}}"""

# The last `"label": <value>` of an object in the reply; fences and single quotes are tolerated.
_LABEL = re.compile(r"""[{,]\s*["']label["']\s*:\s*["']?([A-Za-z]+)""", re.IGNORECASE)
_WORD = re.compile(r"\b(correct|wrong)\b", re.IGNORECASE)


def parse_verdict(reply: str | None) -> Label | None:
    """The label of the reply's last JSON object with a "label" key; else the one of CORRECT /
    WRONG that appears as a whole word; else (both, neither, a label of another value) None."""
    if not reply:
        return None
    labels = _LABEL.findall(reply)
    if labels:
        label = labels[-1].upper()
        return cast(Label, label) if label in ("CORRECT", "WRONG") else None
    words = {w.upper() for w in _WORD.findall(reply)}
    return cast(Label, words.pop()) if len(words) == 1 else None


@dataclass(frozen=True, slots=True)
class Verdict:
    label: Label | None  # None: the judge's reply did not parse
    reply: str  # the judge's raw reply (a failed request has no verdict: it raises)


class Judge:
    """Judges (question, gold, prediction) triples concurrently against cfg.url / cfg.model."""

    def __init__(self, cfg: JudgeConfig, *, backoff_s: float = 0.5, max_backoff_s: float = 15.0):
        if not cfg.url or not cfg.model:
            raise ValueError("the LLM judge needs eval.judge.url and eval.judge.model")
        self.cfg, self.backoff_s, self.max_backoff_s = cfg, backoff_s, max_backoff_s
        self.counts = RequestCounts()  # retries and requests that met an error, over this judge's life
        self._lock = threading.Lock()

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        """One verdict per item, in order; EndpointDown (a ValueError) if a request fails for good."""
        items = list(items)
        if not items:
            return []
        import openai  # only the judge and the OpenAI answer agent need the package

        cfg = self.cfg
        api_key = os.environ.get(cfg.api_key_env) or "EMPTY"  # vLLM servers accept any key
        with openai.OpenAI(base_url=cfg.url, api_key=api_key, timeout=cfg.timeout_s, max_retries=0) as client:
            first = self._ask(client, items[0], None)  # the probe
            rest = run_all(lambda item, stop: self._ask(client, item, stop), items[1:], cfg.concurrency) if items[1:] else []
        return [first, *rest]

    def _ask(self, client, item: tuple[str, str, str], stop: threading.Event | None) -> Verdict:
        question, gold, prediction = item
        prompt = JUDGE_PROMPT.format(question=question, gold=gold, prediction=prediction)
        cfg = self.cfg

        def send():
            return client.chat.completions.create(model=cfg.model, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                                  messages=[{"role": "user", "content": prompt}])

        resp, retries = send_until_up(send, f"eval.judge {cfg.model!r} at {cfg.url}", cfg.outage_timeout_s,
                                      self.backoff_s, self.max_backoff_s, stop)
        with self._lock:
            self.counts.add(RequestCounts(retries, int(retries > 0)))
        # A reasoning model that spends max_tokens thinking returns no content: unparsable, not failed.
        reply = (resp.choices[0].message.content if resp.choices else None) or ""
        return Verdict(parse_verdict(reply), reply)


def make_judge(cfg: JudgeConfig) -> Judge | None:
    """The judge eval.judge configures; None without a url (J is then absent)."""
    return None if cfg.url is None else Judge(cfg)


def j_score(verdicts: Sequence[Verdict]) -> float | None:
    """Share of CORRECT among all verdicts (unparsable count as not correct); None if empty."""
    if any(v.reply is None for v in verdicts):
        raise ValueError("a verdict without a reply is a failed request: no J from it")
    return sum(v.label == "CORRECT" for v in verdicts) / len(verdicts) if verdicts else None
