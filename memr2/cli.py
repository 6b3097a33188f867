"""memr2 sub-commands. Each handler parses, calls one function of a lower layer, and prints.

Expected failures (bad config, bad data, bad input rows) end as one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable

from common.config import ConfigError
from common.data import DataError


def _cmd_score(args: argparse.Namespace) -> int:
    from common.scoring import score_file

    score_file(args.input, args.out)
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from common.synth import write_world

    world = write_world(
        args.out,
        conversations=args.conversations,
        sessions=args.sessions,
        seed=args.seed,
        turns_per_session=args.turns_per_session,
    )
    print(f"wrote {len(world)} conversations, {sum(len(c['qa']) for c in world)} QA to {args.out}", file=sys.stderr)
    return 0


def _bench(bench, name: str, fn, help: str) -> argparse.ArgumentParser:
    """A `memr2 bench` sub-command: --json and dotted config overrides (for every run it makes)."""
    parser = bench.add_parser(name, help=help)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides, applied last")
    parser.set_defaults(fn=fn)
    return parser


def _print(result: dict, as_json: bool, width: int = 16) -> int:
    """One JSON object, or one `key: value` line per field."""
    if as_json:
        print(json.dumps(result))
        return 0
    for key, value in result.items():
        print(f"{key:>{width}}: {value:.3f}" if isinstance(value, float) else f"{key:>{width}}: {value}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from common.data import load_conversations, stats

    return _print(stats(load_conversations(args.file)), args.json, width=15)


def _cmd_bench_memory(args: argparse.Namespace) -> int:
    from memory_service.bench import run_memory_bench

    result = run_memory_bench(tuple(args.sizes))
    if args.json:
        print(json.dumps(result))
    else:
        cols = ["size", "fork_us", "deepcopy_us", "pickle_disk_us", "apply_us", "retrieve_us"]
        print("".join(f"{c:>16}" for c in cols))
        for row in result["results"]:
            print("".join(f"{row[c]:>16.2f}" if c != "size" else f"{row[c]:>16d}" for c in cols))
    return 0


def _cmd_bench_sync(args: argparse.Namespace) -> int:
    from learner.bench_sync import run_sync_bench

    return _print(run_sync_bench(args.repeats, args.overrides), args.json)


def _cmd_bench_learner(args: argparse.Namespace) -> int:
    from learner.bench_learner import run_learner_bench

    return _print(run_learner_bench(args.overrides, args.repeats, args.rows), args.json)


def _cmd_bench_async(args: argparse.Namespace) -> int:
    from learner.bench_async import run_async_bench

    return _print(run_async_bench(args.overrides), args.json)


def _cmd_bench_rollout(args: argparse.Namespace) -> int:
    from actors.fleet.bench import bench_config, run_rollout_bench

    return _print(run_rollout_bench(bench_config(args.overrides)), args.json)


def _cmd_bench_learning(args: argparse.Namespace) -> int:
    from learner.bench_learning import run_learning_bench

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    result = run_learning_bench(arms, args.seeds, args.overrides, out=args.out)
    if args.json:
        print(json.dumps(result))
    return 0


def _cmd_bench_credit(args: argparse.Namespace) -> int:
    from learner.bench_credit import parse_horizons, render, run_credit_bench

    result = run_credit_bench(parse_horizons(args.horizons), args.conversations, args.overrides)
    print(f"credit plot: {result['plot']}", file=sys.stderr)
    print(json.dumps(result) if args.json else render(result))
    return 0


def _cmd_rollout(args: argparse.Namespace) -> int:
    from actors.rollout_job import run_rollouts, smoke_config
    from common.config import load_config

    cfg = smoke_config(args.config, args.overrides) if args.smoke else load_config(args.config, args.overrides)
    return _print(run_rollouts(cfg), args.json, width=22)


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.validate:
        from learner.plan.validate import run_validation

        result = run_validation()
        if not args.json:
            for c in result["cases"]:
                print(f"{c['model']:>8} {c['micro_batch_tokens']:>6} tokens  checkpointing {str(c['gradient_checkpointing']):>5}  "
                      f"planned {c['planned_gb']:.3f} GB  measured {c['measured_gb']:.3f} GB  ratio {c['ratio']:.2f}")
            return 0
        print(json.dumps(result))
        return 0
    from common.config import load_config
    from learner.plan.report import make_plan, render

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import logs to stdout; --json owns it
        plan = make_plan(load_config(args.config, args.overrides), args.gpu_memory_gb, args.model_config)
    print(json.dumps(plan) if args.json else render(plan))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from common.config import load_config
    from learner.train import run

    summary = run(load_config(args.config, args.overrides), resume=args.resume, gpu_memory_gb=args.gpu_memory_gb)
    print(json.dumps(summary))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from actors.eval.job import resolve_policy, run_eval
    from common.config import load_config

    # `--data FILE` evaluates every conversation of the file unless --split says otherwise.
    data = {"locomo": ["data.source=locomo"], "synthetic": ["data.source=synthetic"]}.get(
        args.data, ["data.source=file", f"data.path={args.data}", f"eval.split={args.split or 'all'}"])
    flags = {"eval.split": args.split, "eval.horizon": args.horizon, "eval.conversations": args.conversations,
             "eval.max_questions": args.max_questions}
    overrides = data + [f"{key}={value}" for key, value in flags.items() if value is not None]
    cfg = load_config(args.config, overrides + list(args.overrides))
    if args.policy:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": resolve_policy(args.policy)})})
    report = run_eval(cfg, args.out)
    print(json.dumps(report) if args.json else f"eval: {report['questions']} questions -> {report['out']}")
    return 0


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from pathlib import Path

    from actors.fleet.cluster import init_ray
    from common.config import load_config
    from learner.deepspeed_learner import rank_resources
    from learner.warmstart import run_warmstart

    cfg = load_config(args.config, args.overrides)
    init_ray(cfg.cluster, {"learner rank": [rank_resources(cfg.learner)] * cfg.learner.num_ranks})
    print(json.dumps(run_warmstart(cfg, cfg.model.name, Path(args.out))))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from actors.engines.models import resolve_model

    print(resolve_model(args.name, args.models_dir))
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of config overrides (see common/config/sections.py)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides, applied last")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memr2", description="Memory-R2 on Ray: LoGo-GRPO for memory agents")
    sub = parser.add_subparsers(dest="command", required=True)

    score = sub.add_parser("score", help="score predictions with LoCoMo's official F1 and BLEU-1")
    score.add_argument("--in", dest="input", required=True, help="JSONL rows with question, answer, category, prediction")
    score.add_argument("--out", required=True, help="JSONL rows with f1 and bleu1 added")
    score.set_defaults(fn=_cmd_score)

    data = sub.add_parser("data", help="synthetic worlds and dataset statistics").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="generate a seeded synthetic multi-session world in LoCoMo's schema")
    synth.add_argument("--conversations", type=int, default=4)
    synth.add_argument("--sessions", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--turns-per-session", type=int, default=10)
    synth.add_argument("--out", required=True)
    synth.set_defaults(fn=_cmd_data_synth)
    stats = data.add_parser("stats", help="conversations, sessions, turns and QA by category of a data file")
    stats.add_argument("file")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(fn=_cmd_data_stats)

    bench = sub.add_parser("bench", help="benchmarks that print numbers").add_subparsers(dest="bench_command", required=True)
    memory = bench.add_parser("memory", help="fork / deepcopy / pickle-to-disk / apply / retrieve costs by bank size")
    memory.add_argument("--sizes", type=int, nargs="+", default=[100, 1_000, 10_000])
    memory.add_argument("--json", action="store_true")
    memory.set_defaults(fn=_cmd_bench_memory)
    sync = _bench(bench, "sync", _cmd_bench_sync, "one weight sync per mode (collective, object_store) and a raw "
                  "broadcast of the same bytes, on SmolLM2 with two engines; medians of the repeats")
    sync.add_argument("--repeats", type=int, default=3)
    learner_bench = _bench(bench, "learner", _cmd_bench_learner, "one embedded-default step's rows through the update "
                           "with and without shared prompt prefixes: times, speedup, gradient difference")
    learner_bench.add_argument("--repeats", type=int, default=2)
    learner_bench.add_argument("--rows", metavar="FILE.parquet", help="step rows to read if the file exists (with "
                               "model.name=<the folder they came from>), else to write this run's to")
    _bench(bench, "async", _cmd_bench_async, "the embedded default's training with train.max_staleness 0 and 1, one "
           "worker and the learner on one core each: steps/h, staleness, val F1")
    _bench(bench, "rollout", _cmd_bench_rollout, "a rollout worker's tokens/s against vLLM's own LLM.generate on the "
           "same requests, engine and concurrency (SmolLM2)")
    learning = _bench(bench, "learning", _cmd_bench_learning, "LoGo-GRPO against plain GRPO at equal samples: val F1 "
                      "gain and M-Fail per arm, mean and standard error over seeds")
    learning.add_argument("--arms", default="logo,grpo", help="comma-separated: logo, grpo")
    learning.add_argument("--seeds", type=int, default=3)
    learning.add_argument("--out", help="the bench's folder (default: a new runs/bench-learning-<time>); given one "
                          "that holds an interrupted bench of the same arguments, it keeps the finished runs, "
                          "resumes the interrupted one and runs the rest")
    credit = _bench(bench, "credit", _cmd_bench_credit, "credit fidelity: Spearman between each group's advantages and "
                    "the steps' oracle scores, global against local groups, per horizon (rollouts only)")
    credit.add_argument("--horizons", default="2,4,8", help="comma-separated horizons (sessions per rollout)")
    credit.add_argument("--conversations", type=int, help="conversations at every horizon (default: ceil(256 / H^1.5), "
                        "for >= 30 groups of each kind at each horizon)")
    rollout = sub.add_parser("rollout", help="run rollouts only: global and local groups on Ray rollout actors")
    _add_config_args(rollout)
    rollout.add_argument("--smoke", action="store_true", help="the embedded default at smoke size (1 conversation, 4 sessions, n=4, m=2)")
    rollout.add_argument("--json", action="store_true")
    rollout.set_defaults(fn=_cmd_rollout)

    train = sub.add_parser("train", help="LoGo-GRPO training: rollouts, local rerollouts, update, weight sync, curriculum")
    _add_config_args(train)
    train.add_argument("--resume", nargs="?", const="always", default="never", choices=["always", "auto"],
                       help="continue the run named by metrics.run_name from its last step; "
                            "'--resume auto' resumes if it has a checkpoint and starts fresh otherwise (retried jobs)")
    train.add_argument("--gpu-memory-gb", type=float, help="plan against GPUs of this size (default: the driver's own GPU; "
                                                           "none: no memory check)")
    train.set_defaults(fn=_cmd_train)

    plan = sub.add_parser("plan", help="what a config needs before anything starts: GPUs per role, memory per GPU by "
                                       "component, checkpoint disk, weight-sync bytes")
    _add_config_args(plan)
    plan.add_argument("--gpu-memory-gb", type=float, help="GPU size to plan against (default: this machine's GPU, if any)")
    plan.add_argument("--model-config", help="the model's config.json, for a hub id with no local copy")
    plan.add_argument("--validate", action="store_true", help="check the learner figures against a real learner step "
                                                              "measured on CPU (SmolLM2 and the tiny model)")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(fn=_cmd_plan)

    ev = sub.add_parser("eval", help="evaluate a policy on LoCoMo: memory built on the rollout fleet, then official F1, "
                                     "BLEU-1, LLM-judge J and M-Fail per category")
    _add_config_args(ev)
    ev.add_argument("--policy", help="a training run's folder (its final policy), tiny, smollm2, a checkpoint folder "
                                     "or a hub id (default: model.name)")
    ev.add_argument("--data", default="locomo", help="locomo (default), synthetic, or any file in LoCoMo's schema")
    ev.add_argument("--split", choices=["test", "val", "train", "all"], help="default: test (all for a file)")
    ev.add_argument("--horizon", type=int, help="sessions per conversation (default: every session)")
    ev.add_argument("--conversations", type=int, help="the first N conversations of the split")
    ev.add_argument("--max-questions", type=int, help="at most N questions per conversation")
    ev.add_argument("--out", help="output folder (default: <metrics.run_dir>/eval-<time>)")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ev.set_defaults(fn=_cmd_eval)

    warm = sub.add_parser("warmstart", help="supervised warm start on a synthetic world's gold facts and operations")
    _add_config_args(warm)
    warm.add_argument("--out", required=True, help="folder for the warm-started checkpoint")
    warm.set_defaults(fn=_cmd_warmstart)

    models = sub.add_parser("models", help="build an offline model (tiny, smollm2) on first use and print its folder")
    models.add_argument("name", choices=["tiny", "smollm2"])
    models.add_argument("--models-dir", help="where models live (default: ./models or $MEMR2_MODELS_DIR)")
    models.set_defaults(fn=_cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as err:
        print(f"memr2: error: {err}", file=sys.stderr)
        return 2
