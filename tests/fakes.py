"""A scripted engine for exact tests of episode logic (real engines are tested in test_engines.py).

Each distinct chat prompt gets one token id, so a test can map prompts back to their text, and a
`respond(system, user, lane)` function decides the reply; `lane` is the prompt's position in the
batched generate call, which in lockstep episodes is the lane (rollout or branch) index.
"""

from __future__ import annotations

from actors.engines.base import Generation, SamplingSpec


class ScriptedEngine:
    name = "scripted"

    def __init__(self, respond) -> None:
        self.respond = respond
        self.policy_version = 0
        self.texts: list[tuple[str, str]] = []
        self.calls: list[int] = []  # batch size of every generate call
        self.seeds: list[int | None] = []

    def chat_prompt(self, system: str, user: str) -> list[int]:
        self.texts.append((system, user))
        return [len(self.texts) - 1]

    def generate(self, prompts, spec: SamplingSpec) -> list[Generation]:
        self.seeds.append(spec.seed)
        self.calls.append(len(prompts))
        out = []
        for lane, prompt in enumerate(prompts):
            text = self.respond(*self.texts[prompt[0]], lane)
            ids = list(range(1, len(text.split()) + 1))
            out.append(Generation(ids, [-0.5] * len(ids), text, "stop"))
        return out

    def load_weights(self, weights, version: int) -> None:
        self.policy_version = version
