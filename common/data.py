"""Loading conversations in LoCoMo's schema (LoCoMo itself and our synthetic worlds) and the splits.

LoCoMo's quirks handled here: category-5 items carry `adversarial_answer` instead of `answer`;
some answers are integers; some evidence lists are empty; a handful of evidence ids are malformed
("D:11:26", "D9:1 D4:4") and are kept verbatim (they simply never match a turn); `session_N_date_time`
keys can exist for sessions that have no turns, which are not sessions.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from common.config import DataConfig
from common.types import QA, Conversation, GoldOperation, Session, Turn

_SESSION_KEY = re.compile(r"session_(\d+)")


class DataError(ValueError):
    """A data file that does not fit LoCoMo's schema; the message names the file and field."""


def load_conversations(path: str | Path) -> list[Conversation]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file{_job_hint(path)}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON (line {err.lineno})") from None
    return parse_conversations(raw, str(path))


def _job_hint(path: Path) -> str:
    """Under `ray job submit` the driver's working directory is a temporary copy of the submitted
    folder, so a relative path (paper.yaml's ../shared/...) points inside that copy."""
    if path.is_absolute() or not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # set for a job's entrypoint
        return ""
    return (" (under `ray job submit` a relative path is read from the job's working dir, a temporary copy of the"
            " submitted folder: pass an absolute path on the node running the job's driver, e.g. data.locomo_path=/data/locomo10.json)")


def parse_conversations(raw: Any, where: str) -> list[Conversation]:
    if not isinstance(raw, list):
        raise DataError(f"{where}: top level must be a list of conversations")
    return [_conversation(item, f"{where}[{i}]") for i, item in enumerate(raw)]


def load_dataset(cfg: DataConfig) -> list[Conversation]:
    """The configured conversations: a synthetic world made in memory, LoCoMo, or any file."""
    if cfg.source == "synthetic":
        from common.synth import generate_world

        s = cfg.synth
        world = generate_world(s.conversations, s.sessions, s.seed, s.turns_per_session, s.facts_per_session)
        return parse_conversations(world, "synthetic world")
    return load_conversations(cfg.locomo_path if cfg.source == "locomo" else cfg.path)


def _conversation(item: Any, where: str) -> Conversation:
    conv = _field(item, "conversation", dict, where)
    where = f"{where} ({item.get('sample_id', '?')})"
    numbers = sorted(int(m.group(1)) for k in conv if (m := _SESSION_KEY.fullmatch(k)))
    sessions = tuple(_session(conv, n, f"{where}.conversation") for n in numbers)
    qa = tuple(_qa(q, f"{where}.qa[{i}]") for i, q in enumerate(_field(item, "qa", list, where)))
    gold = item.get("gold") or {}
    return Conversation(
        sample_id=str(_field(item, "sample_id", str, where)),
        speaker_a=_field(conv, "speaker_a", str, f"{where}.conversation"),
        speaker_b=_field(conv, "speaker_b", str, f"{where}.conversation"),
        sessions=sessions,
        qa=qa,
        gold_facts={k: tuple(v) for k, v in gold.get("facts", {}).items()},
        gold_operations=tuple(_gold_op(o, f"{where}.gold.operations[{i}]") for i, o in enumerate(gold.get("operations", []))),
    )


def _session(conv: dict, n: int, where: str) -> Session:
    turns = _field(conv, f"session_{n}", list, where)
    parsed = tuple(
        Turn(
            speaker=_field(t, "speaker", str, f"{where}.session_{n}[{i}]"),
            dia_id=_field(t, "dia_id", str, f"{where}.session_{n}[{i}]"),
            text=_field(t, "text", str, f"{where}.session_{n}[{i}]"),
        )
        for i, t in enumerate(turns)
    )
    date = conv.get(f"session_{n}_date_time")
    date = "" if date is None else str(date)
    if parsed and not date.strip():  # the extractor's prompt dates every session; an empty date is a data bug
        state = "missing" if f"session_{n}_date_time" not in conv else "empty"
        raise DataError(f"{where}.session_{n}_date_time: {state}, but session_{n} has {len(parsed)} turn(s)")
    return Session(index=n, date_time=date, turns=parsed)


def _qa(q: Any, where: str) -> QA:
    category = _field(q, "category", int, where)
    if category not in (1, 2, 3, 4, 5):
        raise DataError(f"{where}.category: must be 1-5, got {category!r}")
    answer = q.get("answer")
    if answer is None and category != 5:
        raise DataError(f"{where}.answer: missing")
    adversarial = q.get("adversarial_answer")
    return QA(
        question=_field(q, "question", str, where),
        answer="" if answer is None else str(answer),
        category=category,
        evidence=tuple(str(e) for e in _field(q, "evidence", list, where)),
        kind=q.get("kind"),
        adversarial_answer=None if adversarial is None else str(adversarial),
    )


def _gold_op(o: Any, where: str) -> GoldOperation:
    return GoldOperation(
        session=_field(o, "session", int, where),
        dia_id=_field(o, "dia_id", str, where),
        op=_field(o, "op", str, where),
        key=_field(o, "key", str, where),
        speaker=_field(o, "speaker", str, where),
        content=str(o.get("content", "")),
        value=None if o.get("value") is None else str(o["value"]),
    )


def _field(obj: Any, name: str, typ: type, where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object, got {type(obj).__name__}")
    if name not in obj:
        raise DataError(f"{where}.{name}: missing")
    value = obj[name]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise DataError(f"{where}.{name}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def stats(conversations: list[Conversation]) -> dict[str, Any]:
    by_category = Counter(q.category for c in conversations for q in c.qa)
    return {
        "conversations": len(conversations),
        "sessions": sum(len(c.sessions) for c in conversations),
        "turns": sum(len(s.turns) for c in conversations for s in c.sessions),
        "qa_by_category": {str(k): by_category[k] for k in sorted(by_category)},
    }


def split(conversations: list[Conversation], cfg: DataConfig) -> dict[str, list[Conversation]]:
    """LoCoMo's reference split by sample id: train conv-43 + conv-47, validation conv-44, test the
    rest. A synthetic world splits by position: the last `synth.val_conversations` validate."""
    if cfg.source == "synthetic":
        n_val = cfg.synth.val_conversations
        if n_val >= len(conversations):
            raise DataError("data.synth.val_conversations: must leave at least one training conversation")
        return {"train": conversations[: len(conversations) - n_val], "val": conversations[len(conversations) - n_val :], "test": []}
    by_id = {c.sample_id: c for c in conversations}
    for name, ids in (("train_ids", cfg.train_ids), ("val_ids", cfg.val_ids), ("test_ids", cfg.test_ids or [])):
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DataError(f"data.{name}: no conversation {missing[0]!r} in the data")
    held = set(cfg.train_ids) | set(cfg.val_ids)
    test_ids = cfg.test_ids if cfg.test_ids is not None else [i for i in by_id if i not in held]
    return {
        "train": [by_id[i] for i in cfg.train_ids],
        "val": [by_id[i] for i in cfg.val_ids],
        "test": [by_id[i] for i in test_ids],
    }
