"""`memr2 plan`: what a config needs, before anything starts (GB = 10^9 bytes).

    plan = make_plan(cfg, gpu_memory_gb=80)   # GPUs per role, bytes per GPU by component, disk
    check_plan(plan)                          # ValueError naming the component that does not fit

`memr2 train` runs both first. The learner and engine figures come from learner.plan.memory;
checkpoints and weight syncs are counted here. With cluster.colocate the plan has two more keys:
"phases" (a GPU's update and rollout phases, learner rank i and engine i on GPU i) and
"colocate" (learner.offload_states resolved, the host memory that offload and sleep need).
"""

from __future__ import annotations

from pathlib import Path

import torch

from actors.agent.prompts import context_tokens
from actors.fleet.scaling import autoscale_bounds
from common.config import Config
from learner.engine import resolve_on_off
from learner.plan import memory as mem
from learner.plan.shape import ModelShape, load_shape
from learner.run_outputs import checkpoint_disk_peak_files

GB = mem.GB


def make_plan(cfg: Config, gpu_memory_gb: float | None = None, model_config: str | None = None) -> dict:
    shape = load_shape(cfg.model.name, model_config)
    if gpu_memory_gb is None and torch.cuda.is_available():
        gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / GB
    prompts = _prompts(cfg)
    learner = _learner_role(cfg, shape, gpu_memory_gb, prompts)
    rollout = _rollout_role(cfg, shape, gpu_memory_gb)
    checkpoint, disk = _disk(cfg, shape, learner["bf16"])
    colocated = cfg.cluster.colocate
    plan = {
        "model": {"name": shape.name, "params": shape.params,
                  "trainable_params": shape.trainable_params(cfg.learner.frozen_layers)},
        "gpu_memory_gb": gpu_memory_gb,
        # colocated, rollout workers share the learner's GPUs: a fixed fleet, one worker a GPU
        "gpus_total": learner["gpus"] + (0 if colocated else rollout["gpus"]),
        "gpus_total_max": learner["gpus"] + (0 if colocated else rollout["gpus_max"]),
        "roles": {"learner": learner, "rollout": rollout, "external": _external(cfg)},
        "checkpoint_gb": checkpoint / GB,
        "checkpoint_disk_peak_gb": disk / GB,
        "weight_sync_gb": (4 if cfg.model.dtype == "float32" else 2) * shape.params / GB,
        "context_tokens": context_tokens(cfg),
        "prompts": prompts,
    }
    if colocated:
        plan["colocate"], plan["phases"] = _colocate(cfg, shape, learner, rollout, gpu_memory_gb)
    plan["fits"] = None if gpu_memory_gb is None else not _problems(plan)
    return plan


def check_plan(plan: dict) -> None:
    """Stop in one line when a GPU role does not fit, naming its largest component."""
    problems = _problems(plan)
    if problems:
        raise ValueError(f"plan ({plan['model']['name']} on {plan['gpu_memory_gb']:g} GB GPUs): {problems[0]}")


def _learner_role(cfg: Config, shape: ModelShape, gpu_gb: float | None, prompts: dict) -> dict:
    from learner.deepspeed_learner import rank_resources
    from learner.engine import resolve_bf16

    lc = cfg.learner
    gpus = rank_resources(lc)["GPU"]
    on_gpu = gpus > 0
    bf16 = resolve_bf16(lc.bf16) if not on_gpu or lc.bf16 != "auto" else True
    checkpointing = resolve_on_off(lc.gradient_checkpointing, on_gpu)
    micros = mem.micro_batch_candidates(cfg, prompts["shortest_tokens"])
    micro, _ = mem.largest_activations(shape, micros, checkpointing, bf16, lc.frozen_layers)
    parts = mem.learner_components(cfg, shape, micro, bf16, checkpointing)
    _, without = mem.largest_activations(shape, micros, not checkpointing, bf16, lc.frozen_layers)
    peak = mem.learner_peak(parts)
    if on_gpu:
        parts |= mem.gpu_allowance(peak)
        peak += parts["cuda_context_nccl"] + parts["fragmentation"]
    colocated = cfg.cluster.colocate
    return {
        "gpus": (lc.num_ranks if on_gpu else 0) if colocated else int(round(lc.num_ranks * gpus)),
        "device": "gpu" if on_gpu else "cpu", "bf16": bf16,
        "per_gpu_gb": peak / GB, "components": {k: v / GB for k, v in parts.items()},
        "peak_rule": "every component but the smaller of gradients and activations (they do not coexist)",
        "gradient_checkpointing": checkpointing,
        f"activations_{'without' if checkpointing else 'with'}_checkpointing_gb": without / GB,
        "micro_batch": {"rows": micro.rows, "tokens": micro.tokens, "response_tokens": micro.response_tokens},
        "zero_stage": lc.zero_stage, "reference": lc.reference,
        "placement": ("one placement group, PACK: bundle i holds rank i and rollout worker i on one GPU" if colocated
                      else "one placement group, PACK: every rank on one node where they fit"),
        "fits_gpu_gb": gpu_gb,
    }


def _rollout_role(cfg: Config, shape: ModelShape, gpu_gb: float | None) -> dict:
    if cfg.cluster.colocate:  # a worker in every learner bundle, on its rank's GPU
        from learner.deepspeed_learner import rank_resources

        n, on_gpu = cfg.learner.num_ranks, rank_resources(cfg.learner)["GPU"] > 0
        role = {"workers": n, "gpus": n if on_gpu else 0, "gpus_min": n if on_gpu else 0, "gpus_max": n if on_gpu else 0,
                "device": "gpu" if on_gpu else "cpu", "shares_learner_gpus": True,
                "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization}
    else:
        lo, hi = autoscale_bounds(cfg)
        per = cfg.rollout.gpus_per_actor
        role = {"gpus": int(round(cfg.rollout.num_actors * per)), "gpus_min": int(round(lo * per)),
                "gpus_max": int(round(hi * per)), "device": "gpu" if per > 0 else "cpu",
                "gpu_memory_utilization": cfg.rollout.gpu_memory_utilization}
    if gpu_gb is None:  # the KV cache is what the engine's share leaves: unknown without a size
        role |= {"per_gpu_gb": None, "components": {"weights": 2 * shape.params / GB}, "kv_cache_tokens": None}
        return role
    parts, tokens = mem.engine_components(cfg, shape, gpu_gb)
    context = context_tokens(cfg)
    return role | {"per_gpu_gb": sum(parts.values()) / GB, "components": {k: v / GB for k, v in parts.items()},
                   "kv_cache_tokens": tokens, "full_context_sequences": tokens // context}


def _colocate(cfg: Config, shape: ModelShape, learner: dict, rollout: dict, gpu_gb: float | None) -> tuple[dict, dict | None]:
    """The colocated GPU's two phases (learner.plan.memory's docstring has the model), and
    learner.offload_states resolved: auto is on exactly when the rollout phase does not fit one GPU
    with the optimizer state and fp32 master resident. Phases need a GPU learner and a GPU size."""
    lc, rc = cfg.learner, cfg.rollout
    info = {"workers": lc.num_ranks, "sleep_level": rc.sleep_level, "offload_states": lc.offload_states,
            "offload_states_resolved": None, "engine_asleep_gb": mem.ENGINE_ASLEEP_GB, "host_memory": None, "notes": []}
    if learner["device"] != "gpu":  # no sleep mode on CPU, and no device memory to offload from
        info["offload_states_resolved"] = "off"
        info["notes"].append("on CPU the engine never sleeps and nothing is offloaded")
        return info, None
    parts = {k: v * GB for k, v in learner["components"].items()}

    def resident(offload: bool) -> dict[str, float]:
        kept = mem.learner_resident(cfg, shape, parts, learner["bf16"], offload)
        return {f"learner_{k}": v / GB for k, v in kept.items()}

    phases = None
    resolved = None if lc.offload_states == "auto" else lc.offload_states
    if gpu_gb is not None:
        engine = {"engine_awake": rollout["per_gpu_gb"]}
        if resolved is None:
            resolved = "on" if rollout["per_gpu_gb"] + sum(resident(False).values()) > gpu_gb else "off"
        update = {"learner_peak": learner["per_gpu_gb"], "engine_asleep": mem.ENGINE_ASLEEP_GB}
        awake = engine | resident(resolved == "on")
        phases = {name: {"components": c, "total_gb": sum(c.values()), "fits": sum(c.values()) <= gpu_gb}
                  for name, c in (("update", update), ("rollout", awake))}
    info["offload_states_resolved"] = resolved
    # Host memory (pinned): the offloaded states (counted unless off: auto without a GPU size may
    # resolve on) and the sleeping engine's pools. PACK puts the whole group on one node where it fits.
    host = {"learner_states": 0.0 if resolved == "off" else parts["optimizer"]} | mem.engine_host_bytes(cfg, shape)
    per_gpu = sum(host.values()) / GB
    info["host_memory"] = {"per_gpu": {k: v / GB for k, v in host.items()}, "per_gpu_gb": per_gpu,
                           "gpus_per_node": lc.num_ranks, "per_node_gb": per_gpu * lc.num_ranks}
    return info, phases


def _disk(cfg: Config, shape: ModelShape, bf16: bool) -> tuple[float, float]:
    """Bytes of one step checkpoint (ZeRO: the module in its training dtype, fp32 master and
    Adam moments of what trains) and the run folder's peak (learner.run_outputs counts them)."""
    module = (2 if bf16 else 4) * shape.params
    checkpoint = module + 12 * shape.trainable_params(cfg.learner.frozen_layers)
    files = checkpoint_disk_peak_files(cfg)
    return checkpoint, files["deepspeed_checkpoints"] * checkpoint + files["model_folders"] * module


def _external(cfg: Config) -> list[dict]:
    out = []
    agent = cfg.reward.answer_agent
    if agent.kind == "openai":
        out.append({"role": "answer agent", "url": agent.url, "model": agent.model})
    if cfg.eval.judge.url:
        out.append({"role": "judge", "url": cfg.eval.judge.url, "model": cfg.eval.judge.model})
    return out


def _problems(plan: dict) -> list[str]:
    gpu_gb = plan["gpu_memory_gb"]
    if gpu_gb is None:
        return []
    out = []
    learner = plan["roles"]["learner"]
    if plan.get("phases"):  # colocated: the update phase holds the learner's peak, the rollout phase the engine's share
        out += _phase_problems(plan)
    elif learner["device"] == "gpu" and learner["per_gpu_gb"] > gpu_gb:
        name, size = max(learner["components"].items(), key=lambda kv: kv[1])
        out.append(f"a learner rank needs {learner['per_gpu_gb']:.1f} GB; its largest part is {name}, "
                   f"{size:.1f} GB{_learner_hint(learner, name)}")
    rollout = plan["roles"]["rollout"]
    if rollout["device"] == "gpu" and rollout["kv_cache_tokens"] is not None and rollout["full_context_sequences"] < 1:
        out.append(f"a rollout engine's KV cache holds {rollout['kv_cache_tokens']} tokens, less than one context of "
                   f"{plan['context_tokens']} (weights {rollout['components']['weights']:.1f} GB; "
                   f"rollout.gpu_memory_utilization={rollout['gpu_memory_utilization']})")
    return out


def _learner_hint(learner: dict, name: str) -> str:
    return {"activations": f" (learner.gradient_checkpointing={'on' if learner['gradient_checkpointing'] else 'off'}, "
                           f"{learner['micro_batch']['tokens']} tokens a micro-batch)"}.get(name, "")


def _phase_problems(plan: dict) -> list[str]:
    """A colocated phase that does not fit, named with the part that decides it."""
    out = []
    update, awake = plan["phases"]["update"], plan["phases"]["rollout"]
    learner, co = plan["roles"]["learner"], plan["colocate"]
    if not update["fits"]:
        name, size = max(learner["components"].items(), key=lambda kv: kv[1])
        out.append(f"the colocated update phase needs {update['total_gb']:.1f} GB: a learner rank's peak "
                   f"{learner['per_gpu_gb']:.1f} GB, its largest part {name}, {size:.1f} GB"
                   f"{_learner_hint(learner, name)}, and the sleeping engine's {update['components']['engine_asleep']:.1f} GB")
    if not awake["fits"]:
        kept = {k.removeprefix("learner_"): v for k, v in awake["components"].items() if k.startswith("learner_")}
        name, size = max(kept.items(), key=lambda kv: kv[1])
        out.append(f"the colocated rollout phase needs {awake['total_gb']:.1f} GB: the awake engine's "
                   f"{awake['components']['engine_awake']:.1f} GB (rollout.gpu_memory_utilization="
                   f"{plan['roles']['rollout']['gpu_memory_utilization']}) and a learner rank's resident "
                   f"{sum(kept.values()):.1f} GB, "
                   f"its largest part {name}, {size:.1f} GB (learner.offload_states={co['offload_states']}"
                   f"{'' if co['offload_states'] != 'auto' else ' -> ' + co['offload_states_resolved']})")
    return out


def _tokenizer(cfg: Config):
    """(chat tokenizer, whose) for counting prompts: the model's own where its folder is here,
    else the embedded SmolLM2's if built (a proxy: an English BPE of a similar rate), else None."""
    from actors.engines.models import BUILDERS, ChatEngineBase, default_models_dir, resolve_model

    own = resolve_model(cfg.model.name) if cfg.model.name in BUILDERS else Path(cfg.model.name).expanduser()
    for folder, whose in ((own, cfg.model.name), (default_models_dir() / "smollm2", "smollm2 (proxy)")):
        if (folder / "tokenizer_config.json").is_file():
            return ChatEngineBase(folder, context_tokens(cfg)), whose
    return None, None


def _prompts(cfg: Config) -> dict:
    """The shortest prompt (the extractor's, an empty chunk), the budget a prompt may use, and the
    longest manager prompt the config can build (actors.agent.prompts), which episodes cut to the
    budget by halving the related memories shown (counted as prompt overflows)."""
    from actors.agent.prompts import extractor_messages, longest_manager_prompt_tokens, prompt_budget

    system, user = extractor_messages(cfg.model.prompt_size, "", [])
    chat, whose = _tokenizer(cfg)
    if chat is None:  # ~4 characters a token, English BPE
        return {"shortest_tokens": (len(system) + len(user)) // 4, "budget_tokens": prompt_budget(cfg),
                "longest_manager_tokens": None, "tokenizer": None}
    return {"shortest_tokens": len(chat.chat_prompt(system, user)), "budget_tokens": prompt_budget(cfg),
            "longest_manager_tokens": longest_manager_prompt_tokens(cfg, chat), "tokenizer": whose}


def _render_colocate(plan: dict) -> list[str]:
    co, phases, g = plan["colocate"], plan.get("phases"), plan["gpu_memory_gb"]
    lines = [f"GPUs in all: {plan['gpus_total']}, colocated: learner rank i and rollout worker i on GPU i "
             f"(a fixed fleet of {co['workers']}; the engine sleeps at level {co['sleep_level']} for the update)"]
    for name, phase in (phases or {}).items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in phase["components"].items())
        fits = "" if phase["fits"] else " (does NOT fit)"
        lines.append(f"{name + ' phase':>14}: {phase['total_gb']:.1f} of {g:g} GB{fits} = {parts}")
    resolved = co["offload_states_resolved"] or "unknown without a GPU size"
    line = f"learner.offload_states={co['offload_states']}" + (f" -> {resolved}" if co["offload_states"] == "auto" else "")
    host = co["host_memory"]
    if host:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in host["per_gpu"].items())
        line += (f"; host memory {host['per_gpu_gb']:.1f} GB a GPU ({parts}), {host['per_node_gb']:.1f} GB on a node "
                 f"of {host['gpus_per_node']} GPUs")
    return lines + [line] + [f"note: {n}" for n in co["notes"]]


def render(plan: dict) -> str:
    """The plan as a few lines for a terminal."""
    g = plan["gpu_memory_gb"]
    lines = [f"model {plan['model']['name']}: {plan['model']['params'] / 1e9:.2f}B params "
             f"({plan['model']['trainable_params'] / 1e9:.2f}B trained); GPUs of {g:g} GB" if g else
             f"model {plan['model']['name']}: {plan['model']['params'] / 1e9:.2f}B params; GPU size unknown (--gpu-memory-gb)"]
    for role in ("learner", "rollout"):
        r = plan["roles"][role]
        per = "?" if r["per_gpu_gb"] is None else f"{r['per_gpu_gb']:.1f}"
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["components"].items())
        if r.get("shares_learner_gpus"):
            kv = "" if r.get("kv_cache_tokens") is None else \
                f" ({r['kv_cache_tokens']} KV-cache tokens, {r['full_context_sequences']} full contexts)"
            lines.append(f"{role:>8}: {r['workers']} worker(s) on the learner's GPUs ({r['device']}), an engine's share "
                         f"{per} GB = {parts}{kv}")
        else:
            lines.append(f"{role:>8}: {r['gpus']} GPU(s) on {r['device']}, {per} GB each = {parts}")
    for ext in plan["roles"]["external"]:
        lines.append(f"{'external':>8}: {ext['role']} {ext['model']} at {ext['url']}")
    if "colocate" in plan:
        lines += _render_colocate(plan)
    else:
        lines.append(f"GPUs in all: {plan['gpus_total']} at start, {plan['gpus_total_max']} at the fleet's largest")
    p = plan["prompts"]
    if p["longest_manager_tokens"] is not None:
        lines.append(f"prompts: budget {p['budget_tokens']} of a {plan['context_tokens']}-token context; the longest manager "
                     f"prompt the config can build is {p['longest_manager_tokens']} tokens ({p['tokenizer']}'s tokenizer), "
                     f"cut to the budget by showing fewer related memories")
    lines.append(f"checkpoint {plan['checkpoint_gb']:.1f} GB, disk at peak {plan['checkpoint_disk_peak_gb']:.1f} GB; "
                 f"weight sync {plan['weight_sync_gb']:.1f} GB")
    lines.append({True: "fits", False: "does NOT fit: " + "; ".join(_problems(plan)), None: "fit unknown"}[plan["fits"]])
    return "\n".join(lines)
