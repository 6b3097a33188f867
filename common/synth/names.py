"""Speaker names, distinct across a world and independent of how many conversations it has."""
from __future__ import annotations

import random

from . import pools


def speaker_names(seed: int, index: int) -> tuple[str, str]:
    """Names of conversation `index`'s two speakers in the world of `seed`.

    A seed-wide shuffle of the pools gives person k = 2*index + j a first name; the first
    len(FIRST_NAMES) people get bare first names, later ones first + last name. The last name
    index (k // F + k) mod L differs for equal first names because L is prime and does not
    divide F + 1, so all names are distinct up to F * L people (3,280, i.e. 1,640 conversations)
    and within a conversation always.
    """
    rng = random.Random(f"memr2-synth-names:{seed}")
    first = list(pools.FIRST_NAMES)
    last = list(pools.LAST_NAMES)
    rng.shuffle(first)
    rng.shuffle(last)
    n_first, n_last = len(first), len(last)

    def name(k: int) -> str:
        if k < n_first:
            return first[k]
        return f"{first[k % n_first]} {last[(k // n_first + k) % n_last]}"

    return name(2 * index), name(2 * index + 1)
