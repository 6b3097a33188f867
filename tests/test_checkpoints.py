"""Which steps write a checkpoint, what prune() keeps of a run's weights, and the disk peak a
planner sizes a run by (learner.train.checkpoint_due, learner.run_outputs). No Ray: the runs
that write these are tests/test_train_resume.py."""

import json

import pytest

from common.config import ConfigError, load_config
from learner.run_outputs import RunDir, TrainState, checkpoint_disk_peak_files
from learner.train import checkpoint_due


def due_steps(*overrides: str) -> list[int]:
    """The steps that checkpoint, walking the curriculum as train.run does (one step an epoch)."""
    cfg = load_config(None, list(overrides))
    state, due = TrainState(), []
    for k, stage in enumerate(cfg.curriculum.stages):
        for epoch in range(stage.epochs):
            state.step += 1
            if checkpoint_due(cfg, state, stage_done=epoch == stage.epochs - 1):
                due.append(state.step)
            if cfg.train.max_steps == state.step:
                return due
    return due


def test_checkpoints_every_n_steps_at_stage_ends_and_where_max_steps_stops():
    stages = "curriculum.stages=[{horizon: 2, epochs: 4}, {horizon: 2, epochs: 3}]"
    assert due_steps(stages) == [3, 4, 6, 7]  # the default: every third step
    assert due_steps(stages, "train.checkpoint_every=1") == [1, 2, 3, 4, 5, 6, 7]
    assert due_steps(stages, "train.checkpoint_every=3", "train.max_steps=5") == [3, 4, 5]


@pytest.mark.parametrize("key", ["train.checkpoint_every", "train.keep_checkpoints"])
def test_a_bad_checkpoint_setting_is_one_line_naming_the_key(key):
    with pytest.raises(ConfigError, match=rf"^config {key}: .* greater than or equal to 1") as err:
        load_config(None, [f"{key}=0"])
    assert "\n" not in str(err.value)


def run_dir(tmp_path, keep=1, resume="never"):
    cfg = load_config(None, [f"metrics.run_dir={tmp_path}", "metrics.run_name=r", "metrics.prometheus=false",
                             "metrics.loggers=[jsonl]", f"train.keep_checkpoints={keep}"])
    return RunDir(cfg, resume)


def test_prune_keeps_what_the_saved_state_covers_and_the_best_in_memory(tmp_path):
    out = run_dir(tmp_path, keep=2)
    names = ["checkpoints/step2", "checkpoints/step4", "checkpoints/step6", "checkpoints/step8",
             "best-stage0-step1", "best-stage0-step4", "best-stage1-step5", "best-stage1-step6", "best-stage1-step7",
             "best-stage1-step8", "policy", "warmstart"]
    for name in names:
        (tmp_path / "r" / name).mkdir(parents=True)
    (tmp_path / "r" / "checkpoints" / "latest").write_text("step8")  # DeepSpeed's own pointer: left alone
    out.save_state(TrainState(step=6, checkpoint="step6", best="best-stage1-step6"))
    out.prune(best="best-stage1-step7")
    left = sorted(str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").glob("**/*") if p.name != "config.json")
    # Covered by the state of step 6: the newest 2 checkpoints and the newest best of each stage.
    # Newer: a killed run's, except step 7's best, which the state in memory names.
    assert left == ["best-stage0-step4", "best-stage1-step6", "best-stage1-step7", "checkpoints", "checkpoints/latest",
                    "checkpoints/step4", "checkpoints/step6", "policy", "state.json", "warmstart"]


def test_a_fresh_start_drops_the_rows_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    out = run_dir(tmp_path)
    out.metrics.write({"step": 1, "reward_mean": 0.5}, "r")
    assert run_dir(tmp_path).metrics.rows() == []  # no state.json: a fresh start, not appended to
    out.metrics.write({"step": 1, "reward_mean": 0.5}, "r")
    out.save_state(TrainState(step=1, checkpoint="step1"))
    resumed = run_dir(tmp_path, resume="auto")
    assert resumed.resumed and resumed.metrics.rows() == [{"step": 1, "reward_mean": 0.5}]
    assert resumed.load_state().step == resumed.saved_step == 1
    assert json.loads((tmp_path / "r" / "state.json").read_text())["best"] is None


def test_the_disk_peak_counts_checkpoints_and_model_folders():
    # The paper: 2 full checkpoints (one kept, the next being written) and 5 model folders (a best
    # for each of 3 stages, the 3rd stage's next best, the final policy; no warm start).
    assert checkpoint_disk_peak_files(load_config("deploy/paper.yaml")) == {"deepspeed_checkpoints": 2, "model_folders": 5}
    laptop = load_config(None, ["train.keep_checkpoints=3"])  # one stage, a warm start
    assert checkpoint_disk_peak_files(laptop) == {"deepspeed_checkpoints": 4, "model_folders": 4}


def test_a_model_folder_cut_short_is_never_taken_for_a_finished_one(tmp_path):
    """save_hf writes beside and renames: a kill mid-write leaves no config.json at the folder's
    path, so a resumed run (or bench) makes its warm start again instead of loading half of one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from learner.engine import save_hf

    class Engine:  # what save_hf reads of a DeepSpeed engine: the module
        module = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1))

    out = tmp_path / "warmstart"
    state = Engine.module.state_dict()
    killed = Engine.module.save_pretrained

    def cut_short(folder, **kw):
        Engine.module.config.save_pretrained(folder)  # the config goes first, as in transformers
        raise KeyboardInterrupt

    Engine.module.save_pretrained = cut_short
    with pytest.raises(KeyboardInterrupt):
        save_hf(Engine, state, str(out), str(tmp_path))
    assert not out.exists() and (tmp_path / "warmstart.part" / "config.json").is_file()
    Engine.module.save_pretrained = killed
    save_hf(Engine, state, str(out), str(tmp_path))
    assert (out / "config.json").is_file() and not (tmp_path / "warmstart.part").exists()
    loaded = LlamaForCausalLM.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
