"""The engine interface every rollout and answer-agent engine implements.

An engine turns token-id prompts into sampled token ids with the behaviour policy's logprob of
every generated token, and can take new weights in place, recording the policy version it holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None  # request i of a generate call samples with seed + i; None: unseeded


@dataclass(slots=True)
class Generation:
    token_ids: list[int]
    # Logprob of each generated token under the model's raw distribution (temperature 1, no top-p),
    # the same quantity the learner recomputes, so the PPO ratio compares like with like.
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True, slots=True)
class Request:
    """One generation a lane asks for; spec.seed is this request's own seed (no offset added)."""

    prompt: list[int]
    spec: SamplingSpec


class Engine(Protocol):
    name: str  # "vllm" | "transformers"
    policy_version: int

    def chat_prompt(self, system: str, user: str) -> list[int]:
        """Token ids of a chat with one system and one user message, ready for the reply."""
        ...

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Generation]: ...

    # Continuous batching (actors.engines.scheduler): requests join and leave between steps.
    def add_request(self, request_id: str, request: Request) -> None: ...

    def step(self) -> list[tuple[str, Generation]]:
        """Advance every request in flight by one engine step; the ones that finished."""
        ...

    def abort(self, request_ids: list[str]) -> None: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace the weights in place with a Hugging Face-named state dict; record `version`."""
        ...

    def weight_fingerprint(self) -> str:
        """A digest of the weights as held; equal digests mean bit-identical weights."""
        ...


class OneByOneSteps:
    """Continuous batching's interface for an engine that has none (the transformers fallback):
    a step generates every queued request, one call each, so each keeps its own seed exactly."""

    def add_request(self, request_id: str, request: Request) -> None:
        self.__dict__.setdefault("_queued", {})[request_id] = request

    def step(self) -> list[tuple[str, Generation]]:
        queued, self._queued = self.__dict__.get("_queued", {}), {}
        return [(rid, self.generate([r.prompt], r.spec)[0]) for rid, r in queued.items()]

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.__dict__.get("_queued", {}).pop(rid, None)
