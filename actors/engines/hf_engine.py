"""The transformers fallback engine: batched `model.generate`, slow but dependency-free."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from actors.engines.base import Generation, OneByOneSteps, SamplingSpec
from actors.engines.models import ChatEngineBase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine(OneByOneSteps, ChatEngineBase):
    name = "transformers"

    def __init__(self, model_dir: str | Path, seed: int = 0, max_model_len: int = 4096, dtype: str = "auto",
                 device: str | None = None):
        from transformers import AutoModelForCausalLM, GenerationConfig

        super().__init__(model_dir, max_model_len)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]  # auto: the checkpoint's dtype
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch_dtype).to(self.device).eval()
        # A neutral generation config, as the vLLM engine uses: sampling defaults saved with a
        # checkpoint (repetition_penalty, top_k, ...) would otherwise change the behaviour policy.
        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        # generate() has no generator argument; a private generator would need re-implementing
        # sampling, so seed the global RNG once here and per call when the spec has a seed.
        torch.manual_seed(seed)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Generation]:
        if not prompts:
            return []
        budgets = [self._budget(p, spec.max_new_tokens) for p in prompts]
        width = max(len(p) for p in prompts)
        # Left padding, so every row's next token sits in the last column.
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        if spec.seed is not None:
            torch.manual_seed(spec.seed)
        # top_k=0 switches off transformers' global default top_k=50.
        sampling = (dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0)
                    if spec.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max(budgets),
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
            # output_logits are the raw logits, before temperature/top-p: the learner's quantity.
            output_logits=True, return_dict_in_generate=True, **sampling,
        )
        new = out.sequences[:, width:]
        logits = torch.stack(out.logits, dim=1).float()
        lps = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return [self._finish(new[i].tolist(), lps[i].tolist(), budgets[i]) for i in range(len(prompts))]

    def weight_fingerprint(self) -> str:
        return self.fingerprint(self.model.state_dict().items())

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        state = dict(weights)
        # A tied checkpoint may arrive with or without lm_head.weight; either way is complete.
        strict = not self.model.config.tie_word_embeddings
        missing, unexpected = self.model.load_state_dict(state, strict=strict)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise ValueError(f"weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.policy_version = version
