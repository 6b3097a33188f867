"""The LLM judge behind the metric J: the share of answers a judge LLM labels CORRECT.

`JUDGE_PROMPT` is a generous-match prompt of the kind LoCoMo evaluations use (Mem0, Memory-R1,
Memory-R2): the judge sees the question, the gold answer and the generated answer; an answer on the
same fact or topic is CORRECT even if longer or worded differently, and a date in another format,
or a relative reference meaning the same date or period, is CORRECT. The judge may write one
sentence of reasoning, then must reply `{"label": "CORRECT"}` or `{"label": "WRONG"}`. The
template has the placeholders {question}, {gold} and {prediction} (filled with `str.format`).

`Judge` talks to any OpenAI-compatible endpoint (eval.judge: a vLLM server, a hosted API), like
actors.agent.answer_agent.OpenAIAnswerAgent, whose transient-error test it shares. Failures:
- the first item is sent alone, as a probe: if it fails (at once for a non-transient error such as
  a 404 unknown model or a 401; after `retries` retries for a transient one such as a refused
  connection), `judge` raises one ValueError naming the url and model, since every other request
  would fail the same way and a J of 0 would hide a misconfigured judge;
- after the probe, a request that still fails is that item's failure alone: `Verdict(None, None)`,
  counted in `failures`, so one bad row cannot sink an eval.
`j_score` counts every item: an unparsable or failed verdict is not CORRECT (conservative: a
broken judge can only lower J, never raise it).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, cast

from actors.agent.answer_agent import _transient
from common.config import JudgeConfig

log = logging.getLogger(__name__)

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
    label: Label | None  # None: the reply did not parse, or the request failed
    reply: str | None  # the judge's raw reply; None only when the request failed


class Judge:
    """Judges (question, gold, prediction) triples concurrently against cfg.url / cfg.model."""

    def __init__(self, cfg: JudgeConfig, *, backoff_s: float = 0.5):
        if not cfg.url or not cfg.model:
            raise ValueError("the LLM judge needs eval.judge.url and eval.judge.model")
        self.cfg, self.backoff_s = cfg, backoff_s
        self.failures = 0  # requests that failed after the probe, over this judge's life
        self._lock = threading.Lock()

    def judge(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        """One verdict per item, in order; raises ValueError if the first request fails."""
        items = list(items)
        if not items:
            return []
        import openai  # only the judge and the OpenAI answer agent need the package

        cfg = self.cfg
        api_key = os.environ.get(cfg.api_key_env) or "EMPTY"  # vLLM servers accept any key
        with openai.OpenAI(base_url=cfg.url, api_key=api_key, timeout=cfg.timeout_s, max_retries=0) as client:
            try:
                first = self._ask(client, items[0])
            except Exception as err:  # noqa: BLE001 - whatever it is, the judge is unusable
                raise ValueError(f"LLM judge {cfg.model!r} at {cfg.url} failed its first request: {err!r}") from err
            with ThreadPoolExecutor(max_workers=max(1, min(cfg.concurrency, len(items) - 1))) as pool:
                rest = list(pool.map(lambda item: self._ask_or_fail(client, item), items[1:]))
        return [first, *rest]

    def _ask(self, client, item: tuple[str, str, str]) -> Verdict:
        question, gold, prediction = item
        prompt = JUDGE_PROMPT.format(question=question, gold=gold, prediction=prediction)
        for attempt in range(self.cfg.retries + 1):
            try:
                resp = client.chat.completions.create(
                    model=self.cfg.model, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens,
                    messages=[{"role": "user", "content": prompt}],
                )
            except Exception as err:
                if attempt == self.cfg.retries or not _transient(err):
                    raise
                time.sleep(self.backoff_s * 2**attempt)
                continue
            # A reasoning model that spends max_tokens thinking returns no content: unparsable, not failed.
            reply = (resp.choices[0].message.content if resp.choices else None) or ""
            return Verdict(parse_verdict(reply), reply)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _ask_or_fail(self, client, item: tuple[str, str, str]) -> Verdict:
        try:
            return self._ask(client, item)
        except Exception as err:  # noqa: BLE001 - one failed row must not sink the eval
            log.warning("judge request failed after retries: %r", err)
            with self._lock:
                self.failures += 1
            return Verdict(None, None)


def make_judge(cfg: JudgeConfig) -> Judge | None:
    """The judge eval.judge configures; None without a url (J is then absent)."""
    return None if cfg.url is None else Judge(cfg)


def j_score(verdicts: Sequence[Verdict]) -> float | None:
    """Share of CORRECT among all verdicts (unparsable / failed count as not correct); None if empty."""
    return sum(v.label == "CORRECT" for v in verdicts) / len(verdicts) if verdicts else None
