from pathlib import Path

import pytest

from common.config import Config, ConfigError, load_config


def test_defaults_are_the_reference_hyperparameters():
    cfg = Config()
    assert (cfg.algo.local_prob, cfg.algo.clip_eps, cfg.algo.dual_clip) == (0.5, 0.2, 3.0)
    assert (cfg.algo.kl_beta, cfg.algo.entropy_eta, cfg.reward.alpha, cfg.reward.lam) == (0.001, 0.001, 0.7, 0.3)
    assert [s.horizon for s in cfg.curriculum.stages] == [2]  # the embedded default's short run


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("algo:\n  local_prob: 0.25\nrollout:\n  n_global: 8\n")
    cfg = load_config(path, ["algo.local_prob=0.75", "memory.retriever=minilm", "data.val_ids=[conv-44, conv-26]"])
    assert cfg.algo.local_prob == 0.75  # the command line wins over the file
    assert cfg.rollout.n_global == 8
    assert cfg.memory.retriever == "minilm"
    assert cfg.data.val_ids == ["conv-44", "conv-26"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("algo.local_probb=0.5", "unknown config key algo.local_probb"),
        ("algo.local_prob=1.5", "config algo.local_prob: Input should be less than or equal to 1, got 1.5"),
        ("memory.retriever=tfidf", "config memory.retriever: Input should be 'bm25' or 'minilm', got 'tfidf'"),
        ("learner.micro_batch=5", "config learner: learner.micro_batch must divide learner.mini_batch"),
        ("algo.local_prob", "not of the form key.path=value"),
        ("seed.x=1", "config key seed is a value, not a section"),
        ("rollout.n_global=1", "config rollout.n_global: Input should be greater than or equal to 2, got 1"),
        ("curriculum.stages=[]", "config curriculum.stages: needs at least one stage, e.g. [{horizon: 2, epochs: 1}], got []"),
        ("train.max_staleness=2", "config train.max_staleness: Input should be less than or equal to 1, got 2"),
        ("learner.shared_prefix=maybe", "config learner.shared_prefix: Input should be 'auto', 'on' or 'off'"),
        ("cluster.colocate=true train.max_staleness=1 rollout.num_actors=1", "cluster.colocate needs train.max_staleness=0"),
        ("algo.off_policy=anchor", "config algo.off_policy: Input should be 'behaviour', 'proximal' or 'decoupled'"),
        ("rollout.deterministic=true", "config rollout: rollout.deterministic needs rollout.tasks_per_worker=1 (got 4)"),
    ],
)
def test_bad_keys_and_values_fail_with_one_line_naming_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, override.split(" "))
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algo: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.algo.clip_eps = 0.3


def test_the_shipped_paper_config_loads_with_the_papers_numbers():

    cfg = load_config(Path(__file__).resolve().parents[1] / "deploy" / "paper.yaml")
    assert (cfg.rollout.n_global, cfg.rollout.m_local, cfg.rollout.chunks_per_session, cfg.memory.related_top_k) == (16, 4, 6, 25)
    assert (cfg.learner.lr, cfg.learner.ppo_epochs, cfg.learner.mini_batch) == (2e-6, 2, 16)
    assert [(s.horizon, s.epochs) for s in cfg.curriculum.stages] == [(8, 10), (16, 5), (32, 5)]
    assert cfg.reward.answer_agent.kind == "openai" and cfg.data.source == "locomo"


def test_bare_on_and_off_mean_what_they_say():
    """YAML turns a bare on/off into a boolean; for learner.bf16 they are the words a user typed."""
    assert load_config(None, ["learner.bf16=on"]).learner.bf16 == "on"
    assert load_config(None, ["learner.bf16=off"]).learner.bf16 == "off"
    with pytest.raises(ConfigError, match="learner.bf16"):
        load_config(None, ["learner.bf16=maybe"])


def test_a_partial_section_keeps_the_defaults_of_its_other_fields(tmp_path):
    """The warm start's world differs from SynthConfig's own defaults (seed 1000, no validation);
    overriding one of its fields must not reset the others to the class defaults."""
    default = Config().train.warmstart.synth
    cfg = load_config(None, ["train.warmstart.synth.conversations=3"])
    assert cfg.train.warmstart.synth == default.model_copy(update={"conversations": 3})
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  warmstart:\n    synth:\n      sessions: 2\n")
    assert load_config(path).train.warmstart.synth == default.model_copy(update={"sessions": 2})


def test_run_directory_defaults_and_resume_modes(tmp_path, monkeypatch):
    from learner.run_outputs import RunDir, run_root

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert run_root(load_config()) == Path("runs")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # the entrypoint of `ray job submit`
    monkeypatch.setenv("HOME", str(tmp_path))
    assert run_root(load_config()) == tmp_path / "memr2-runs"  # not the job's temporary working dir
    cfg = load_config(None, [f"metrics.run_dir={tmp_path / 'abs'}", "metrics.run_name=r", "metrics.prometheus=false"])
    assert run_root(cfg) == tmp_path / "abs"
    assert RunDir(cfg, "auto").resumed is False  # nothing to resume: starts fresh
    with pytest.raises(ValueError, match="--resume: no checkpointed run at"):
        RunDir(cfg, "always")
    (tmp_path / "abs" / "r" / "state.json").write_text("{}")
    assert RunDir(cfg, "auto").resumed is True and RunDir(cfg, "always").resumed is True
    with pytest.raises(ValueError, match="exists: pass --resume"):
        RunDir(cfg, "never")
