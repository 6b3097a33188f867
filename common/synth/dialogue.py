"""Render planned events as dialogue turns, plus gold facts and gold memory operations.

Each fact-bearing turn states exactly one event in the first person. Sometimes the other
speaker asks first (that question carries no fact; the answer turn is the evidence).
Greetings, reactions, small talk and closings fill the remaining turns and carry no facts.
"""
from __future__ import annotations

import random

from . import pools
from .world import Event, SessionPlan, fmt_date, fmt_session


def art(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# First-person statements, keyed by (slot, kind) with kind in intro | news | update | delete.
_SAY = {
    ("city", "intro"): ("I live in {v}.", "I'm based in {v}.", "Home for me is {v}."),
    ("city", "update"): ("I moved to {v} {when}!", "Big news: I moved to {v} {when}."),
    ("job", "intro"): ("I work as {a} {v}.", "I'm {a} {v}."),
    ("job", "news"): ("I started a new job as {a} {v} {when}.", "I began working as {a} {v} {when}."),
    ("job", "delete"): ("I quit my job as {a} {v} {when}.", "I left my {v} job {when}."),
    ("partner", "intro"): ("I'm dating someone named {v}.", "I have a partner, {v}."),
    ("partner", "news"): ("I started dating {v} {when}.", "{v} and I got together {when}."),
    ("partner", "delete"): ("{v} and I broke up {when}.", "I split up with {v} {when}."),
    ("car", "intro"): ("I drive {a} {v}.", "My car is {a} {v}."),
    ("car", "news"): ("I bought {a} {v} {when}.", "I got a new car {when}, {a} {v}."),
    ("car", "delete"): ("I sold my {v} {when}.", "I got rid of my {v} {when}."),
    ("food", "intro"): ("My favourite food is {v}.", "I love {v}, it's my favourite food."),
    ("food", "update"): ("My new favourite food is {v}.", "These days {v} is my favourite food."),
    ("book", "intro"): ("I'm reading {v} at the moment.", "I'm in the middle of reading {v}."),
    ("book", "update"): ("I just started reading {v}.", "I'm on a new book, {v}."),
    ("pet", "intro"): ("I have {a} {s} named {n}.", "My {s} {n} keeps me busy."),
    ("pet", "news"): ("I adopted {a} {s} named {n} {when}!", "I brought home {a} {s} {when}. I named it {n}."),
    ("pet", "died"): ("Sad news: my {s} {n} died {when}.", "My {s} {n} passed away {when}."),
    ("pet", "rehomed"): ("I had to rehome my {s} {n} {when}.", "My {s} {n} went to a new family {when}."),
    ("hobby", "intro"): ("I'm really into {v}.", "In my free time I do {v}."),
    ("hobby", "news"): ("I took up {v} {when}.", "I started {v} {when}, it's fun."),
    ("hobby", "delete"): ("I gave up {v}, it was not for me.", "I stopped doing {v}."),
}
_SAY[("car", "update")] = _SAY[("car", "news")]
_SAY[("job", "update")] = _SAY[("job", "news")]

# Third-person gold facts: subject named, absolute dates.
_FACT = {
    ("city", "intro"): "{P} lives in {v}.",
    ("city", "update"): "{P} moved to {v} on {d}.",
    ("job", "intro"): "{P} works as {a} {v}.",
    ("job", "news"): "{P} started a new job as {a} {v} on {d}.",
    ("job", "update"): "{P} started a new job as {a} {v} on {d}.",
    ("job", "delete"): "{P} quit the job as {a} {v} on {d}.",
    ("partner", "intro"): "{P} is dating {v}.",
    ("partner", "news"): "{P} started dating {v} on {d}.",
    ("partner", "delete"): "{P} and {v} broke up on {d}.",
    ("car", "intro"): "{P} drives {a} {v}.",
    ("car", "news"): "{P} bought {a} {v} on {d}.",
    ("car", "update"): "{P} got a new car, {a} {v}, on {d}.",
    ("car", "delete"): "{P} sold the {v} on {d}.",
    ("food", "intro"): "{P}'s favourite food is {v}.",
    ("food", "update"): "{P}'s favourite food is now {v}.",
    ("book", "intro"): "{P} is reading {v}.",
    ("book", "update"): "{P} started reading {v}.",
    ("pet", "intro"): "{P} has {a} {s} named {n}.",
    ("pet", "news"): "{P} adopted {a} {s} named {n} on {d}.",
    ("pet", "died"): "{P}'s {s} {n} died on {d}.",
    ("pet", "rehomed"): "{P} rehomed the {s} {n} on {d}.",
    ("hobby", "intro"): "{P} is into {v}.",
    ("hobby", "news"): "{P} took up {v} on {d}.",
    ("hobby", "delete"): "{P} gave up {v}.",
}

_ASK_INTRO = {
    "city": "Where are you living these days?", "job": "What do you do for work?",
    "partner": "Are you seeing anyone?", "car": "What do you drive?",
    "food": "What's your favourite food?", "book": "Are you reading anything?",
    "pet": "Do you have any pets?", "hobby": "What do you do for fun?",
}


def _form(ev: Event) -> str:
    if ev.op == "DELETE":
        return ev.cause if ev.slot == "pet" else "delete"
    if ev.intro:
        return "intro"
    return "update" if ev.op == "UPDATE" else "news"


def _fill(tmpl: str, ev: Event, person: str) -> str:
    v = ev.value
    return tmpl.format(P=person, v=v, a=art(v if ev.slot != "pet" else ev.species or ""),
                       s=ev.species, n=ev.item, when=ev.when,
                       d=fmt_date(ev.date) if ev.date else "")


def statement(rng: random.Random, ev: Event) -> str:
    return _fill(rng.choice(_SAY[(ev.slot, _form(ev))]), ev, ev.owner)


def gold_fact(ev: Event) -> str:
    return _fill(_FACT[(ev.slot, _form(ev))], ev, ev.owner)


def gold_op(ev: Event) -> dict:
    op = {"session": ev.session, "dia_id": ev.dia_id, "op": ev.op, "key": ev.key,
          "speaker": ev.owner, "content": gold_fact(ev)}
    if ev.op != "DELETE":
        op["value"] = ev.value
    return op


def _reaction(rng: random.Random, ev: Event) -> str:
    if ev.op != "DELETE":
        return rng.choice(pools.REACT_GOOD)
    return rng.choice(pools.REACT_SAD if ev.slot in ("pet", "partner") else pools.REACT_MEH)


def render_session(rng: random.Random, plan: SessionPlan, speakers: tuple[str, str],
                   turns: int) -> tuple[list[dict], dict[str, list[str]], list[dict]]:
    """Turns for one session; assigns dia_ids to plan.events; returns (turns, facts, ops)."""
    first = plan.first_speaker
    second = speakers[1] if first == speakers[0] else speakers[0]
    speaker_at = {j: first if j % 2 else second for j in range(1, turns + 1)}
    texts: dict[int, str] = {}
    kinds: dict[int, str] = {}
    fact_at: dict[int, Event] = {}
    for who in speakers:
        mine = [e for e in plan.events if e.owner == who]
        slots = [j for j in range(2, turns + 1) if speaker_at[j] == who]
        for j, ev in zip(sorted(rng.sample(slots, len(mine))), mine):
            fact_at[j] = ev
    for j in sorted(fact_at):
        ev = fact_at[j]
        ev.dia_id = f"D{plan.index}:{j}"
        texts[j], kinds[j] = statement(rng, ev), "fact"
        if j - 1 >= 2 and j - 1 not in texts and rng.random() < 0.4:
            texts[j - 1] = _ASK_INTRO[ev.slot] if ev.intro else rng.choice(pools.GENERIC_ASKS)
            kinds[j - 1] = "ask"
    for j in sorted(fact_at):
        if j + 1 <= turns and j + 1 not in texts and j + 1 not in fact_at and rng.random() < 0.6:
            texts[j + 1], kinds[j + 1] = _reaction(rng, fact_at[j]), "react"
    texts[1], kinds[1] = rng.choice(pools.GREETINGS), "greet"
    if 2 not in texts and turns >= 2:
        texts[2], kinds[2] = rng.choice(pools.GREETING_REPLIES), "greet"
    if turns >= 4 and turns not in texts and rng.random() < 0.7:
        texts[turns], kinds[turns] = rng.choice(pools.CLOSINGS), "close"
    for j in range(1, turns + 1):
        if j not in texts:
            opener = kinds.get(j - 1) != "opener"
            texts[j] = rng.choice(pools.OPENERS if opener else pools.REPLIES)
            kinds[j] = "opener" if opener else "reply"
    out = []
    for j in range(1, turns + 1):
        who = speaker_at[j]
        other = second if who == first else first
        out.append({"speaker": who, "dia_id": f"D{plan.index}:{j}",
                    "text": texts[j].replace("{other}", other)})
    evs = [fact_at[j] for j in sorted(fact_at)]
    facts = {ev.dia_id: [gold_fact(ev)] for ev in evs}
    return out, facts, [gold_op(ev) for ev in evs]


def render_conversation(rng: random.Random, plans: list[SessionPlan], speakers: tuple[str, str],
                        turns: int) -> tuple[dict, dict]:
    conv: dict = {"speaker_a": speakers[0], "speaker_b": speakers[1]}
    facts: dict[str, list[str]] = {}
    ops: list[dict] = []
    for plan in plans:
        turns_out, f, o = render_session(rng, plan, speakers, turns)
        conv[f"session_{plan.index}_date_time"] = fmt_session(plan.time)
        conv[f"session_{plan.index}"] = turns_out
        facts.update(f)
        ops.extend(o)
    return conv, {"facts": facts, "operations": ops}
