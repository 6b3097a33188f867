"""Start errors as the user meets them: `memr2 train` / `memr2 rollout` end in one line
`memr2: error: ...` (exit 2), before Ray and the engines start where the cause is knowable there.

The lines asserted here are the ones README's Troubleshooting section quotes."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from actors.fleet.cluster import require_resources
from common.synth import write_world

ROOT = Path(__file__).resolve().parents[1]
FIX = ("lower rollout.num_actors / cpus_per_actor / gpus_per_actor / resources or learner.num_ranks / cpus_per_rank / "
       "gpus_per_rank / resources, or add nodes")


def memr2(tmp_path: Path, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """The CLI in a clean environment: offline, its own HOME and (short) Ray temp dir, so that a
    cluster it starts neither joins nor is joined by another process's on this machine."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
           "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tempfile.mkdtemp(prefix="memr2-se-", dir="/tmp")}
    try:
        return subprocess.run([sys.executable, "-m", "memr2", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, env=env)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def one_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memr2: error: "), out.stderr[-2000:]
    return lines[0]


def test_an_empty_curriculum_is_rejected_by_the_config(tmp_path):
    out = memr2(tmp_path, "train", "curriculum.stages=[]", f"metrics.run_dir={tmp_path}/runs")
    assert one_line(out) == ("memr2: error: config curriculum.stages: needs at least one stage, "
                             "e.g. [{horizon: 2, epochs: 1}], got []")
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_session_without_a_date_names_the_file_conversation_and_session(tmp_path):
    path = tmp_path / "world.json"
    world = write_world(path, conversations=3, sessions=3, seed=0)
    del world[1]["conversation"]["session_2_date_time"]
    path.write_text(json.dumps(world))
    out = memr2(tmp_path, "train", "data.source=file", f"data.path={path}", "model.name=tiny",
                f"metrics.run_dir={tmp_path}/runs")
    sample = world[1]["sample_id"]
    assert one_line(out) == (f"memr2: error: {path}[1] ({sample}).conversation.session_2_date_time: missing, "
                             f"but session_2 has {len(world[1]['conversation']['session_2'])} turn(s)")
    assert "Ray" not in out.stderr and not (tmp_path / "ray").exists()


def test_a_model_without_a_chat_template_stops_before_ray(tmp_path):
    from actors.engines.models import build_tiny

    folder = build_tiny(tmp_path / "tiny-no-template")
    (folder / "chat_template.jinja").unlink()
    out = memr2(tmp_path, "train", f"model.name={folder}", f"metrics.run_dir={tmp_path}/runs")
    assert one_line(out) == (f"memr2: error: model '{folder}': the tokenizer has no chat_template (none in "
                             "tokenizer_config.json, no chat_template.jinja); every prompt is a chat: use a "
                             "chat/instruct checkpoint or add its template")
    assert not (tmp_path / "runs").exists()  # the driver's first checks: before the run dir, data and Ray


@pytest.fixture(scope="module")
def local_cluster():
    """A 2-CPU cluster this process starts (or the conftest one, if a module before started it):
    `address="local"`, so that it never joins another process's cluster on this machine."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray


@pytest.mark.slow
def test_asks_a_local_cluster_can_never_hold_fail_at_once(local_cluster):
    """Started by this process with 2 CPUs and no autoscaler, so its nodes are all it will have:
    no waiting out cluster.placement_timeout_s."""
    cases = [
        ({"rollout actor": [{"CPU": 0.5, "GPU": 1}] * 2, "learner rank": [{"CPU": 0.5}]},
         "2 rollout actor(s) of 0.5 CPU, 1 GPU + 1 learner rank(s) of 0.5 CPU, 0 GPU (it has 2 CPU, 0 GPU) and never "
         "will: it has no autoscaler, and no node has 1 GPU (the most one has is 0)"),
        ({"rollout actor": [{"CPU": 1, "nowhere": 1}]},
         "1 rollout actor(s) of 1 CPU, 0 GPU, 1 nowhere (it has 2 CPU, 0 GPU, 0 nowhere) and never will: it has no "
         "autoscaler, and no node has 1 nowhere (the most one has is 0)"),
        ({"rollout actor": [{"CPU": 1}] * 2, "learner rank": [{"CPU": 1}]},
         "2 rollout actor(s) of 1 CPU, 0 GPU + 1 learner rank(s) of 1 CPU, 0 GPU (it has 2 CPU, 0 GPU) and never will: "
         "it has no autoscaler, and has 2 CPU of the 3 asked in all"),
    ]
    for asks, why in cases:
        began = time.monotonic()
        with pytest.raises(ValueError) as err:
            require_resources(asks, timeout_s=300)
        assert str(err.value) == f"the cluster cannot hold {why}: {FIX}"
        assert time.monotonic() - began < 10  # not the 300 s placement budget
    require_resources({"rollout actor": [{"CPU": 1}] * 2}, timeout_s=300)  # fits: placed and released


@pytest.mark.slow
def test_a_gpu_on_a_cpu_only_machine_is_one_line_from_the_cli(tmp_path):
    began = time.monotonic()
    out = memr2(tmp_path, "rollout", "--smoke", "rollout.gpus_per_actor=1")
    assert one_line(out) == ("memr2: error: the cluster cannot hold 2 rollout actor(s) of 1 CPU, 1 GPU (it has 2 CPU, "
                             "0 GPU) and never will: it has no autoscaler, and no node has 1 GPU (the most one has "
                             f"is 0): {FIX}")
    assert time.monotonic() - began < 120  # cluster.placement_timeout_s is 300
