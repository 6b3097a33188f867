"""`memr2 train`: LoGo-GRPO over a curriculum of horizons, on Ray rollout actors and a DeepSpeed
learner (DESIGN §3-§4). `train_step` is the whole algorithm of one step; the rest is bookkeeping:
validation, the curriculum, checkpoints that resume to the identical next step, and outputs.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from actors.agent.answer_agent import check_answer_agent
from actors.agent.groups import EvalResult
from actors.agent.episode import request_seed
from actors.engines.models import check_model_name
from actors.fleet.cluster import Asks, fleet_asks, init_ray
from actors.fleet.colocation import Colocation, pair_bundle, pair_resources
from actors.fleet.fleet import RolloutFleet
from actors.fleet.slots import worker_resources
from actors.fleet.ahead import RolloutsAhead
from actors.fleet.tasks import StepPlan, plan_step, with_validation
from common.config import Config
from common.data import load_dataset, split
from common.scoring import bootstrap_ci
from common.types import Conversation
from learner.credit import step_metrics as credit_metrics
from learner.deepspeed_learner import Learner, rank_resources
from learner.plan import check_fits, resolve_offload_states
from learner.run_outputs import Resume, RunDir, TrainState
from learner.warmstart import warm_model
from learner.weight_sync import check_sync_mode, sync_weights

# The update's numbers every step row carries (the learner's metrics name them).
UPDATE_METRICS = ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "lr", "policy_version", "prefix_token_ratio",
                  "trunk_token_ratio", "logp_mismatch", "logp_mismatch_kl", "staleness_mean", "policy_lag_max")


def train_step(fleet: RolloutFleet, learner: Learner, ahead: RolloutsAhead, plan: StepPlan, next_plan: StepPlan | None) -> dict:
    t0 = time.perf_counter()
    # n global rollouts each (rewards r_G(i, t)) and, as soon as an anchor's snapshot M_{t-1}
    # exists, m branches of session t from it (rewards r_L), on whichever workers are live. With
    # train.max_staleness=1 they ran during the last update, on the weights before it. A run's
    # first step also carries the start's validation (plan.validation), in the same round.
    batch = ahead.take(plan)
    t1 = time.perf_counter()
    update, credit, update_s, sleep_s, wake_s, sync_s, wait_s = {}, {}, 0.0, 0.0, 0.0, 0.0, 0.0
    # Groups whose rewards all tie carry no signal (dropped, counted above); nor may a group
    # generated more than train.max_staleness updates ago.
    groups = learner.admit([g.table for g in batch.groups], ahead.max_staleness)
    if groups:
        sleep_s = fleet.sleep() + learner.reload_states()  # colocated: the GPU goes to the update
        rows = learner.prepare(groups)  # advantages: z-scores within each group
        ahead.start(next_plan)  # max_staleness=1: the next step's rollouts, during this update
        credit = credit_metrics(rows)  # Spearman(advantage, oracle) per group and kind, on those very rows
        t2 = time.perf_counter()
        update = learner.update(rows)  # the LoGo-GRPO update
        update_s = time.perf_counter() - t2
        wake_s = learner.offload_states() + fleet.wake(["weights"])  # colocated: the engine's weights back
        wait_s = ahead.wait()  # the rollouts ahead end before the engines take new weights
        sync_s = sync_weights(learner, fleet)  # new weights, new policy version
        wake_s += fleet.wake(["kv_cache"])  # colocated: room for the next rollouts
    return {
        **batch.summary(),
        "rollout_s": batch.wall_s,  # the rollouts' own time, run now or ahead
        "rollout_wait_s": t1 - t0,  # what this step waited for them
        "update_s": update_s,
        "ahead_wait_s": wait_s,
        "sync_s": sync_s,
        "sleep_s": sleep_s,
        "wake_s": wake_s,
        "step_time_s": time.perf_counter() - t0,
        **{k: update[k] for k in UPDATE_METRICS if k in update},
        **credit,  # credit_corr_global / credit_corr_local where the step has a defined group of that kind
        **({"validation": validation_metrics(batch.validation)} if batch.validation else {}),  # rode with the rollouts
        "stale_groups": learner.take_stale_groups(),
        "live_workers": len(fleet.live()),
        **fleet.take_faults(),  # worker_failures, tasks_retried, duplicate_results in this step
        "learner_restarts": learner.take_restarts(),  # rank sets recovered in this step
    }


def validation_metrics(results: list[EvalResult]) -> dict:
    """F1 over every validation question (as LoCoMo's tables pool them), with a bootstrap 95% CI."""
    scores = [r.score for r in results]
    f1s = [f for s in scores for f in s.f1s]
    return {
        "val_f1": statistics.fmean(f1s) if f1s else 0.0,
        "val_f1_ci": bootstrap_ci(f1s),
        "val_questions": len(f1s),
        "val_f1_per_question": f1s,
        "val_m_fail": statistics.fmean(s.m_fail for s in scores),
        "val_format_failures": sum(r.stats.format_failures for r in results),
        "val_answer_retries": sum(r.stats.answer_retries for r in results),
        "val_answer_failures": sum(r.stats.answer_failures for r in results),
    }


def epoch_batches(conversations: list[Conversation], per_step: int, seed: int, stage: int, epoch: int) -> list[list[Conversation]]:
    order = list(conversations)
    random.Random(request_seed(seed, "epoch", stage, epoch)).shuffle(order)
    return [order[i : i + per_step] for i in range(0, len(order), per_step)]


def run(cfg: Config, resume: Resume = "never", gpu_memory_gb: float | None = None) -> dict:
    start = time.perf_counter()
    check_sync_mode(cfg)
    check_fits(cfg, gpu_memory_gb)  # before anything starts: a rank out of memory fails after minutes
    check_model_name(cfg.model.name)  # one line here, not a traceback from inside every worker
    data = load_data(cfg)
    init_ray(cfg.cluster, job_asks(cfg))  # one line if the cluster will never hold the job (its GPUs)
    check_fits(cfg, gpu_memory_gb, ask_cluster=True)  # the GPUs are on other nodes than the driver's
    check_answer_agent(cfg.reward.answer_agent)  # from the cluster: it must reach the endpoint
    out = RunDir(cfg, resume)
    model, warm = warm_model(cfg, out.path)  # a name or a run-dir folder: each rank resolves it on its node
    stages = cfg.curriculum.stages
    val_horizon = stages[-1].horizon  # every validation on the final task, so all are comparable
    learner, fleet = start_roles(cfg, model, out.name, offload=resolve_offload_states(cfg, gpu_memory_gb) == "on")
    ahead = RolloutsAhead(fleet, cfg.train.max_staleness)
    state = TrainState()
    if out.resumed:
        state = out.load_state()
        learner.load_checkpoint(str(out.checkpoints), state.checkpoint)
        ahead.load(out.checkpoints / state.checkpoint)  # rollouts made before the kill, not yet trained on
        out.metrics.truncate_after(state.step)  # steps after the checkpoint: repeated below
    sync_weights(learner, fleet)  # engines start from the learner's weights, version stamped
    total = sum(len(epoch_batches(data["train"], cfg.train.conversations_per_step, 0, 0, 0)) * s.epochs for s in stages)
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step")
    while state.stage < len(stages) and not _stop(cfg, state):
        stage = stages[state.stage]
        batches = epoch_batches(data["train"], cfg.train.conversations_per_step, cfg.seed, state.stage, state.epoch)
        while state.batch < len(batches) and not _stop(cfg, state):
            plan = plan_step(cfg, batches[state.batch], stage.horizon, state.step)
            if state.val_f1_start is None:  # the start's validation, on these rollouts' weights, in their round
                plan = with_validation(plan, data["val"], val_horizon)
            following = _following(cfg, data["train"], state, batches)
            next_plan = following and plan_step(cfg, following, stage.horizon, state.step + 1)
            row = train_step(fleet, learner, ahead, plan, next_plan)
            if "validation" in row:  # step 0's row, before step 1's
                state.val_f1_start = _record_validation(out, row.pop("validation"), val_horizon, state)
            state.step, state.batch = state.step + 1, state.batch + 1
            out.metrics.write({"step": state.step, "stage": state.stage, "horizon": stage.horizon, **row}, out.name)
            bar.update()
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", val=f"{state.val_f1_last or 0:.3f}")
            epoch_done = state.batch == len(batches)
            if epoch_done:  # moves on to the next epoch, maybe the next stage
                _end_epoch(cfg, out, fleet, learner, data["val"], val_horizon, state)
            if checkpoint_due(cfg, state, stage_done=epoch_done and state.epoch == 0):  # epoch 0 of the next
                _checkpoint(out, learner, state, ahead)
            if epoch_done:
                break
    bar.close()
    _save_pretrained(out, learner, out.policy)  # the final policy as a model folder: `memr2 eval --policy <run dir>`
    summary = {
        "run": out.name,
        "policy": str(out.policy),
        "steps": state.step,
        "val_f1_start": state.val_f1_start,
        "val_f1_end": state.val_f1_last,
        "val_f1_best": state.best_val_f1,
        "best": str(out.path / state.best) if state.best else None,  # its weights, a model folder
        **_gain(state.validations),
        "warmstart": warm,
        "wall_s": time.perf_counter() - start,
    }
    out.write_summary(summary)
    out.plot()
    ahead.shutdown()
    fleet.shutdown()
    learner.shutdown()
    if learner.colocation:
        learner.colocation.remove()
    return summary


def start_roles(cfg: Config, model: str | Path, run_name: str, offload: bool) -> tuple[Learner, RolloutFleet]:
    """The learner's ranks and the fleet's engines, started side by side: a rank's set-up is a
    core for ~15 s, the engines' start their cores for ~40 s (SmolLM2 on this CPU), and neither
    needs the other until the first sync. Colocated, the ranks come first and park their states
    (learner.offload, what `memr2 plan` resolves), so the engines start awake beside them."""
    colocation = colocate(cfg)

    def learner() -> Learner:
        started = Learner(str(model), cfg.algo, cfg.learner, cfg.seed, colocation)
        started.offload = offload
        started.offload_states()
        return started

    def fleet() -> RolloutFleet:
        return RolloutFleet(cfg, run=run_name, other_bundles=job_asks(cfg).get("learner rank", []), colocation=colocation)

    if colocation:
        return learner(), fleet()
    with ThreadPoolExecutor(1, thread_name_prefix="fleet-start") as pool:
        starting = pool.submit(fleet)
        try:
            ranks = learner()
        except BaseException:
            with contextlib.suppress(Exception):  # its own error, if any, is not the one to report
                starting.result().shutdown()
            raise
        try:
            return ranks, starting.result()
        except BaseException:
            ranks.shutdown()
            raise


def load_data(cfg: Config) -> dict[str, list[Conversation]]:
    """The splits, read by the driver alone (tasks carry their conversations to the workers): under
    `ray job submit` a data path must exist on the node running the job's driver."""
    return split(load_dataset(cfg.data), cfg.data)


def _gain(validations: list[dict]) -> dict:
    """The first and last validation's CIs, and the gain's: a paired bootstrap over the same
    questions, so the noise of which questions were asked cancels out."""
    if not validations:
        return {}
    first, last = validations[0], validations[-1]
    before, after = first.get("val_f1_per_question", []), last.get("val_f1_per_question", [])
    diffs = [b - a for a, b in zip(before, after)] if len(before) == len(after) else []
    return {"val_f1_start_ci": first.get("val_f1_ci"), "val_f1_end_ci": last.get("val_f1_ci"),
            "val_f1_gain_ci": bootstrap_ci(diffs), "val_questions": len(before)}


def job_asks(cfg: Config) -> Asks:
    """What a training job needs placed at once: its rollout workers and learner ranks, or
    (colocated) a rank and a worker on each of learner.num_ranks GPUs."""
    rank = rank_resources(cfg.learner)
    if cfg.cluster.colocate:
        return {"colocated rank + worker": [pair_bundle(*pair_resources(cfg, rank, worker_resources(cfg)))] * cfg.learner.num_ranks}
    return {**fleet_asks(cfg), "learner rank": [rank] * cfg.learner.num_ranks}


def colocate(cfg: Config) -> Colocation | None:
    """cluster.colocate: the group every rank-and-worker pair shares (actors.fleet.colocation)."""
    if not cfg.cluster.colocate:
        return None
    return Colocation(*pair_resources(cfg, rank_resources(cfg.learner), worker_resources(cfg)), cfg.learner.num_ranks)


def _stop(cfg: Config, state: TrainState) -> bool:
    return cfg.train.max_steps is not None and state.step >= cfg.train.max_steps


def _following(cfg: Config, train: list[Conversation], state: TrainState, batches: list[list[Conversation]]) -> list[Conversation] | None:
    """The next step's conversations if it trains at this stage's horizon on these weights (its
    rollouts may then run ahead); None where the stage or the curriculum ends (a stage starts
    from the best weights, which rollouts run ahead would not have used). Past train.max_steps
    too: the run's last checkpoint keeps them, so a resumed run trains on what an unstopped one
    would have."""
    if state.batch + 1 < len(batches):
        return batches[state.batch + 1]
    if state.epoch + 1 < cfg.curriculum.stages[state.stage].epochs:
        return epoch_batches(train, cfg.train.conversations_per_step, cfg.seed, state.stage, state.epoch + 1)[0]
    return None


def checkpoint_due(cfg: Config, state: TrainState, stage_done: bool) -> bool:
    """Every checkpoint_every steps, which bounds the steps a kill repeats. At a stage's end too:
    the next stage's start (best weights, fresh optimizer) is then in a checkpoint, so a resume
    never goes back into a finished stage, and each finished stage keeps one best folder
    (run_outputs.checkpoint_disk_peak_files counts on it). And where max_steps stops the run, so
    that a resume repeats nothing."""
    return state.step % cfg.train.checkpoint_every == 0 or stage_done or _stop(cfg, state)


def _end_epoch(cfg, out, fleet, learner, val, val_horizon, state) -> None:
    """Validate, keep the best weights so far as a model folder, and start the next stage from
    them (the best over every validation, not only this stage's: all run at the final horizon)."""
    state.epoch, state.batch = state.epoch + 1, 0
    stage = cfg.curriculum.stages[state.stage]
    if state.epoch % cfg.curriculum.val_every == 0 or state.epoch == stage.epochs:
        f1 = _validate(out, fleet, val, val_horizon, state)
        if state.best_val_f1 is None or f1 > state.best_val_f1:
            # Named by its step, never overwritten: the folder the state on disk names survives a
            # kill. Bests written since that state (the one in memory included: this one replaces
            # it) go first, so at most two of a stage exist at once.
            out.prune()
            state.best_val_f1, state.best = f1, f"best-stage{state.stage}-step{state.step}"
            _save_pretrained(out, learner, out.path / state.best)
    if state.epoch == stage.epochs:
        state.stage, state.epoch = state.stage + 1, 0
        if state.stage < len(cfg.curriculum.stages) and state.best:
            learner.load_pretrained(str(out.path / state.best))  # fresh Adam moments, a new version
            sync_weights(learner, fleet)


def _validate(out: RunDir, fleet: RolloutFleet, val: list[Conversation], horizon: int, state: TrainState) -> float:
    return _record_validation(out, validation_metrics(fleet.evaluate(val, horizon)), horizon, state)


def _record_validation(out: RunDir, result: dict, horizon: int, state: TrainState) -> float:
    state.val_f1_last = result["val_f1"]
    state.validations.append({"step": state.step, **result})
    out.metrics.write({"step": state.step, "stage": state.stage, "horizon": horizon, **result}, out.name)
    return result["val_f1"]


def _checkpoint(out: RunDir, learner: Learner, state: TrainState, ahead: RolloutsAhead) -> None:
    """Weights (and rollouts run ahead) first under a new tag, then the state naming it: a kill at
    any point resumes from a state and weights of the same step. Then what that state no longer
    needs goes (out.prune)."""
    out.prune(state.best)  # a killed run's leftovers first: this step's tag may be one of them
    tag = f"step{state.step}"
    with out.writing(out.checkpoints / tag, learner.checkpoint_bytes()):
        learner.save_checkpoint(str(out.checkpoints), tag)
        ahead.save(out.checkpoints / tag)
        state.checkpoint = tag
        out.save_state(state)
    out.prune(state.best)


def _save_pretrained(out: RunDir, learner: Learner, folder: Path) -> None:
    with out.writing(folder, learner.checkpoint_bytes(weights_only=True)):
        learner.save_pretrained(str(folder))
