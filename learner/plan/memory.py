"""Bytes per GPU of a learner rank and of a rollout engine, by component (`memr2 plan`).

Learner model states (weights, gradients, fp32 master and Adam moments) are DeepSpeed's own
estimates (`estimate_zero2/3_model_states_mem_needs`, no offload), split into components by the
multipliers their source documents: 2 B/param of 16-bit weights, and over N ranks 18 B/param of
16-bit and fp32 gradients (2 + 4), fp32 master weights (4) and Adam's two moments (8). Stages 0 and 1
have no estimator: the same multipliers, unpartitioned where the stage does not partition.
Frozen layers (learner.frozen_layers) hold only their weights.

Activations of one micro-batch of T padded tokens, Tr of them response tokens, per token:

  a decoder layer keeps for its backward   8h + b(7h + 4kv + 4i)   bytes
      RMSNorm: its fp32 input and 16-bit output, twice (2 x (4h + bh)); attention: q, k, v, the
      rotated q and k (and the rotate-half copies), SDPA's output and o_proj's input (b(5h + 4kv));
      SwiGLU: gate, up, SiLU(gate) and their product (4bi). b = 2 in bf16, 4 in fp32.
  gradient checkpointing keeps only each layer's input (L x bh) and recomputes one layer at a time
  the log-softmax head, per response token   V(b + 16)
      the logits (b), their fp32 copy, the log-softmax and its exp kept for the entropy, and the
      entropy's product (4 each): learner.logprobs computes logits for response positions only.

Checked against a real learner step on CPU (`memr2 plan --validate`); what a CPU cannot show
(CUDA context, NCCL buffers, the caching allocator's fragmentation) is a stated allowance.

Colocated (cluster.colocate), a GPU holds a learner rank and an engine, in two phases:

  update   the learner's peak (as above) and the sleeping engine's residue (ENGINE_ASLEEP_GB)
  rollout  the awake engine's share (rollout.gpu_memory_utilization of the GPU) and what the
           learner keeps between updates (learner_resident): its 16-bit weights, its reference
           shard, the optimizer state and fp32 master unless learner.offload_states moves them to
           host memory, its CUDA context and NCCL buffers, and fragmentation on what it keeps.
           ZeRO-1/2 keep no gradients (DeepSpeed 0.19 frees the partitioned gradients at the
           optimizer step and the contiguous buffer at the backward's end); ZeRO-3
           (grad_partitions_flat_buffer) and stage 0 in bf16 (BF16_Optimizer's fp32 gradients)
           keep theirs. Activations are gone: the learner empties its cache after the update.
The weight sync (engine weights awake, KV cache not yet) is the rollout phase less the KV cache
plus the IPC buckets: below the rollout phase wherever the KV cache exceeds a bucket or two.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import Config
from learner.plan.shape import ModelShape

GB = 1e9
CUDA_CONTEXT_NCCL_GB = 2.0  # CUDA context and cuBLAS workspaces ~1 GB, NCCL's buffers ~1 GB
FRAGMENTATION = 0.10  # of the allocated peak: PyTorch's caching allocator rounds and splits blocks
# vLLM 0.32's engine defaults for the LLM class on a GPU (its memory profile runs one such batch).
VLLM_BATCHED_TOKENS, VLLM_MAX_SEQS, CUDA_GRAPHS_GB = 8192, 256, 1.0
# What a sleeping vLLM engine keeps on its GPU. vLLM 0.32's sleep (CuMemBackend.suspend) moves the
# runtime and CUDA-graph pools to host memory at either level, the weights too at level 1, drops
# the KV cache (and at level 2 the weights), then empties torch's cache; its docs: sleep releases
# "up to 90%+ of GPU memory" (docs.vllm.ai/en/latest/features/sleep_mode/). Left: the engine
# process's own CUDA context (~0.5 GB with CUDA's lazy module loading) and what it allocates
# outside those pools (persistent input buffers, cuBLAS workspaces, NCCL's if it has any), with a
# margin. An allowance, not measured here (no GPU).
ENGINE_ASLEEP_GB = 1.5


@dataclass(frozen=True)
class MicroBatch:
    rows: int
    tokens: int  # rows x (longest prompt + longest response): what learner.logprobs.pack builds
    response_tokens: int  # rows x (longest response + 1): positions the head computes

    @classmethod
    def of(cls, rows: int, prompt: int, response: int) -> MicroBatch:
        return cls(rows, rows * (prompt + response), rows * (response + 1))


def model_states(shape: ModelShape, stage: int, ranks: int, frozen_layers: int, bf16: bool) -> dict[str, float]:
    """Weights, gradients and optimizer (fp32 master + Adam) bytes on one rank."""
    from learner.engine import prepare_env

    prepare_env()  # before deepspeed's first import: it picks its accelerator then
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, trained = shape.params, shape.trainable_params(frozen_layers)
    g16 = ranks if stage >= 2 else 1  # ZeRO-2/3 partition the 16-bit gradients
    part = 1 if stage == 0 else ranks  # ZeRO-1 and up partition the fp32 gradients and optimizer
    estimate = None
    if stage == 3:
        _, estimate, gathered = estimate_zero3_model_states_mem_needs(
            trained, shape.largest_module_params, ranks, 1, cpu_offload=False, cpu_offload_params=False)
        parts = {"weights": gathered + 2 * trained / ranks, "gradients": 4 * trained / ranks}
    else:
        parts = {"weights": 2 * trained, "gradients": 2 * trained / g16 + 4 * trained / part}
        if stage == 2:
            _, estimate = estimate_zero2_model_states_mem_needs(trained, ranks, 1, cpu_offload=False)
    parts["optimizer"] = 12 * trained / part
    if estimate is not None:  # the split adds up to DeepSpeed's own figure
        assert abs(sum(parts.values()) - estimate) <= 8, (parts, estimate)
    parts["weights"] += (2 if bf16 else 4) * (total - trained) / (ranks if stage == 3 else 1)  # frozen layers
    if not bf16:  # the estimators count 16-bit weights and gradients; fp32 training holds 4 bytes
        parts["weights"] += 2 * trained / (ranks if stage == 3 else 1)
        parts["gradients"] += 2 * trained / g16
    return parts


def reference_bytes(shape: ModelShape, placement: str, ranks: int, bf16: bool, frozen_layers: int = 0) -> float:
    """The frozen reference policy on one rank (learner.engine.build_reference), without the
    layers of the policy's frozen trunk (learner.trunk.drop_trunk)."""
    b = 2 if bf16 else 4
    params = shape.params - max(0, frozen_layers) * shape.layer_params
    if placement == "replicated" or ranks == 1:
        return b * params
    gathered = b * shape.largest_module_params  # ZeRO-3 gathers one module at a time
    return gathered if placement == "offload" else gathered + b * params / ranks


def activation_bytes(shape: ModelShape, micro: MicroBatch, checkpointing: bool, bf16: bool, frozen_layers: int = 0) -> float:
    """Frozen lower layers keep nothing: no input of theirs needs a gradient."""
    b = 2 if bf16 else 4
    h, kv, i = shape.hidden, shape.kv_dim, shape.intermediate
    layer = 8 * h + b * (7 * h + 4 * kv + 4 * i)
    trained = shape.layers - max(0, frozen_layers)
    kept = micro.tokens * (trained * b * h + layer) if checkpointing else micro.tokens * trained * layer
    head = micro.response_tokens * shape.vocab * (b + 16 if b == 2 else 16)
    return kept + head


def micro_batch_candidates(cfg: Config, shortest_prompt: int) -> list[MicroBatch]:
    """The micro-batches that can hold the most activation bytes; the plan takes the largest.

    Rows are padded to the longest prompt plus the longest response. Under a token budget a row
    longer than the budget goes alone (a full context), or the budget is filled with the rows
    richest in response tokens: the shortest prompts with the longest replies. Without one,
    learner.micro_batch rows all padded to the full context."""
    longest_prompt, reply = cfg.model.max_prompt_tokens, cfg.rollout.max_new_tokens
    budget = cfg.learner.max_tokens_per_micro_batch
    if budget is None:
        return [MicroBatch.of(cfg.learner.micro_batch, longest_prompt, reply)]
    filled = MicroBatch.of(max(1, budget // (shortest_prompt + reply)), shortest_prompt, reply)
    return [MicroBatch.of(1, longest_prompt, reply), filled]


def largest_activations(shape: ModelShape, micros: list[MicroBatch], checkpointing: bool, bf16: bool,
                        frozen_layers: int) -> tuple[MicroBatch, float]:
    return max(((m, activation_bytes(shape, m, checkpointing, bf16, frozen_layers)) for m in micros), key=lambda x: x[1])


def learner_components(cfg: Config, shape: ModelShape, micro: MicroBatch, bf16: bool, checkpointing: bool) -> dict[str, float]:
    lc = cfg.learner
    parts = model_states(shape, lc.zero_stage, lc.num_ranks, lc.frozen_layers, bf16)
    parts["reference"] = reference_bytes(shape, lc.reference, lc.num_ranks, bf16, lc.frozen_layers) if cfg.algo.kl_beta > 0 else 0.0
    parts["activations"] = activation_bytes(shape, micro, checkpointing, bf16, lc.frozen_layers)
    return parts


def learner_peak(parts: dict[str, float]) -> float:
    """A rank's peak: every component but the smaller of gradients and activations. Activations
    peak at the end of the forward, before any gradient exists; the backward frees each layer's
    activations as it makes that layer's gradients; the gradients peak at the optimizer step,
    when the activations are gone. (Measured on CPU: the peak follows the larger of the two.)"""
    return sum(parts.values()) - min(parts["gradients"], parts["activations"])


def gpu_allowance(allocated: float) -> dict[str, float]:
    """What a CPU measurement cannot show, added on a GPU: context, NCCL, fragmentation."""
    return {"cuda_context_nccl": CUDA_CONTEXT_NCCL_GB * GB, "fragmentation": FRAGMENTATION * allocated}


def engine_components(cfg: Config, shape: ModelShape, gpu_gb: float) -> tuple[dict[str, float], int]:
    """A vLLM engine's share of one GPU (rollout.gpu_memory_utilization) by component, and the
    KV-cache tokens left in it. vLLM's own profile counts the CUDA context inside that share."""
    b = 4 if cfg.model.dtype == "float32" else 2
    claim = cfg.rollout.gpu_memory_utilization * gpu_gb * GB
    weights = b * shape.params
    # One forward of a full prefill batch, a layer at a time (q, k, v, o and the SwiGLU's three
    # intermediate-sized tensors), and the sampler's fp32 logits (and their softmax) per sequence.
    forward = VLLM_BATCHED_TOKENS * b * (4 * shape.hidden + 3 * shape.intermediate) + VLLM_MAX_SEQS * shape.vocab * 8
    parts = {"weights": float(weights), "activations": float(forward), "cuda_graphs": CUDA_GRAPHS_GB * GB}
    parts["kv_cache"] = max(0.0, claim - sum(parts.values()))
    return parts, int(parts["kv_cache"] // shape.kv_bytes_per_token)


def reference_resident_bytes(shape: ModelShape, placement: str, ranks: int, bf16: bool) -> float:
    """The reference between its forwards: its shard (sharded), a full copy (replicated, or one
    rank), nothing on the GPU (offload); ZeRO-3's gathered module is freed after each forward."""
    b = 2 if bf16 else 4
    if placement == "replicated" or ranks == 1:
        return b * shape.params
    return 0.0 if placement == "offload" else b * shape.params / ranks


def learner_resident(cfg: Config, shape: ModelShape, parts: dict[str, float], bf16: bool, offload: bool) -> dict[str, float]:
    """What a colocated learner rank keeps on its GPU while the engine is awake (module docstring):
    `parts` are learner_components'; offload moves the optimizer state and fp32 master to host."""
    lc = cfg.learner
    kept = {
        "weights": parts["weights"],
        "gradients": parts["gradients"] if lc.zero_stage in (0, 3) else 0.0,
        "optimizer": 0.0 if offload else parts["optimizer"],
        "reference": reference_resident_bytes(shape, lc.reference, lc.num_ranks, bf16) if cfg.algo.kl_beta > 0 else 0.0,
    }
    return kept | gpu_allowance(sum(kept.values()))


def engine_host_bytes(cfg: Config, shape: ModelShape) -> dict[str, float]:
    """Host memory a sleeping engine fills: its runtime and CUDA-graph pools at either level (the
    CUDA_GRAPHS_GB allowance), its weights at rollout.sleep_level 1 (vLLM 0.32, CuMemBackend)."""
    b = 4 if cfg.model.dtype == "float32" else 2
    weights = float(b * shape.params) if cfg.rollout.sleep_level == 1 else 0.0
    return {"engine_weights": weights, "engine_graphs_runtime": CUDA_GRAPHS_GB * GB}
