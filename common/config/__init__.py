"""One typed config tree for the whole system, loaded from YAML plus dotted command-line overrides.

Every section forbids unknown keys, so a typo fails loudly with one line naming the key instead of
being silently ignored. Defaults are the embedded default (`make train` on a 2-core laptop:
SmolLM2-135M with a short warm start, the synthetic world, horizon 2); the LoGo-GRPO
hyper-parameters default to the paper's reference values, and `deploy/paper.yaml` holds the
paper's whole setting (DESIGN §3, §5). Tests and smoke runs pin the tiny model and what they need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from common.config.sections import (
    AlgoConfig,
    AnswerAgentConfig,
    ClusterConfig,
    ConfigError,
    CurriculumConfig,
    DataConfig,
    EvalConfig,
    JudgeConfig,
    LearnerConfig,
    MemoryConfig,
    MetricsConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    Section,
    Stage,
    SynthConfig,
    TrainConfig,
    WarmstartConfig,
)

__all__ = [
    "AlgoConfig", "AnswerAgentConfig", "ClusterConfig", "Config", "ConfigError", "CurriculumConfig", "DataConfig",
    "EvalConfig", "JudgeConfig", "LearnerConfig", "MemoryConfig", "MetricsConfig", "ModelConfig", "RewardConfig",
    "RolloutConfig", "Section", "Stage", "SynthConfig", "TrainConfig", "WarmstartConfig", "load_config", "validate_config",
]


class Config(Section):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    memory: MemoryConfig = MemoryConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    algo: AlgoConfig = AlgoConfig()
    learner: LearnerConfig = LearnerConfig()
    curriculum: CurriculumConfig = CurriculumConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    eval: EvalConfig = EvalConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _fleet_bounds(self) -> Config:
        c, n = self.cluster, self.rollout.num_actors
        lo = n if c.autoscale_min_actors is None else c.autoscale_min_actors
        hi = n if c.autoscale_max_actors is None else c.autoscale_max_actors
        if c.autoscale_min_actors is not None and c.autoscale_max_actors is not None and lo > hi:
            raise ValueError(f"cluster.autoscale_min_actors ({lo}) exceeds cluster.autoscale_max_actors ({hi})")
        if n < lo:
            raise ValueError(f"rollout.num_actors ({n}, the fleet's size at start) is below cluster.autoscale_min_actors ({lo})")
        if n > hi:
            raise ValueError(f"rollout.num_actors ({n}, the fleet's size at start) is above cluster.autoscale_max_actors ({hi})")
        return self

    @model_validator(mode="after")
    def _colocated_pairs(self) -> Config:
        """cluster.colocate pairs rollout worker i with learner rank i on one GPU."""
        c, ranks = self.cluster, self.learner.num_ranks
        if not c.colocate:
            return self
        if self.train.max_staleness:
            raise ValueError("cluster.colocate needs train.max_staleness=0: rollouts cannot run ahead on a GPU the update holds")
        if self.rollout.num_actors != ranks or {c.autoscale_min_actors, c.autoscale_max_actors} - {None, ranks}:
            raise ValueError(f"cluster.colocate: the fleet is fixed at learner.num_ranks ({ranks}) workers, one on each "
                             f"rank's GPU; set rollout.num_actors={ranks} and leave cluster.autoscale_min/max_actors unset")
        gpus = (self.learner.gpus_per_rank or 0.0) + self.rollout.gpus_per_actor
        if gpus > 1:
            raise ValueError(f"cluster.colocate: learner.gpus_per_rank + rollout.gpus_per_actor is {gpus:g}, more than "
                             "the one GPU a rank and its worker share")
        return self


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then `a.b.c=value` overrides (values parsed as YAML scalars).

    Both layer onto the full default tree, not onto an empty one: a partial section would otherwise
    be validated alone and its other fields would take their class defaults, so that, e.g.,
    `train.warmstart.synth.conversations=12` silently reset the warm start world's seed to 0."""
    raw: dict[str, Any] = Config().model_dump()
    if path is not None:
        _merge(raw, _read_yaml(Path(path)))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"config override {item!r} is not of the form key.path=value")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return raw


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key {key}"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f", got {got!r}"
    return f"config {key}: {msg}{shown}{more}" if key else f"config: {msg}{more}"
