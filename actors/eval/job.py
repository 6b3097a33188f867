"""`memr2 eval`: a policy on LoCoMo the way the paper's Table 1 reads it (DESIGN §5).

The policy builds memory session by session on the rollout fleet at `rollout.eval_temperature`
(the same evaluation tasks validation runs, all conversations in one batch); the answer agent then
answers every question from the final memory. Per category and overall (category 5 apart, and
left out of overall as the papers do): LoCoMo's official F1, BLEU-1, the LLM judge's J, M-Fail,
and the memory's size in tokens. Outputs, in the eval folder:

    predictions.jsonl  one row per question, in the rows `memr2 score` accepts (+ f1, bleu1, judge)
    eval.json          the tables (fractions in [0, 1]) and what was evaluated

The judge's and an OpenAI answer agent's endpoints are probed first (`check_endpoint`: one line if
the url does not answer or does not serve the model). A request that fails later is retried for
up to their outage_timeout_s, then stops the eval in one line: no F1 or J from a failed request;
the retries are counted (answer_retries / answer_failures, judge_retries / judge_failures).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from tqdm import tqdm

from actors.agent.endpoint import check_endpoint
from actors.agent.rewards import MemoryScore, final_questions
from actors.engines.models import check_model_name
from actors.eval.judge import Verdict, j_score, make_judge
from actors.fleet.cluster import fleet_asks, init_ray
from actors.fleet.fleet import RolloutFleet
from common.config import Config
from common.data import DataError, load_dataset, split
from common.metrics import run_root
from common.scoring import render_table, score_rows, summarize
from common.types import Conversation

ALL_SESSIONS = 10_000  # a horizon no conversation reaches: every session


def resolve_policy(policy: str) -> str:
    """A training run's folder stands for its final policy (`<run>/policy`); anything else is a
    model name as `model.name` takes it (tiny, smollm2, a checkpoint folder, a hub id)."""
    run = Path(policy).expanduser()
    if (run / "summary.json").is_file() or (run / "state.json").is_file():
        if not (run.joinpath("policy", "config.json")).is_file():
            raise ValueError(f"run {run} has no final policy (policy/ is written when training ends)")
        return str(run / "policy")
    check_model_name(policy)  # one line here, not a traceback from inside every worker
    return policy


def eval_conversations(cfg: Config) -> list[Conversation]:
    """The split's first `eval.conversations`, each asking at most `eval.max_questions` of what its
    final memory is asked. Category 5 is always asked: it is reported apart, never in overall."""
    conversations = load_dataset(cfg.data)
    chosen = conversations if cfg.eval.split == "all" else split(conversations, cfg.data)[cfg.eval.split]
    if not chosen:
        raise DataError(f"eval.split {cfg.eval.split!r}: no conversations in it for data.source={cfg.data.source}")
    chosen = chosen[: cfg.eval.conversations]
    horizon = cfg.eval.horizon or ALL_SESSIONS
    return [dataclasses.replace(c, qa=tuple(final_questions(c, horizon, False)[: cfg.eval.max_questions])) for c in chosen]


def run_eval(cfg: Config, out_dir: str | Path | None = None, console: Console | None = None) -> dict:
    start = time.perf_counter()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"exclude_adversarial": False})})
    conversations = eval_conversations(cfg)
    judge = make_judge(cfg.eval.judge)
    check_endpoints(cfg)  # one line now, not after the rollouts
    out = Path(out_dir) if out_dir else run_root(cfg) / time.strftime("eval-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    horizon = cfg.eval.horizon or ALL_SESSIONS
    init_ray(cfg.cluster, fleet_asks(cfg))
    fleet = RolloutFleet(cfg, run=out.name)
    try:
        with tqdm(total=len(conversations), desc="eval", unit="conversation") as bar:
            results = fleet.evaluate(conversations, horizon, on_result=lambda _: bar.update())
    finally:
        fleet.shutdown()
    scores = [r.score for r in results]
    rows = score_rows(_rows(conversations, scores, horizon))  # the F1 and BLEU-1 `memr2 score` gives
    verdicts = _judge(judge, rows)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    report = {
        "policy": cfg.model.name,
        "data": cfg.data.path if cfg.data.source == "file" else cfg.data.source,
        "split": cfg.eval.split,
        "horizon": cfg.eval.horizon,
        "conversations": len(conversations),
        "questions": len(rows),
        "scores": _tables(rows, judged=judge is not None),
        "memory_tokens_mean": statistics.fmean(s.memory_tokens for s in scores),
        # Manager / extractor replies with no parsable JSON: counted, never fatal (DESIGN §2).
        "format_failures": sum(r.stats.format_failures for r in results),
        "generated_tokens": sum(r.stats.generated_tokens for r in results),
        # Endpoint errors retried, never scored (actors.agent.answer_agent): re-sent requests and
        # requests that met an error, of the answer agent and of the judge.
        "answer_retries": sum(r.stats.answer_retries for r in results),
        "answer_failures": sum(r.stats.answer_failures for r in results),
        "judge_retries": 0 if judge is None else judge.counts.retries,
        "judge_failures": 0 if judge is None else judge.counts.failures,
        "judge": None if judge is None else {
            "url": cfg.eval.judge.url, "model": cfg.eval.judge.model,
            "judged": len(verdicts), "unparsed": sum(v.label is None for v in verdicts)},
        "out": str(out),
        "wall_s": time.perf_counter() - start,
    }
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    (console or Console(stderr=True)).print(render_table(report["scores"], title=f"memr2 eval: {cfg.model.name}"))
    return report


def check_endpoints(cfg: Config) -> None:
    """The start probe of every OpenAI-compatible endpoint this eval uses."""
    if cfg.eval.judge.url:
        check_endpoint(cfg.eval.judge.url, cfg.eval.judge.model or "", "eval.judge", cfg.eval.judge.api_key_env)
    agent = cfg.reward.answer_agent
    if agent.kind == "openai":
        check_endpoint(agent.url or "", agent.model or "", "reward.answer_agent", agent.api_key_env)


def _rows(conversations: list[Conversation], scores: list[MemoryScore], horizon: int) -> list[dict]:
    rows = []
    for conv, score in zip(conversations, scores, strict=True):
        questions = final_questions(conv, horizon, False)
        for q, prediction, m_fail in zip(questions, score.predictions, score.m_fails, strict=True):
            rows.append({"sample_id": conv.sample_id, "question": q.question, "answer": q.answer,
                         "category": q.category, "evidence": list(q.evidence), "prediction": prediction,
                         "m_fail": m_fail})
    return rows


def _judge(judge, rows: list[dict]) -> list[Verdict]:
    """Every row but category 5 (no gold answer to match; the papers leave it out) gets a verdict."""
    if judge is None:
        return []
    judged = [row for row in rows if row["category"] != 5]
    verdicts = judge.judge([(row["question"], str(row["answer"]), row["prediction"]) for row in judged])
    for row, verdict in zip(judged, verdicts, strict=True):
        row["judge"] = verdict.label  # CORRECT, WRONG, or None: the reply did not parse
    return verdicts


def _tables(rows: list[dict], judged: bool) -> dict:
    """`common.scoring.summarize` (count, F1, BLEU-1 per category, overall with and without 5),
    plus M-Fail and, with a judge, J. Without a judge J is absent, not zero."""
    tables = summarize(rows)
    for key, stats in tables.items():
        members = _members(rows, key)
        stats["m_fail"] = statistics.fmean(r["m_fail"] for r in members) if members else None
        if judged:
            stats["j"] = j_score([Verdict(r.get("judge"), "") for r in members if r["category"] != 5])
    return tables


def _members(rows: list[dict], key: str) -> list[dict]:
    if key == "all":
        return rows
    if key == "all_excl_5":
        return [r for r in rows if r["category"] != 5]
    return [r for r in rows if str(r["category"]) == key]
