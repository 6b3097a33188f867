"""A scripted engine for exact tests of episode logic (real engines are tested in test_engines.py).

Each distinct chat prompt gets one token id, so a test can map prompts back to their text, and a
`respond(system, user, lane)` function decides the reply; `lane` is the request's position among
those one engine step finishes (or in a generate call). It steps the way a continuous-batching
engine does: each step finishes every request in flight, so while lanes stay aligned (same number
of calls each), position i is lane i.
"""

from __future__ import annotations

from actors.engines.base import Generation, Request, SamplingSpec


class ScriptedEngine:
    name = "scripted"

    def __init__(self, respond) -> None:
        self.respond = respond
        self.policy_version = 0
        self.texts: list[tuple[str, str]] = []
        self.calls: list[int] = []  # batch size of every generate call or engine step
        self.seeds: list[int | None] = []  # a generate call's seed, or each stepped request's
        self._queued: dict[str, Request] = {}

    def chat_prompt(self, system: str, user: str) -> list[int]:
        self.texts.append((system, user))
        return [len(self.texts) - 1]

    def generate(self, prompts, spec: SamplingSpec) -> list[Generation]:
        self.seeds.append(spec.seed)
        self.calls.append(len(prompts))
        return [self._reply(prompt, lane) for lane, prompt in enumerate(prompts)]

    def add_request(self, request_id: str, request: Request) -> None:
        self._queued[request_id] = request

    def step(self) -> list[tuple[str, Generation]]:
        queued, self._queued = self._queued, {}
        self.calls.append(len(queued))
        out = []
        for lane, (rid, request) in enumerate(queued.items()):
            self.seeds.append(request.spec.seed)
            out.append((rid, self._reply(request.prompt, lane)))
        return out

    def abort(self, request_ids) -> None:
        for rid in request_ids:
            self._queued.pop(rid, None)

    def _reply(self, prompt, lane: int) -> Generation:
        text = self.respond(*self.texts[prompt[0]], lane)
        ids = list(range(1, len(text.split()) + 1))
        return Generation(ids, [-0.5] * len(ids), text, "stop")

    def load_weights(self, weights, version: int) -> None:
        self.policy_version = version
