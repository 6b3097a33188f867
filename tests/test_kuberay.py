"""The KubeRay manifests: valid against KubeRay v1.7's CRDs in strict mode (what
`kubectl apply --validate=strict` rejects: unknown keys anywhere), KubeRay's Go-side rules that
the schema cannot say (../shared/schemas/README.md), and what the fleet needs of them."""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from common.config import load_config
from tests.shared_data import shared_or_skip

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "deploy/kuberay/raycluster.yaml").read_text())
JOB = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def strict_schema(crd_file: str) -> dict:
    crd = yaml.safe_load((shared_or_skip("schemas", "kuberay") / crd_file).read_text())
    schema = copy.deepcopy(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])

    def close(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is the API server's
    return schema


def kuberay_rule_errors(spec: dict) -> list[str]:
    """validation.go's rules: replicas bounds, autoscaler v2 settings, restart policies,
    rayStartParams, resources given once, DNS-1035 group names."""
    errs = []
    head = spec["headGroupSpec"]
    head_env = {e["name"] for c in head["template"]["spec"]["containers"] for e in c.get("env", [])}
    v2_option = (spec.get("autoscalerOptions") or {}).get("version") == "v2"
    if v2_option and "RAY_enable_autoscaler_v2" in head_env:
        errs.append("autoscaler v2 set twice")
    v2 = v2_option or "RAY_enable_autoscaler_v2" in head_env
    if v2 and not spec.get("enableInTreeAutoscaling"):
        errs.append("autoscaler v2 without enableInTreeAutoscaling")
    groups = [("head", head), *((g["groupName"], g) for g in spec["workerGroupSpecs"])]
    for name, group in groups:
        if v2 and group["template"]["spec"].get("restartPolicy", "Never") != "Never":
            errs.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
        params = group.get("rayStartParams", {})
        if any(not isinstance(v, str) for v in params.values()) or "labels" in params:
            errs.append(f"{name}: rayStartParams values must be strings, without labels")
        if group.get("resources") and "resources" in params:
            errs.append(f"{name}: resources in both rayStartParams and resources")
        if name != "head" and (not DNS1035.match(name) or group["minReplicas"] > group["maxReplicas"]):
            errs.append(f"{name}: bad name or minReplicas > maxReplicas")
    return errs


@pytest.mark.parametrize("doc,crd", [(CLUSTER, "ray.io_rayclusters.yaml"), (JOB, "ray.io_rayjobs.yaml")], ids=["RayCluster", "RayJob"])
def test_manifests_validate_strictly_against_kuberays_crds(doc, crd):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft7Validator(strict_schema(crd)).iter_errors(doc)]
    assert errors == []
    assert DNS1035.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert kuberay_rule_errors(spec) == []


def test_the_strict_check_catches_an_unknown_key_and_a_broken_rule():
    bad = copy.deepcopy(CLUSTER)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # a typo kubectl --validate=strict rejects
    assert list(Draft7Validator(strict_schema("ray.io_rayclusters.yaml")).iter_errors(bad))
    bad = copy.deepcopy(CLUSTER)
    bad["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    bad["spec"]["enableInTreeAutoscaling"] = False
    assert len(kuberay_rule_errors(bad["spec"])) == 2


def test_the_cluster_has_an_autoscaled_gpu_rollout_group_and_a_learner_group():
    spec = CLUSTER["spec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    rollout, learner = groups["rollout"], groups["learner"]
    gpus = lambda g: int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])  # noqa: E731
    assert rollout["minReplicas"] < rollout["maxReplicas"] and gpus(rollout) == 1 and rollout["resources"] == {"rollout": "1"}
    assert learner["minReplicas"] == learner["maxReplicas"] == 1 and gpus(learner) == 4
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the driver's node runs no rollout
    assert JOB["spec"]["rayClusterSpec"] == spec  # the job's cluster is this one


def test_the_job_runs_the_papers_training_and_a_retry_continues_it():
    job = JOB["spec"]
    assert job["backoffLimit"] >= 1 and yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["python", "-m", "memr2", "train"]
    i = argv.index("--resume")
    assert argv[i + 1] == "auto"  # a retried job continues from its checkpoint
    config = argv[argv.index("--config") + 1].replace("/app/memory-r2/", "")
    overrides = [a for a in argv[4:] if "=" in a]
    cfg = load_config(ROOT / config, overrides)  # every override is a real, valid config key
    assert config == "deploy/paper.yaml" and cfg.model.name == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.metrics.run_dir.startswith("/mnt/memr2") and cfg.metrics.run_name  # on the claim, a fixed name
    # Worker and learner actors ask for the custom resource their group provides.
    groups = {g["groupName"]: g for g in JOB["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(cfg.rollout.resources) == set(groups["rollout"]["resources"])
    assert set(cfg.learner.resources) == set(groups["learner"]["resources"])
    assert cfg.learner.num_ranks * cfg.learner.resources["learner"] <= float(groups["learner"]["resources"]["learner"])
    lo, hi = cfg.cluster.autoscale_min_actors, cfg.cluster.autoscale_max_actors
    assert groups["rollout"]["minReplicas"] <= lo <= hi <= groups["rollout"]["maxReplicas"]
