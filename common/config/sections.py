"""The config tree's sections (common.config holds the root, `Config`, and the loading): one
class per section, each forbidding unknown keys so a typo fails in one line naming the key."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SynthConfig(Section):
    conversations: int = Field(7, ge=1)
    sessions: int = Field(4, ge=1)
    seed: int = 0
    turns_per_session: int = Field(10, ge=2)
    facts_per_session: int = Field(3, ge=1)
    val_conversations: int = Field(3, ge=0)  # the last ones validate; the rest train


class DataConfig(Section):
    source: Literal["synthetic", "locomo", "file"] = "synthetic"
    # LoCoMo lives beside the repo (CC BY-NC 4.0); it is read from there, never copied in.
    locomo_path: str = "../shared/data/locomo/locomo10.json"
    path: str | None = None  # source=file: any file in LoCoMo's schema
    # 11 conversations to train on, two per step (six steps, the last of one), and 20 to validate
    # (the last ones: 60 questions at horizon 2). With 21 (6 conversations) the gain's 95% interval
    # was +-0.14, wider than the gains it had to tell apart (docs/experiments.md).
    synth: SynthConfig = SynthConfig(conversations=31, val_conversations=20)
    train_ids: list[str] = ["conv-43", "conv-47"]
    val_ids: list[str] = ["conv-44"]
    test_ids: list[str] | None = None  # None: every conversation not in train or val
    exclude_adversarial: bool = True  # category 5, excluded in the paper's tables

    @model_validator(mode="after")
    def _file_needs_path(self) -> DataConfig:
        if self.source == "file" and not self.path:
            raise ValueError("data.path is required when data.source is 'file'")
        return self


class ModelConfig(Section):
    # "tiny" and "smollm2" are built offline by `memr2 models`; anything else is a checkpoint dir.
    # The embedded default is SmolLM2-135M: the random tiny model (tests, smoke runs) cannot
    # learn to copy values out of a dialogue within a laptop's minutes (README, Training).
    name: str = "smollm2"
    # The rollout engines' dtype. auto: the checkpoint's on a GPU and on a CPU that computes bf16
    # fast (AMX; AMD's avx512_bf16), float32 on other CPUs, where bf16 is emulated (4.3x slower)
    # or no faster (common.hardware).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    prompt_size: Literal["minimal", "compact", "full"] = "minimal"  # see actors.agent.prompts
    max_prompt_tokens: int = Field(2048, ge=64)


class MemoryConfig(Section):
    retriever: Literal["bm25", "minilm"] = "bm25"
    related_top_k: int = Field(25, ge=1)  # memories shown to the manager per new fact
    answer_top_k: int = Field(30, ge=1)  # memories per speaker given to the answer agent


class RolloutConfig(Section):
    engine: Literal["vllm", "transformers"] = "vllm"
    # The fleet's size at start; with cluster.autoscale_min/max_actors unset, its fixed size.
    num_actors: int = Field(2, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    # Custom Ray resources per worker, e.g. {rollout: 1} to keep workers on KubeRay's rollout group.
    resources: dict[str, float] = {}
    # A worker's capacity, in global tasks' worth of lanes (actors.fleet.slots.lane_capacity): 4
    # global tasks of n = 8 lanes are the 32 sequences in flight that fill a CPU engine, so it
    # holds 4 global tasks, 16 local tasks of m = 2, or 32 one-lane validation rollouts, all in
    # one continuous batch on its engine. The fleet's size is counted in the same lanes.
    tasks_per_worker: int = Field(4, ge=1)
    # Rollouts that repeat bit for bit whatever the timing (logprobs included): an engine step
    # waits for every lane's CPU work, and vLLM caches no prefixes (actors.engines.scheduler). For
    # exact resumes and side-by-side comparisons, at ~4x less rollout throughput (README). It needs
    # tasks_per_worker=1: a second task would join the batch at a step set by timing.
    deterministic: bool = False
    chunks_per_session: int = Field(2, ge=1)  # K in DESIGN §1 (the paper: 6)
    n_global: int = Field(8, ge=2)  # n: full rollouts per conversation (the paper: 16)
    m_local: int = Field(2, ge=2)  # m: branches per local group (the paper: 4)
    horizon: int = Field(4, ge=1)  # T for `memr2 rollout`; training takes it from the curriculum
    # Rerollouts always sample, whatever eval uses. 0.8 for the embedded default: at 1.0 a 135M
    # policy's samples break the JSON far more often than its greedy replies (the paper: 1.0).
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    # The longest gold extractor / manager output of the warm start's world is 113 SmolLM2 tokens;
    # beyond 128 a reply is rambling, and in lockstep every lane waits for the longest one.
    max_new_tokens: int = Field(128, ge=8)
    eval_temperature: float = Field(0.0, ge=0)
    # vLLM on GPU: the share of the GPU an engine takes (weights, activations, KV cache); `memr2
    # plan` shows what it leaves for the KV cache. Not read on CPU.
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    # cluster.colocate on GPU: before each update the engine sleeps (vLLM sleep mode). Level 1
    # moves its weights to host memory and drops the KV cache; level 2 drops both (the weights
    # come back with the sync). Not read on CPU, where vLLM has no sleep mode.
    sleep_level: Literal[1, 2] = 1

    @model_validator(mode="after")
    def _deterministic_alone(self) -> RolloutConfig:
        if self.deterministic and self.tasks_per_worker != 1:
            raise ValueError(f"rollout.deterministic needs rollout.tasks_per_worker=1 (got {self.tasks_per_worker}): "
                             "a second task would join the batch at a step set by timing")
        return self


class AnswerAgentConfig(Section):
    kind: Literal["reader", "vllm", "openai"] = "reader"
    model: str | None = None  # vllm: checkpoint dir; openai: served model name
    url: str | None = None  # openai: base URL of an OpenAI-compatible endpoint
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = Field(0.0, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    timeout_s: float = Field(60.0, gt=0)  # openai: one request's limit; a request past it is retried
    # openai: how long a request is retried (transient errors: refused, timeout, 408/409/429, 5xx;
    # backoff capped at 15 s) from its first failure before the run stops with EndpointDown. The
    # rollout waits meanwhile, so keep it below cluster.task_timeout_s (1800 s), past which the
    # fleet drops a silent worker as hung (actors.agent.answer_agent).
    outage_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _endpoint_complete(self) -> AnswerAgentConfig:
        if self.kind == "openai" and not (self.url and self.model):
            raise ValueError("reward.answer_agent needs url and model when kind is 'openai'")
        return self


class RewardConfig(Section):
    alpha: float = Field(0.7, ge=0)  # compression allowance: memory may hold alpha * dialogue tokens
    lam: float = Field(0.3, ge=0)  # weight of the compression penalty
    answer_agent: AnswerAgentConfig = AnswerAgentConfig()


class AlgoConfig(Section):
    """LoGo-GRPO hyper-parameters (DESIGN §3); defaults are the paper's reference values."""

    local_prob: float = Field(0.5, ge=0, le=1)
    local_weight: float | None = Field(None, ge=0, le=1)  # None: weight by share of samples (reference)
    clip_eps: float = Field(0.2, gt=0)
    dual_clip: float = Field(3.0, gt=1)
    log_ratio_cap: float = Field(3.0, gt=0)
    kl_beta: float = Field(0.001, ge=0)
    entropy_eta: float = Field(0.001, ge=0)
    adv_eps: float = Field(1e-6, gt=0)
    # The ratio's anchor (learner.logo_grpo): "behaviour", the engine's logprobs of the tokens it
    # sampled; "proximal", the learner's own before the update (recomputed: one no-grad forward
    # more per row), so the engine's numerics stay out of the update; "decoupled" (AReaL, for
    # rows from an older policy, train.max_staleness=1) proximal times pi_prox / pi_behav
    # truncated at tis_cap. Measured (`make train`, `memr2 bench async`):
    # neither learned more here than behaviour, and bf16 runs still part at step 2 with proximal
    # (the engine's sampling depends on its batches too), so behaviour stays the default.
    off_policy: Literal["behaviour", "proximal", "decoupled"] = "behaviour"
    tis_cap: float = Field(2.0, gt=0)


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1)
    # Rollouts and updates alternate, so on a laptop one rank may use every core the actors use.
    cpus_per_rank: float = Field(2.0, gt=0)
    gpus_per_rank: float | None = Field(None, ge=0)  # None: 1 when CUDA is present, else 0
    resources: dict[str, float] = {}  # custom Ray resources per rank, e.g. {learner: 1}
    weight_decay: float = Field(0.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl on GPU, gloo on CPU
    bf16: Literal["auto", "on", "off"] = "auto"  # auto: where the hardware has it natively
    # The paper's 2e-6 is for 7B (deploy/paper.yaml sets it). None: the embedded default's, by the
    # learner's precision (resolved_lr). For SmolLM2's top 10 layers in bf16, 5e-5 collapsed greedy
    # validation within 4-6 steps (README, Training) and 3e-5 raises it. In fp32 the same lr moves
    # the policy ~6x further in KL per step: bf16 weights round most updates of that size away (a
    # quarter of the trained weights changed over six steps, against all of them in fp32). Over
    # five seeds each, fp32 gained +0.043 at 2e-5 against +0.024 at 1e-5 (where fp32's KL is bf16's at 3e-5),
    # and +0.014 at 3e-5 on one (docs/experiments.md, The dtype for the CPU).
    lr: float | None = Field(None, gt=0)
    # RL keeps lr constant (the reference); a warm start from random init needs warm-up and decay.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)  # optimizer steps of linear warm-up
    lr_total_steps: int | None = Field(None, ge=1)  # cosine: decays to lr_min_ratio * lr at this step
    lr_min_ratio: float = Field(0.1, ge=0, le=1)
    # Embeddings and the first N decoder layers stay fixed (learner.engine.freeze_lower_layers):
    # the embedded default trains SmolLM2's top 10 of 30 layers; 0 trains everything (the paper).
    frozen_layers: int = Field(20, ge=0)
    ppo_epochs: int = Field(1, ge=1)  # the paper: 2
    mini_batch: int = Field(16, ge=1)
    # row: each row drawn into a mini-batch alone. prompt: rows with one prompt (the n lanes'
    # extractor calls on a chunk, a local group's branches) drawn together, as verl draws a
    # prompt's n responses, so a pass shares their prompt (learner.shared_prefix): updates ~1.4x
    # cheaper at the embedded default, but its advantages then cancel within each mini-batch and
    # the policy moved a third as far (KL 0.008 against 0.024 after six steps): val F1 +0.008
    # against +0.061 (docs/experiments.md, Shared prompts).
    mini_batch_by: Literal["row", "prompt"] = "row"
    micro_batch: int = Field(4, ge=1)
    # Cut each rank's share of a mini-batch into micro-batches of at most this many padded tokens
    # (rows x longest prompt + longest response) instead of micro_batch rows: at 7B the
    # activations of a token budget, not a row count, decide what fits (`memr2 plan`). None: rows.
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)
    # Recompute each decoder layer in the backward pass instead of keeping its activations:
    # ~20x less activation memory per token for ~1.3x the compute. auto: on with CUDA, off on CPU.
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    # Compute a prompt prefix the samples of a micro-batch share once (learner.shared_prefix):
    # the n lanes of a global group send the extractor one chunk prompt. auto: on on CPU (measured
    # by `memr2 bench learner`), off on GPU (its dense mask keeps SDPA off the flash kernel).
    shared_prefix: Literal["auto", "on", "off"] = "auto"
    # The frozen reference policy of the KL term. sharded: ZeRO-3 over the learner ranks (1/N of
    # a copy each; a full copy per rank is 15 GB at 7B); offload: sharded, parameters in host
    # memory; replicated: a full copy on every rank (fastest; fine for small models).
    reference: Literal["sharded", "offload", "replicated"] = "sharded"
    grad_clip: float = Field(1.0, gt=0)
    # collective: learner rank 0 and every engine form one process group and the weights go
    # through vLLM's weight-transfer engines (NCCL on GPU, gloo on CPU); object_store: through
    # the Ray object store; auto: collective wherever it works (learner.weight_sync).
    weight_sync: Literal["auto", "collective", "object_store"] = "auto"
    # collective: weights go in packed buckets of this size. None: 16 MB on CPU, where larger
    # buckets are fresh allocations every sync (slower than the object store for SmolLM2), and
    # 1 GiB on GPU (vLLM's own default).
    weight_bucket_mb: int | None = Field(None, ge=1)
    # A rank that dies (RayActorError) or answers no call for timeout_s (a hang in a collective)
    # is recovered inside the job: a new set of ranks, the last checkpoint, the updates since it
    # replayed, the interrupted call repeated (learner.deepspeed_learner). After max_restarts in
    # one run the job stops. timeout_s bounds every call: the longest update, checkpoint or sync.
    max_restarts: int = Field(3, ge=0)
    timeout_s: float | None = Field(3600.0, gt=0)
    # cluster.colocate: move the optimizer state and fp32 master weights to host memory while the
    # engine is awake (rollouts, sync), and back for the update. auto: when `memr2 plan` finds the
    # awake engine and the resident learner do not fit one GPU together.
    offload_states: Literal["auto", "on", "off"] = "auto"

    def resolved_lr(self, bf16: bool) -> float:
        return self.lr if self.lr is not None else (3e-5 if bf16 else 2e-5)

    @field_validator("bf16", "gradient_checkpointing", "offload_states", "shared_prefix", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML reads a bare on/off (`learner.bf16=on`, `bf16: off`) as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _micro_divides_mini(self) -> LearnerConfig:
        if self.mini_batch % self.micro_batch:
            raise ValueError("learner.micro_batch must divide learner.mini_batch")
        if self.lr_schedule == "cosine" and self.lr_total_steps is None:
            raise ValueError("learner.lr_schedule=cosine needs learner.lr_total_steps")
        return self


class Stage(Section):
    horizon: int = Field(ge=1)
    epochs: int = Field(ge=1)


class CurriculumConfig(Section):
    # The embedded default is one stage of one epoch, six steps (a 2 -> 4 curriculum does not fit
    # a laptop's 15 minutes); the paper's 8 -> 16 -> 32 (10/5/5 epochs) is in deploy/paper.yaml.
    stages: list[Stage] = [Stage(horizon=2, epochs=1)]
    val_every: int = Field(1, ge=1)  # validate every N epochs

    @field_validator("stages")
    @classmethod
    def _at_least_one_stage(cls, stages: list[Stage]) -> list[Stage]:
        if not stages:  # an empty curriculum would start the warm start and then train nothing
            raise ValueError("needs at least one stage, e.g. [{horizon: 2, epochs: 1}]")
        return stages


class WarmstartConfig(Section):
    """Supervised warm start on a synthetic world's gold facts and operations (`memr2 warmstart`),
    for models too small to produce a parsable output before RL can move them."""

    enabled: bool = True
    epochs: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)  # peak: linear warm-up, then cosine decay to a tenth
    warmup_steps: int = Field(3, ge=0)
    mini_batch: int = Field(8, ge=1)
    micro_batch: int = Field(4, ge=1)
    # A world of its own, disjoint from the RL conversations: the warm start teaches the formats,
    # and RL is measured on conversations neither stage has seen.
    synth: SynthConfig = SynthConfig(conversations=12, sessions=4, seed=1000, val_conversations=0)


class TrainConfig(Section):
    # Two: each of the embedded default's two workers runs one global task at once.
    conversations_per_step: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early (the run resumes from there with --resume)
    # Steps between full DeepSpeed checkpoints (bit16 weights, fp32 master, Adam moments: ~14 B
    # per parameter, 107 GB at 7.6B). One is also written at every stage's end and where max_steps
    # stops the run; a killed run resumes from the last one and repeats the steps after it, exactly.
    # 3: the embedded default's ~1 GB costs 5-10 s before the next step's rollouts can start, and a
    # lost learner rank replays at most two updates (Learner.recover) instead of one.
    checkpoint_every: int = Field(3, ge=1)
    # 1: the fleet runs step s+1's rollouts while the learner updates on step s's (one update
    # behind; actors.fleet.ahead); 0: rollouts and updates alternate. Rows further behind than
    # this are never trained on (Learner.prepare).
    max_staleness: int = Field(0, ge=0, le=1)
    # Step checkpoints kept; one more exists while the next is written (run_outputs.checkpoint_disk_peak_files).
    keep_checkpoints: int = Field(1, ge=1)
    warmstart: WarmstartConfig = WarmstartConfig()


class ClusterConfig(Section):
    address: str | None = None  # None: start a local Ray cluster; "auto": join the running one
    num_cpus: int | None = None
    # Rollout engines and learner ranks share GPUs: one placement group of learner.num_ranks
    # bundles, bundle i holding learner rank i and rollout worker i, so the fleet is fixed at
    # learner.num_ranks workers (autoscaling is a disaggregated feature). The step puts the engine
    # to sleep for the update and wakes it for the sync; weights go by IPC (the paper's 4 GPUs).
    colocate: bool = False
    # The rollout fleet sizes itself between these by its backlog (actors.fleet.scaling); unset,
    # either one is rollout.num_actors, so the default fleet has a fixed size.
    autoscale_min_actors: int | None = Field(None, ge=1)
    autoscale_max_actors: int | None = Field(None, ge=1)
    scale_down_delay_s: float = Field(120.0, ge=0)  # shrink only to the largest need of this window
    worker_placement: Literal["spread", "default"] = "spread"  # Ray's SPREAD over nodes, or its default packing
    # A worker with tasks that returns nothing for this long is dropped as hung (None: never).
    task_timeout_s: float | None = Field(1800.0, gt=0)
    max_task_attempts: int = Field(3, ge=1)  # a task that loses this many workers stops the job
    log_to_driver: bool = False  # actors' stdout (vLLM's logs) in the driver's terminal
    # How long the job waits for the cluster to hold all its actors before it stops with an error
    # naming what it asked for (an autoscaler may add nodes meanwhile); None waits forever. For a
    # rollout worker: from its request until its process runs on a node, not until its engine is up.
    placement_timeout_s: float | None = Field(300.0, gt=0)
    # A placed rollout worker's engine start (download, load, CUDA graphs) until it is ready; one
    # that takes longer is dropped and replaced as a failed start (None: no limit).
    worker_start_timeout_s: float | None = Field(900.0, gt=0)


class JudgeConfig(Section):
    """The LLM judge behind J: any OpenAI-compatible endpoint (actors.eval.judge has the prompt)."""

    url: str | None = None  # base URL, e.g. http://host:8000/v1; None: no judge, and J is absent
    model: str | None = None  # the served model name
    api_key_env: str = "OPENAI_API_KEY"  # read from the environment; a local server needs none
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(128, ge=1)
    concurrency: int = Field(8, ge=1)  # requests in flight
    timeout_s: float = Field(60.0, gt=0)
    # A request that fails transiently (refused, timeout, 408/409/429, 5xx) is retried for this
    # long from its first failure, then the eval stops (actors.eval.judge); 4xx stop it at once.
    outage_timeout_s: float = Field(600.0, gt=0)

    @model_validator(mode="after")
    def _model_with_url(self) -> JudgeConfig:
        if self.url and not self.model:
            raise ValueError("eval.judge.model is required when eval.judge.url is set")
        return self


class EvalConfig(Section):
    """`memr2 eval`: the policy builds memory session by session at rollout.eval_temperature, then
    the answer agent answers every question from the final memory (DESIGN §5)."""

    # test: LoCoMo's seven conversations outside train and validation; all: every conversation
    # of the data (the default for `--data FILE`).
    split: Literal["test", "val", "train", "all"] = "test"
    horizon: int | None = Field(None, ge=1)  # sessions per conversation; None: every session
    conversations: int | None = Field(None, ge=1)  # the first N of the split
    max_questions: int | None = Field(None, ge=1)  # per conversation, the first N (quick runs)
    judge: JudgeConfig = JudgeConfig()


class MetricsConfig(Section):
    prometheus: bool = True
    # None: ./runs, or ~/memr2-runs under `ray job submit` (its working dir is a temporary copy).
    # Across nodes, learner ranks write checkpoints here: a file system every learner node sees.
    run_dir: str | None = None
    run_name: str | None = None  # None: a timestamped name
    # Where each metrics.jsonl row, the config and the summary also go (common.trackers):
    # tensorboard (runs/<name>/tensorboard), wandb (offline unless wandb_mode=online; `wandb sync`
    # uploads later), mlflow (runs/mlflow.db unless mlflow_tracking_uri). jsonl is always kept:
    # resume and the benches read it.
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = ["jsonl", "tensorboard"]
    wandb_project: str = "memr2"
    wandb_mode: Literal["offline", "online"] = "offline"
    mlflow_tracking_uri: str | None = None
    mlflow_experiment: str = "memr2"

    @field_validator("loggers")
    @classmethod
    def _jsonl_kept(cls, loggers: list[str]) -> list[str]:
        if "jsonl" not in loggers:
            raise ValueError("must include jsonl (resume and the benches read metrics.jsonl)")
        return list(dict.fromkeys(loggers))
