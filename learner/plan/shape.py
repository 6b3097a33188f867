"""A decoder's shape from its `config.json`: what the planner needs to count bytes.

Counted for the Llama / Qwen2 / Mistral family (RMSNorm, rotary attention with grouped KV heads,
a SwiGLU MLP), which every model this project runs belongs to. A hub id whose config is neither
local nor given (`--model-config`) is looked up in KNOWN: public architecture numbers, so the
paper's setting can be planned on a machine that never reaches the hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Qwen2.5-7B(-Instruct)'s published config.json, the fields the planner reads.
_QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
    "vocab_size": 152064, "tie_word_embeddings": False, "max_position_embeddings": 32768,
}
KNOWN = {"Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B, "Qwen/Qwen2.5-7B": _QWEN25_7B}
_BIASED_QKV = ("Qwen2ForCausalLM",)  # q, k and v projections carry biases


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, name: str, c: dict) -> ModelShape:
        try:
            heads = c["num_attention_heads"]
            return cls(name, c["hidden_size"], c["num_hidden_layers"], heads, c.get("num_key_value_heads", heads),
                       c.get("head_dim") or c["hidden_size"] // heads, c["intermediate_size"], c["vocab_size"],
                       bool(c.get("tie_word_embeddings", False)),
                       any(a in _BIASED_QKV for a in c.get("architectures", [])) or bool(c.get("attention_bias")))
        except KeyError as err:
            raise ValueError(f"model {name}: config.json has no {err.args[0]}") from None

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, kv, q = self.hidden, self.kv_dim, self.heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h  # SwiGLU MLP, two RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        heads = 1 if self.tied else 2  # input embedding, and the LM head unless tied to it
        return self.layers * self.layer_params + heads * self.embedding_params + self.hidden

    def trainable_params(self, frozen_layers: int) -> int:
        """learner.engine.freeze_lower_layers: the embedding and the lowest layers stay fixed."""
        if frozen_layers <= 0:
            return self.params
        if frozen_layers >= self.layers:
            raise ValueError(f"learner.frozen_layers={frozen_layers} leaves nothing to train: {self.name} has {self.layers} layers")
        lm_head = 0 if self.tied else self.embedding_params
        return (self.layers - frozen_layers) * self.layer_params + lm_head + self.hidden

    @property
    def largest_module_params(self) -> int:
        """What ZeRO-3 gathers at once at most: a decoder layer or the embedding."""
        return max(self.layer_params, self.embedding_params)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_dim * 2  # K and V, every layer, 16-bit


def load_shape(name: str, model_config: str | None = None) -> ModelShape:
    """From --model-config, a local folder, the embedded builders, the local hub cache, KNOWN, or
    the hub itself where it answers."""
    if model_config:
        return ModelShape.from_config(name, _read(Path(model_config)))
    from actors.engines.models import BUILDERS, resolve_model

    folder = Path(name).expanduser()
    if name in BUILDERS:
        folder = resolve_model(name)
    if (folder / "config.json").is_file():
        return ModelShape.from_config(name, _read(folder / "config.json"))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return ModelShape.from_config(name, _read(Path(cached)))
    if name in KNOWN:
        return ModelShape.from_config(name, KNOWN[name])
    fetched = _from_hub(name)
    if fetched is not None:
        return ModelShape.from_config(name, _read(fetched))
    raise ValueError(f"model {name}: no config.json here, in the hub cache or from the hub; pass --model-config FILE")


def _from_hub(name: str) -> Path | None:
    """config.json alone (a few KB) where a hub answers; None offline or unknown."""
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(hf_hub_download(name, "config.json", etag_timeout=5))
    except Exception:  # noqa: BLE001 - unreachable, unknown or gated: the caller says what to do
        return None


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"model config {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"model config {path}: not valid JSON") from None
