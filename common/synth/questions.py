"""Questions with gold answers and evidence, asked about the state at the END of a conversation.

Kinds (LoCoMo category in brackets): single-hop [4] current value never changed;
knowledge-update [4] current value of a slot that changed (evidence: the latest value's turn);
temporal [2] date of the event behind a current value; multi-hop [1] comma-separated lists;
deleted [4] something that stopped being true ("No"); adversarial [5] about the other speaker,
never mentioned, with `adversarial_answer` instead of `answer`.
"""
from __future__ import annotations

import random

from .world import SINGLE_SLOTS, Event, SessionPlan, fmt_date

KU_SHARE = 0.25  # trim other kinds until knowledge-update items reach this share
ADV_SHARE = 0.12
MAX_HISTORY = 6  # longer 'all values ever' lists are not asked

_CURRENT = {
    "city": "Where does {P} live{now}?", "job": "What is {P}'s job{now}?",
    "partner": "Who is {P} dating{now}?", "car": "What car does {P} drive{now}?",
    "food": "What is {P}'s favourite food{now}?", "book": "What book is {P} reading{now}?",
}
_WHEN = {
    "city": "When did {P} move to {v}?", "job": "When did {P} start working as {a} {v}?",
    "partner": "When did {P} start dating {v}?", "car": "When did {P} buy the {v}?",
    "pet": "When did {P} adopt {n}?", "hobby": "When did {P} take up {v}?",
}
_GONE = {
    "job": "Does {P} still work as {a} {v}?", "partner": "Is {P} still dating {v}?",
    "car": "Does {P} still drive the {v}?", "pet": "Does {P} still have the {s} named {n}?",
    "hobby": "Is {P} still into {v}?",
}
_HISTORY = {
    "city": "Which cities has {P} lived in?", "job": "What jobs has {P} had?",
    "partner": "Who has {P} dated?", "car": "Which cars has {P} owned?",
}


def _q(tmpl: str, person: str, ev: Event | None = None, now: str = "") -> str:
    v = ev.value if ev else ""
    return tmpl.format(P=person, now=now, v=v, a="an" if v[:1].lower() in "aeiou" else "a",
                       s=ev.species if ev else "", n=ev.item if ev else "")


def _item(question, answer, evidence, category, kind) -> dict:
    return {"question": question, "answer": answer, "evidence": list(evidence),
            "category": category, "kind": kind}


def _about(person: str, history: dict[str, list[Event]]) -> list[dict]:
    """Non-adversarial questions about one person, from their per-key event histories."""
    out = []
    for key, evs in history.items():
        last, slot = evs[-1], evs[0].slot
        if slot in SINGLE_SLOTS:
            values = [e for e in evs if e.op != "DELETE"]
            if last.op != "DELETE":
                changed = len(values) >= 2
                out.append(_item(_q(_CURRENT[slot], person, now=" now" if changed else ""),
                                 last.value, [last.dia_id], 4,
                                 "knowledge-update" if changed else "single-hop"))
                if last.date and slot in _WHEN:
                    out.append(_item(_q(_WHEN[slot], person, last), fmt_date(last.date),
                                     [last.dia_id], 2, "temporal"))
            for e in evs:
                if e.op == "DELETE":
                    out.append(_item(_q(_GONE[slot], person, e), "No", [e.dia_id], 4, "deleted"))
            if 2 <= len(values) <= MAX_HISTORY and slot in _HISTORY:
                out.append(_item(_q(_HISTORY[slot], person), ", ".join(e.value for e in values),
                                 [e.dia_id for e in values], 1, "multi-hop"))
        elif last.op == "DELETE":
            out.append(_item(_q(_GONE[slot], person, last), "No", [last.dia_id], 4, "deleted"))
        else:
            if slot == "pet":
                q = _q("What kind of animal is {P}'s pet {n}?", person, last)
                out.append(_item(q, last.species, [last.dia_id], 4, "single-hop"))
            else:
                out.append(_item(_q("Is {P} still into {v}?", person, last), "Yes",
                                 [last.dia_id], 4, "single-hop"))
            if last.date:
                out.append(_item(_q(_WHEN[slot], person, last), fmt_date(last.date),
                                 [last.dia_id], 2, "temporal"))
    for slot, q, field in (("pet", "What are the names of {P}'s pets?", "item"),
                           ("hobby", "What hobbies is {P} into?", "value")):
        cur = [evs[0] for evs in history.values() if evs[0].slot == slot and evs[-1].op != "DELETE"]
        if len(cur) >= 2:
            out.append(_item(_q(q, person), ", ".join(getattr(e, field) for e in cur),
                             [e.dia_id for e in cur], 1, "multi-hop"))
    return out


def _adversarial(person: str, mine: dict[str, list[Event]], theirs: dict[str, list[Event]]) -> list[dict]:
    """Questions about `person` built from the other speaker's facts `person` never had."""
    my_slots = {evs[0].slot for evs in mine.values()}
    my_values = {(e.slot, e.value) for evs in mine.values() for e in evs}
    my_species = {e.species for evs in mine.values() for e in evs if e.slot == "pet"}
    out = []
    for evs in theirs.values():
        last, slot = evs[-1], evs[0].slot
        if slot in SINGLE_SLOTS and last.op != "DELETE" and slot not in my_slots:
            out.append((_q(_CURRENT[slot], person), last.value, last.dia_id))
        for e in evs:
            if e.op == "DELETE" or (e.slot, e.value) in my_values:
                continue
            if e.date and e.slot in _WHEN:
                out.append((_q(_WHEN[e.slot], person, e), fmt_date(e.date), e.dia_id))
            if e.slot == "pet" and e.species not in my_species:
                out.append((f"What is the name of {person}'s {e.species}?", e.item, e.dia_id))
    seen: set[str] = set()
    return [{"question": q, "adversarial_answer": a, "evidence": [d], "category": 5,
             "kind": "adversarial"} for q, a, d in out if not (q in seen or seen.add(q))]


def _pos(dia_id: str) -> tuple[int, int]:
    s, t = dia_id[1:].split(":")
    return int(s), int(t)


def build_qa(rng: random.Random, plans: list[SessionPlan], speakers: tuple[str, str]) -> list[dict]:
    history: dict[str, dict[str, list[Event]]] = {p: {} for p in speakers}
    for plan in plans:
        for ev in plan.events:
            history[ev.owner].setdefault(ev.key, []).append(ev)
    qa = []
    for p in speakers:
        qa.extend(_about(p, history[p]))
    adv = []
    for p, other in (speakers, speakers[::-1]):
        adv.extend(_adversarial(p, history[p], history[other]))
    n_adv = min(len(adv), max(1, round(ADV_SHARE * len(qa))))
    qa.extend(rng.sample(adv, n_adv) if adv else [])
    # Keep knowledge-update questions >= KU_SHARE of the file: drop from the largest other kind.
    n_ku = sum(q["kind"] == "knowledge-update" for q in qa)
    while n_ku and n_ku < KU_SHARE * len(qa):
        by_kind: dict[str, list[int]] = {}
        for i, q in enumerate(qa):
            if q["kind"] != "knowledge-update":
                by_kind.setdefault(q["kind"], []).append(i)
        biggest = max(sorted(by_kind), key=lambda k: len(by_kind[k]))
        qa.pop(rng.choice(by_kind[biggest]))
    # Ask in conversation order: after the last evidence turn (stable for ties).
    qa.sort(key=lambda q: max(_pos(d) for d in q["evidence"]))
    return qa
