"""Every node finds what it needs itself (README, Running on a cluster: What must be shared).

- Data: `memr2 train`'s data loading under a real `ray job submit` (a head started by the test in
  its own PID and network namespace, as tests/test_fleet_autoscaling.py does: when the namespace's
  first process exits the kernel ends every process in it, so no `ray stop` touches other Ray
  processes) reads an absolute path, and paper.yaml's relative default fails in one line.
- Models: on a `ray.cluster_utils.Cluster` whose nodes have different HF caches (offline), a
  learner rank and a rollout-side task each resolve the same hub id into their own node's cache.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.namespaces import namespaces_or_skip

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "memr2-test/tiny"


@pytest.fixture
def short_tmp():
    """Ray's socket paths must stay under 108 bytes: pytest's tmp_path is too deep."""
    path = Path(tempfile.mkdtemp(prefix="memr2-paths-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# data under `ray job submit`


def locomo_like(path: Path) -> None:
    """A small file in LoCoMo's schema with paper.yaml's split ids (conv-43, conv-47 | conv-44)."""
    from common.synth import generate_world

    world = generate_world(3, 2, seed=0)
    for conv, sample_id in zip(world, ("conv-43", "conv-44", "conv-47")):
        conv["sample_id"] = sample_id
    path.write_text(json.dumps(world))


def test_under_ray_job_submit_the_data_path_is_absolute_and_a_relative_one_fails_in_one_line(short_tmp):
    namespaces_or_skip()
    data = short_tmp / "locomo10.json"
    locomo_like(data)
    submit = ("ray job submit --address http://127.0.0.1:8265 --working-dir . "
              "--runtime-env deploy/runtime_env.yaml --")
    # The README's route-1 command, its data path absolute (good) or paper.yaml's default (bad).
    script = f"""
ip link set lo up
export PATH={Path(sys.executable).parent}:$PATH RAY_AUTH_MODE=disabled RAY_ADDRESS=
ray start --head --num-cpus=1 --port=6390 --dashboard-port=8265 --temp-dir={short_tmp}/ray \
    --disable-usage-stats > {short_tmp}/head.log 2>&1 || exit 3
{submit} python -m tests.data_job --config deploy/paper.yaml data.locomo_path={data} > {short_tmp}/good.log 2>&1
echo $? > {short_tmp}/good.rc
{submit} python -m memr2 train --config deploy/paper.yaml model.name=tiny metrics.run_dir={short_tmp}/runs \
    > {short_tmp}/bad.log 2>&1
echo $? > {short_tmp}/bad.rc
"""
    proc = subprocess.run(["unshare", "-p", "-n", "-f", "--mount-proc", "bash", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    logs = {n: (short_tmp / f"{n}.log").read_text() if (short_tmp / f"{n}.log").exists() else "" for n in ("head", "good", "bad")}
    assert proc.returncode == 0, (proc.stderr[-2000:], logs)

    good = json.loads(next(line for line in logs["good"].splitlines() if line.startswith('{"cwd"')))
    assert (short_tmp / "good.rc").read_text().strip() == "0", logs["good"][-3000:]
    assert good["train"] == ["conv-43", "conv-47"] and good["val"] == ["conv-44"]
    assert Path(good["cwd"]) != ROOT and "working_dir" in good["cwd"]  # the job ran in Ray's temporary copy

    assert (short_tmp / "bad.rc").read_text().strip() != "0", logs["bad"][-3000:]
    # The CLI shows the job's log, then again its last lines as the failed job's status message.
    errors = {line for line in logs["bad"].splitlines() if line.startswith("memr2: error:")}
    assert errors == {"memr2: error: ../shared/data/locomo/locomo10.json: no such data file (under `ray job submit` "
                      "a relative path is read from the job's working dir, a temporary copy of the submitted folder: "
                      "pass an absolute path on the node running the job's driver, e.g. "
                      "data.locomo_path=/data/locomo10.json)"}, logs["bad"][-3000:]
    assert "Traceback" not in logs["bad"]


# ---------------------------------------------------------------------------------------------
# models resolved on each node


def hub_cache(hf_home: Path, model: Path | None) -> Path:
    """An HF_HOME whose hub cache holds `model` as the snapshot of HUB_ID (huggingface_hub's layout:
    refs/main names the commit, snapshots/<commit>/ holds the files); empty for None."""
    repo = hf_home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    if model is not None:
        commit = "0" * 40
        shutil.copytree(model, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    hf_home.mkdir(parents=True, exist_ok=True)
    return hf_home


def test_a_learner_rank_and_a_worker_resolve_a_hub_id_in_their_own_nodes_cache(short_tmp, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from actors.engines.models import resolve_model
    from common.config import load_config
    from learner.deepspeed_learner import Learner
    from learner.warmstart import warm_model

    def resolve_like_a_worker(name: str) -> dict:  # defined here: Ray ships it by value
        """What RolloutWorker.start does with model.name (the transformers engine: no vLLM needed)."""
        from actors.engines.factory import make_engine

        folder = resolve_model(name)
        make_engine(folder, "transformers", max_model_len=256)
        return {"folder": str(folder), "node": ray.get_runtime_context().get_node_id()}

    tiny = resolve_model("tiny")
    homes = {"driver": hub_cache(short_tmp / "hf-driver", None),  # the driver's cache lacks it
             "learner": hub_cache(short_tmp / "hf-learner", tiny), "rollout": hub_cache(short_tmp / "hf-rollout", tiny)}
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if ray.is_initialized():
        ray.shutdown()  # the other tests' local cluster; tests/conftest.py starts it again after
    # A raylet starts from this process's environment and its workers inherit it: HF_HOME per node.
    monkeypatch.setenv("HF_HOME", str(homes["driver"]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {}
    for role in ("learner", "rollout"):
        monkeypatch.setenv("HF_HOME", str(homes[role]))
        nodes[role] = cluster.add_node(num_cpus=1, resources={role: 1})
    monkeypatch.setenv("HF_HOME", str(homes["driver"]))
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        cluster.wait_for_nodes()
        cfg = load_config(overrides=[f"model.name={HUB_ID}", "train.warmstart.enabled=false"])
        model, _ = warm_model(cfg, short_tmp / "run")
        assert model == HUB_ID  # the name goes to the ranks, not a folder resolved here
        learner_cfg = cfg.learner.model_copy(update={"num_ranks": 1, "cpus_per_rank": 1.0, "resources": {"learner": 1},
                                                     "frozen_layers": 0, "bf16": "off"})
        rollout = ray.get(ray.remote(resolve_like_a_worker).options(num_cpus=1, resources={"rollout": 1}).remote(model))
        with Learner(str(model), cfg.algo.model_copy(update={"kl_beta": 0.0}), learner_cfg, cfg.seed) as learner:
            rank = ray.get(learner.ranks[0].__ray_call__.remote(
                lambda self: {"folder": self.model_dir, "node": ray.get_runtime_context().get_node_id()}))
            assert learner.state_dict()  # the rank's engine loaded the snapshot
            learner.save_pretrained(str(short_tmp / "saved"))  # copies the tokenizer from the rank's folder
        assert (short_tmp / "saved" / "tokenizer.json").is_file()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert rank["node"] == nodes["learner"].node_id and rollout["node"] == nodes["rollout"].node_id
    assert Path(rank["folder"]).is_relative_to(homes["learner"] / "hub"), rank
    assert Path(rollout["folder"]).is_relative_to(homes["rollout"] / "hub"), rollout
