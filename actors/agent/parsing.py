"""Turn the policy's replies into facts and memory operations without trusting a byte of them.

Tolerant of form, strict about content. Chatter around the JSON, ```json fences, trailing text,
trailing commas and a wrapper object are forgiven: the reply is scanned for balanced {...}
candidates (string- and escape-aware) and each is tried with json.loads, the first object with
the expected key and a list value wins. Nothing else ever interprets model text (no eval), input
is capped at MAX_CHARS and candidate attempts at MAX_CANDIDATES, so pathological replies stay
cheap, and every wrong type becomes a rejection, never an exception.

Outcomes, so callers can count them (DESIGN §1: a counted format failure, never a crash):
- format_failure: no usable list under the key at all (including truncated JSON, which an RL
  policy must learn to finish); `error` says why; items is empty.
- rejected: one "<fact|op> <n>: <reason>" per dropped item (n is 1-based in the reply's list).
- hallucinated: references to ids the model was not shown (memory ids in operations, dia_ids
  in facts or operations); each such item is also rejected, except an operation's dia_id.
- warnings: a field dropped while the item is kept. An INSERT/UPDATE whose dia_id is not in the
  chunk keeps its content but loses the dia_id, because a made-up dia_id would make the bank
  claim evidence it never saw (M-Fail would lie) while the content itself may be good.
Normalisation: text fields are whitespace-collapsed; speakers match case-insensitively and come
back in their canonical spelling; memory ids may be strings or integers (not floats or booleans)
and come back as strings; op names are case-insensitive and come back upper-case.
"""

from __future__ import annotations

import bisect
import itertools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from common.types import Fact, Operation

T = TypeVar("T")

MAX_CHARS = 20_000
MAX_CANDIDATES = 32

_TOKEN = re.compile(r'\\.|[{}"]', re.DOTALL)
_REPAIR = re.compile(r'\\.|"|,\s*(?=[\]}])', re.DOTALL)
_TRAILING_COMMA = re.compile(r",\s*[\]}]")
_DECODER = json.JSONDecoder()
_FAILED = object()


@dataclass(slots=True)
class Parsed(Generic[T]):
    items: list[T] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    format_failure: bool = False
    error: str = ""
    hallucinated: int = 0
    warnings: list[str] = field(default_factory=list)


class _Bad(Exception):
    def __init__(self, reason: str, hallucinated: bool = False):
        super().__init__(reason)
        self.hallucinated = hallucinated


# -- finding the JSON ------------------------------------------------------------------------------


def _brace_pairs(text: str) -> list[tuple[int, int]]:
    """Every matched {...} span, outermost first. Quotes count only inside braces, so prose
    apostrophes and quotes before the JSON cannot flip the scanner into "string" mode."""
    stack: list[int] = []
    pairs: list[tuple[int, int]] = []
    in_string = False
    for m in _TOKEN.finditer(text):
        tok = m.group()
        if in_string:
            in_string = tok != '"'
        elif tok == '"':
            in_string = bool(stack)
        elif tok == "{":
            stack.append(m.start())
        elif tok == "}" and stack:
            pairs.append((stack.pop(), m.end()))
    pairs.sort()
    return pairs


def _strip_trailing_commas(s: str) -> str:
    out, last, in_string = [], 0, False
    for m in _REPAIR.finditer(s):
        tok = m.group()
        if tok == '"':
            in_string = not in_string
        elif tok.startswith(",") and not in_string:
            out.append(s[last : m.start()])
            last = m.end()
    out.append(s[last:])
    return "".join(out)


def _loads(s: str) -> object:
    # ValueError covers JSONDecodeError and ints too long to convert; deep nesting is RecursionError.
    try:
        return json.loads(s)
    except (ValueError, RecursionError):
        pass
    if _TRAILING_COMMA.search(s):
        try:
            return json.loads(_strip_trailing_commas(s))
        except (ValueError, RecursionError):
            pass
    return _FAILED


def _candidates(text: str, key: str) -> Iterable[object]:
    quoted = f'"{key}"'
    hits = [m.start() for m in re.finditer(re.escape(quoted), text)]
    if not hits:
        return
    tried = 0
    for start, end in _brace_pairs(text):
        i = bisect.bisect_left(hits, start)
        if i == len(hits) or hits[i] + len(quoted) > end:
            continue
        tried += 1
        if tried > MAX_CANDIDATES:
            break
        yield _loads(text[start:end])
    # An unbalanced quote inside a stray "{" hides everything after it from the scanner;
    # decoding straight from each '{"key":' still finds a well-formed reply.
    anchors = re.finditer(r"\{\s*" + re.escape(quoted) + r"\s*:", text)
    for m in itertools.islice(anchors, MAX_CANDIDATES):
        try:
            yield _DECODER.raw_decode(text, m.start())[0]
        except (ValueError, RecursionError):
            continue


def _find_list(text: object, key: str) -> tuple[list | None, str]:
    if not isinstance(text, str):
        return None, f"reply is {_kind(text)}, not text"
    wrong = ""
    for obj in _candidates(text[:MAX_CHARS], key):
        if isinstance(obj, dict) and key in obj:
            if isinstance(obj[key], list):
                return obj[key], ""
            wrong = wrong or f"{key} is {_kind(obj[key])}, not a list"
    return None, wrong or f'no parsable JSON object with key "{key}"'


# -- checking fields -------------------------------------------------------------------------------


def _kind(v: object) -> str:
    if isinstance(v, bool):  # before int: bool is an int subclass
        return "a boolean"
    names = {type(None): "null", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(v), type(v).__name__)


def _show(v: object) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _text(item: dict, key: str) -> str:
    if key not in item:
        raise _Bad(f"missing {key}")
    v = item[key]
    if not isinstance(v, str):
        raise _Bad(f"{key} is {_kind(v)}, not a string")
    try:
        v.encode("utf-8")  # lone surrogates from "\ud800" escapes would crash tokenizers later
    except UnicodeEncodeError:
        raise _Bad(f"{key} is not valid unicode") from None
    v = " ".join(v.split())
    if not v:
        raise _Bad(f"empty {key}")
    return v


def _speaker(item: dict, canonical: dict[str, str]) -> str:
    name = _text(item, "speaker")
    if name.casefold() not in canonical:
        raise _Bad(f"unknown speaker {_show(name)}")
    return canonical[name.casefold()]


def _bounded(item: dict, key: str, max_words: int) -> str:
    value = _text(item, key)
    words = len(value.split())
    if words > max_words:
        raise _Bad(f"{key} has {words} words > {max_words}")
    return value


def _object(item: object) -> dict:
    if not isinstance(item, dict):
        raise _Bad(f"is {_kind(item)}, not an object")
    return item


# -- facts -----------------------------------------------------------------------------------------


def parse_facts(text: str, chunk_dia_ids: set[str], speakers: set[str], max_words: int = 20) -> Parsed[Fact]:
    raw, error = _find_list(text, "facts")
    if raw is None:
        return Parsed(format_failure=True, error=error)
    out: Parsed[Fact] = Parsed()
    canonical = {s.casefold(): s for s in speakers}
    seen: dict[tuple[str, str], int] = {}
    for n, item in enumerate(raw, 1):
        try:
            item = _object(item)
            speaker = _speaker(item, canonical)
            dia_id = _text(item, "dia_id")
            if dia_id not in chunk_dia_ids:
                raise _Bad(f"dia_id {_show(dia_id)} not in this chunk", hallucinated=True)
            fact = _bounded(item, "fact", max_words)
            key = (speaker, fact.casefold())
            if key in seen:
                raise _Bad(f"duplicate of fact {seen[key]}")
        except _Bad as bad:
            out.rejected.append(f"fact {n}: {bad}")
            out.hallucinated += bad.hallucinated
            continue
        seen[key] = n
        out.items.append(Fact(speaker, dia_id, fact))
    return out


# -- operations ------------------------------------------------------------------------------------


def _memory_id(item: dict, visible_ids: set[str]) -> str:
    if "memory_id" not in item:
        raise _Bad("missing memory_id")
    v = item["memory_id"]
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _Bad(f"memory_id is {_kind(v)}, not a string or integer")
    mid = str(v).strip()
    if mid not in visible_ids:
        raise _Bad(f"memory_id {_show(mid)} was not shown", hallucinated=True)
    return mid


def _operation(item: object, visible_ids: set[str], canonical: dict[str, str], max_words: int) -> Operation:
    item = _object(item)
    if "op" not in item:
        raise _Bad("missing op")
    if not isinstance(item["op"], str):
        raise _Bad(f"op is {_kind(item['op'])}, not a string")
    kind = item["op"].strip().upper()
    if kind == "NOOP":
        return Operation("NOOP")
    if kind == "INSERT":
        return Operation("INSERT", speaker=_speaker(item, canonical), content=_bounded(item, "content", max_words))
    if kind == "UPDATE":
        mid = _memory_id(item, visible_ids)
        return Operation("UPDATE", memory_id=mid, content=_bounded(item, "content", max_words))
    if kind == "DELETE":
        return Operation("DELETE", memory_id=_memory_id(item, visible_ids))
    raise _Bad(f"unknown op {_show(item['op'])}")


def parse_operations(
    text: str, visible_ids: set[str], speakers: set[str], chunk_dia_ids: set[str], max_words: int = 40
) -> Parsed[Operation]:
    """NOOPs are accepted but yield no Operation; items are exactly what the bank should apply."""
    raw, error = _find_list(text, "operations")
    if raw is None:
        return Parsed(format_failure=True, error=error)
    out: Parsed[Operation] = Parsed()
    canonical = {s.casefold(): s for s in speakers}
    claimed: dict[str, int] = {}  # memory id -> the op that changes it
    inserted: dict[tuple[str, str], int] = {}
    for n, item in enumerate(raw, 1):
        try:
            op = _operation(item, visible_ids, canonical, max_words)
            if op.memory_id in claimed:
                raise _Bad(f"memory {_show(op.memory_id)} already changed by op {claimed[op.memory_id]}")
            key = (op.speaker or "", (op.content or "").casefold())
            if op.op == "INSERT" and key in inserted:
                raise _Bad(f"duplicate of op {inserted[key]}")
        except _Bad as bad:
            out.rejected.append(f"op {n}: {bad}")
            out.hallucinated += bad.hallucinated
            continue
        if op.op == "NOOP":
            continue
        if op.memory_id is not None:
            claimed[op.memory_id] = n
        if op.op == "INSERT":
            inserted[key] = n
        if op.op in ("INSERT", "UPDATE"):
            op = Operation(op.op, op.memory_id, op.speaker, op.content, _dia_id(item, chunk_dia_ids, n, out))
        out.items.append(op)
    return out


def _dia_id(item: dict, chunk_dia_ids: set[str], n: int, out: Parsed) -> str | None:
    v = item.get("dia_id")
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, str) and v.strip() in chunk_dia_ids:
        return v.strip()
    if isinstance(v, str):
        out.hallucinated += 1
        out.warnings.append(f"op {n}: dia_id {_show(v)} not in this chunk, dropped")
    else:
        out.warnings.append(f"op {n}: dia_id is {_kind(v)}, not a string, dropped")
    return None
