"""generate_world / write_world: seeded synthetic multi-session conversations in LoCoMo's schema."""
from __future__ import annotations

import json
import os
import random

from .dialogue import render_conversation
from .names import speaker_names
from .questions import build_qa
from .world import plan_timeline


def _check(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _validate(conversations, sessions, seed, turns_per_session, facts_per_session) -> None:
    _check("conversations", conversations, 1)
    _check("sessions", sessions, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    _check("turns_per_session", turns_per_session, 2)
    _check("facts_per_session", facts_per_session, 1)
    if facts_per_session > turns_per_session - 1:
        raise ValueError(f"facts_per_session must be <= turns_per_session - 1 "
                         f"(turn 1 is a greeting), got {facts_per_session} with "
                         f"turns_per_session={turns_per_session}")


def generate_conversation(seed: int, index: int, sessions: int, turns_per_session: int,
                          facts_per_session: int) -> dict:
    """Conversation `index` of the world `seed`; depends only on (seed, index, sizes)."""
    rng = random.Random(f"memr2-synth:{seed}:{index}")
    speakers = speaker_names(seed, index)
    plans = plan_timeline(rng, speakers, sessions, turns_per_session, facts_per_session)
    conversation, gold = render_conversation(rng, plans, speakers, turns_per_session)
    qa = build_qa(rng, plans, speakers)
    return {"sample_id": f"synth-{seed}-{index}", "conversation": conversation, "qa": qa,
            "gold": gold}


def generate_world(conversations: int, sessions: int, seed: int, turns_per_session: int = 10,
                   facts_per_session: int = 3) -> list[dict]:
    """A list of LoCoMo-schema conversations plus exact gold facts and memory operations."""
    _validate(conversations, sessions, seed, turns_per_session, facts_per_session)
    return [generate_conversation(seed, i, sessions, turns_per_session, facts_per_session)
            for i in range(conversations)]


def write_world(path, conversations: int, sessions: int, seed: int, turns_per_session: int = 10,
                facts_per_session: int = 3) -> list[dict]:
    """generate_world(...) and json.dump it to `path` (same arguments -> same bytes)."""
    world = generate_world(conversations, sessions, seed, turns_per_session, facts_per_session)
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(world, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return world
