"""People, session dates and the event timeline of one synthetic conversation.

A person has single-valued slots (city, job, partner, car, food, book) and multi-valued
ones (pets and hobbies, one key per item). Each planned Event is one fact stated in one
dialogue turn and maps to exactly one gold memory operation (INSERT / UPDATE / DELETE).
"""
from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from . import pools

SINGLE_SLOTS = ("city", "job", "partner", "car", "food", "book")
UPDATABLE = ("city", "job", "car", "food", "book")  # value can change in place (UPDATE)
DELETABLE = ("job", "car", "partner")  # can stop being true (DELETE)
DATED_UPDATES = ("city", "job", "car")  # changes that happen on a day worth asking about
MAX_PETS, MAX_HOBBIES = 3, 4


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def fmt_date(d: dt.date) -> str:
    return f"{d.day} {pools.MONTHS[d.month - 1]}, {d.year}"


def fmt_session(t: dt.datetime) -> str:
    """LoCoMo's session stamp, e.g. '1:56 pm on 8 May, 2023' (locale-independent)."""
    hour12 = t.hour % 12 or 12
    return f"{hour12}:{t.minute:02d} {'am' if t.hour < 12 else 'pm'} on {fmt_date(t.date())}"


@dataclass
class Event:
    session: int
    owner: str
    slot: str  # one of SINGLE_SLOTS, or "pet" / "hobby"
    op: str  # INSERT | UPDATE | DELETE
    value: str  # new value (INSERT/UPDATE) or the value that stops being true (DELETE)
    item: str | None = None  # pet name or hobby for multi-valued slots
    species: str | None = None
    cause: str | None = None  # pets: "died" | "rehomed"
    date: dt.date | None = None  # absolute event date when the dialogue dates it
    when: str | None = None  # the relative phrase the dialogue uses for `date`
    intro: bool = False  # stated as a standing fact ("I live in X"), not as news
    dia_id: str | None = None

    @property
    def key(self) -> str:
        base = f"{slug(self.owner)}.{self.slot}"
        return f"{base}.{slug(self.item)}" if self.item else base


@dataclass
class SessionPlan:
    index: int
    time: dt.datetime
    first_speaker: str
    events: list[Event]


class _Person:
    def __init__(self, name: str):
        self.name = name
        self.single: dict[str, str | None] = {s: None for s in SINGLE_SLOTS}
        self.used: dict[str, set[str]] = {s: set() for s in SINGLE_SLOTS + ("hobby",)}
        self.pets: dict[str, str] = {}  # name -> species
        self.hobbies: list[str] = []


def session_times(rng: random.Random, sessions: int) -> list[dt.datetime]:
    day = dt.date(2022, 1, 1) + dt.timedelta(days=rng.randint(0, 540))
    out = []
    for i in range(sessions):
        if i:
            day += dt.timedelta(days=rng.randint(3, 21))
        out.append(dt.datetime(day.year, day.month, day.day, rng.randint(8, 21), rng.randint(0, 59)))
    return out


def _when(rng: random.Random, today: dt.date, max_back: int) -> tuple[dt.date, str]:
    back = rng.randint(0, max(0, max_back))
    d = today - dt.timedelta(days=back)
    choices = {0: ["today"], 1: ["yesterday"], 2: ["two days ago"], 3: ["three days ago"]}.get(back, [])
    if 2 <= back <= 6:
        choices.append(f"on {pools.WEEKDAYS[d.weekday()]}")
    choices.append(f"on {d.day} {pools.MONTHS[d.month - 1]}")
    return d, rng.choice(choices)


def _fresh(rng: random.Random, pool, used: set[str]) -> str | None:
    left = [v for v in pool if v not in used]
    return rng.choice(left) if left else None


def _book(rng: random.Random, used: set[str]) -> str | None:
    for _ in range(20):
        title = f"The {rng.choice(pools.BOOK_ADJ)} {rng.choice(pools.BOOK_NOUN)}"
        if title not in used:
            return title
    return None


_POOLS = {"city": pools.CITIES, "job": pools.JOBS, "partner": pools.PARTNER_NAMES,
          "car": pools.CARS, "food": pools.FOODS}


def _options(p: _Person, first_session: bool, taken: set[str]) -> list[tuple[float, str, str]]:
    """(weight, slot, op) choices for person p; `taken` holds keys already used this session."""
    opts = []
    me = slug(p.name)
    for s in SINGLE_SLOTS:
        if f"{me}.{s}" in taken:
            continue
        cur = p.single[s]
        if cur is None:
            opts.append((3.0 if first_session else (1.5 if not p.used[s] else 1.0), s, "INSERT"))
        elif not first_session:
            if s in UPDATABLE:
                opts.append((1.5, s, "UPDATE"))
            if s in DELETABLE:
                opts.append((0.7, s, "DELETE"))
    if len(p.pets) < MAX_PETS:
        opts.append((1.0, "pet", "INSERT"))
    if p.pets and not first_session:
        opts.append((0.6, "pet", "DELETE"))
    if len(p.hobbies) < MAX_HOBBIES:
        opts.append((1.0, "hobby", "INSERT"))
    if p.hobbies and not first_session:
        opts.append((0.5, "hobby", "DELETE"))
    return opts


def _make_event(rng, p: _Person, slot: str, op: str, s_idx: int, today: dt.date, max_back: int,
                used_pet_names: set[str], taken: set[str]) -> Event | None:
    first = s_idx == 1
    ev = Event(session=s_idx, owner=p.name, slot=slot, op=op, value="")
    if slot in SINGLE_SLOTS:
        if op == "DELETE":
            ev.value = p.single[slot]
            p.single[slot] = None
        else:
            new = _book(rng, p.used[slot]) if slot == "book" else _fresh(rng, _POOLS[slot], p.used[slot])
            if new is None:
                return None
            ev.value = new
            p.single[slot] = new
            p.used[slot].add(new)
            # first statement of a slot is a standing fact; partners may be news even then
            ev.intro = op == "INSERT" and (first or not p.used[slot] - {new}) and not (
                slot == "partner" and rng.random() < 0.5)
        dated = op == "DELETE" or (op == "UPDATE" and slot in DATED_UPDATES) or (
            op == "INSERT" and not ev.intro)
    elif slot == "pet":
        if op == "INSERT":
            name = _fresh(rng, pools.PET_NAMES, used_pet_names)
            if name is None:
                return None
            used_pet_names.add(name)
            ev.item, ev.species = name, rng.choice(pools.SPECIES)
            ev.value = ev.species
            p.pets[name] = ev.species
            ev.intro = first and rng.random() < 0.5
        else:
            free = [n for n in sorted(p.pets) if f"{slug(p.name)}.pet.{slug(n)}" not in taken]
            if not free:
                return None
            name = rng.choice(free)
            ev.item, ev.species = name, p.pets.pop(name)
            ev.value, ev.cause = ev.species, rng.choice(("died", "rehomed"))
        dated = not ev.intro
    else:  # hobby
        if op == "INSERT":
            h = _fresh(rng, pools.HOBBIES, p.used["hobby"])
            if h is None:
                return None
            p.used["hobby"].add(h)
            p.hobbies.append(h)
            ev.intro = first and rng.random() < 0.5
        else:
            free = [h for h in p.hobbies if f"{slug(p.name)}.hobby.{slug(h)}" not in taken]
            if not free:
                return None
            h = rng.choice(free)
            p.hobbies.remove(h)
        ev.item = ev.value = h
        dated = op == "INSERT" and not ev.intro
    if dated:
        ev.date, ev.when = _when(rng, today, max_back)
    return ev


def plan_timeline(rng: random.Random, speakers: tuple[str, str], sessions: int,
                  turns_per_session: int, facts_per_session: int) -> list[SessionPlan]:
    """Pick per session which facts get stated, by whom, respecting turn capacity.

    Turn 1 of a session is a greeting by the first speaker; facts go in turns 2..N, so the
    first speaker has the odd turns 3,5,.. and the other speaker the even turns 2,4,...
    Session 1 opens with a city and later sessions lead with a move until one happened, so
    any world of two or more sessions has a changed value to ask about.
    """
    people = {n: _Person(n) for n in speakers}
    used_pet_names: set[str] = set()
    plans = []
    moved = False  # has any city changed yet?
    times = session_times(rng, sessions)
    for i, t in enumerate(times, start=1):
        first_speaker = rng.choice(speakers)
        other = speakers[1] if first_speaker == speakers[0] else speakers[0]
        cap = {first_speaker: len(range(3, turns_per_session + 1, 2)),
               other: len(range(2, turns_per_session + 1, 2))}
        max_back = 6 if i == 1 else (t.date() - times[i - 2].date()).days - 1
        taken: set[str] = set()
        events: list[Event] = []
        for k in range(facts_per_session):
            owners = [n for n in speakers if cap[n] > 0]
            if not owners:
                break
            lead = k == 0 and (i == 1 or not moved)
            if lead and i > 1:  # until someone has moved, lead with a move (never deleted)
                housed = [n for n in owners if people[n].single["city"] is not None]
                owners = housed or owners
            owner = people[rng.choice(owners)]
            opts = _options(owner, i == 1, taken)
            tries = [opts]
            if lead:
                tries.insert(0, [o for o in opts if o[1] == "city" and o[2] != "DELETE"])
            ev = None
            for opts in tries:
                while opts and ev is None:
                    _, slot, op = rng.choices(opts, weights=[o[0] for o in opts])[0]
                    ev = _make_event(rng, owner, slot, op, i, t.date(), max_back,
                                     used_pet_names, taken)
                    opts = [o for o in opts if (o[1], o[2]) != (slot, op)]
                if ev is not None:
                    break
            if ev is None:
                continue
            taken.add(ev.key)
            moved = moved or (ev.slot == "city" and ev.op == "UPDATE")
            cap[owner.name] -= 1
            events.append(ev)
        plans.append(SessionPlan(index=i, time=t, first_speaker=first_speaker, events=events))
    return plans
