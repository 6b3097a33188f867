"""The KubeRay manifests: valid against KubeRay v1.7's CRDs in strict mode (what
`kubectl apply --validate=strict` rejects: unknown keys anywhere), KubeRay's Go-side rules that
the schema cannot say (../shared/schemas/README.md), and what the fleet needs of them. Two
variants: raycluster/rayjob.yaml (disaggregated: an autoscaled rollout group and a learner group)
and raycluster/rayjob-4gpu.yaml (colocated, deploy/paper-4gpu.yaml: one group of 4-GPU pods)."""

import copy
import re
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml
from jsonschema import Draft7Validator

from common.config import load_config
from tests.shared_data import shared_or_skip

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "deploy/kuberay/raycluster.yaml").read_text())
JOB = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
CLUSTER_4GPU = yaml.safe_load((ROOT / "deploy/kuberay/raycluster-4gpu.yaml").read_text())
JOB_4GPU = yaml.safe_load((ROOT / "deploy/kuberay/rayjob-4gpu.yaml").read_text())
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CLAIM = yaml.safe_load((ROOT / "deploy/kuberay/pvc.yaml").read_text())["metadata"]["name"]
USERS_GID = 100  # the ray image runs as ray: uid 1000, group users (deploy/Dockerfile)
POLICY_7B_BYTES = 15.3e9  # Qwen2.5-7B in bf16: one policy version in the object store


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


@pytest.mark.parametrize("doc,crd", [(CLUSTER, "ray.io_rayclusters.yaml"), (JOB, "ray.io_rayjobs.yaml"),
                                     (CLUSTER_4GPU, "ray.io_rayclusters.yaml"), (JOB_4GPU, "ray.io_rayjobs.yaml")],
                         ids=["RayCluster", "RayJob", "RayCluster-4gpu", "RayJob-4gpu"])
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


def pod_templates(spec: dict) -> dict[str, dict]:
    """Every pod that runs Ray (the head's too: the keeper and the policy store are actors)."""
    return {"head": spec["headGroupSpec"]["template"]["spec"], **{g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}}


def mounts(pod: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there, over the pod's containers."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for c in pod["containers"] for m in c.get("volumeMounts", [])}


def quantity_bytes(q: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]i?)?", str(q)).groups()
    return float(number) * ({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit] if unit else 1)


def pod_problems(pod: dict, holds_policy: bool = True) -> list[str]:
    """The claim at /mnt/memr2, writable by the image's group; /dev/shm a memory volume that leaves
    most of the pod's memory and, on the learner and rollout pods (not the head, whose store holds
    only memory snapshots), holds a 7B policy in Ray's object store (95% of /dev/shm)."""
    errs, at = [], mounts(pod)
    if (at.get("/mnt/memr2") or {}).get("persistentVolumeClaim", {}).get("claimName") != CLAIM:
        errs.append(f"the {CLAIM} claim is not mounted at /mnt/memr2")
    if (pod.get("securityContext") or {}).get("fsGroup") != USERS_GID:
        errs.append(f"no fsGroup {USERS_GID}: the claim is not writable by the image's user")
    shm = (at.get("/dev/shm") or {}).get("emptyDir") or {}
    memory = quantity_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
    if shm.get("medium") != "Memory" or "sizeLimit" not in shm:
        errs.append("/dev/shm is not a sized memory volume: Ray's object store falls back to /tmp")
    elif (holds_policy and 0.95 * quantity_bytes(shm["sizeLimit"]) < POLICY_7B_BYTES) or quantity_bytes(shm["sizeLimit"]) > memory / 2:
        errs.append(f"/dev/shm of {shm['sizeLimit']}: not a 7B policy, or over half the pod's memory")
    return errs


@pytest.mark.parametrize("doc,groups", [(CLUSTER, ["rollout", "learner"]), (JOB, ["rollout", "learner"]),
                                        (CLUSTER_4GPU, ["colocated"]), (JOB_4GPU, ["colocated"])],
                         ids=["RayCluster", "RayJob", "RayCluster-4gpu", "RayJob-4gpu"])
def test_every_ray_pod_mounts_the_claim_writable_and_a_dev_shm_for_the_object_store(doc, groups):
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    problems = {name: pod_problems(pod, holds_policy=name != "head") for name, pod in pod_templates(spec).items()}
    assert problems == {name: [] for name in ["head", *groups]}


def test_the_pod_check_catches_a_rollout_pod_without_the_claim_or_a_sized_dev_shm():
    rollout = copy.deepcopy(pod_templates(CLUSTER["spec"])["rollout"])
    rollout.pop("securityContext")
    rollout["containers"][0]["volumeMounts"] = [m for m in rollout["containers"][0]["volumeMounts"] if m["mountPath"] != "/mnt/memr2"]
    next(v for v in rollout["volumes"] if v["name"] == "dshm")["emptyDir"].pop("sizeLimit")
    assert len(pod_problems(rollout)) == 3


@pytest.mark.parametrize("job", [JOB, JOB_4GPU], ids=["RayJob", "RayJob-4gpu"])
def test_the_hub_cache_is_on_the_claim_every_pod_mounts(job):
    hf_home = PurePosixPath(yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["HF_HOME"])
    for name, pod in pod_templates(job["spec"]["rayClusterSpec"]).items():
        under = [v for path, v in mounts(pod).items() if hf_home.is_relative_to(path)]
        assert under and under[-1].get("persistentVolumeClaim", {}).get("claimName") == CLAIM, name


def colocated_job_config():
    argv = shlex.split(JOB_4GPU["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    assert PurePosixPath(config).is_relative_to("/app/memory-r2")  # the image's source tree (deploy/Dockerfile)
    return argv, config.replace("/app/memory-r2/", ""), load_config(ROOT / config.replace("/app/memory-r2/", ""),
                                                                     [a for a in argv[4:] if "=" in a])


def test_the_colocated_cluster_is_one_fixed_group_of_4_gpu_pods():
    spec = CLUSTER_4GPU["spec"]
    assert JOB_4GPU["spec"]["rayClusterSpec"] == spec  # the job's cluster is this one
    (group,) = spec["workerGroupSpecs"]  # no learner group, no rollout group: every pair on one GPU
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 4 and group["minReplicas"] == group["replicas"] == group["maxReplicas"]
    assert not spec.get("enableInTreeAutoscaling")  # a fixed fleet: nothing to scale
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    _, _, cfg = colocated_job_config()
    assert group["replicas"] * int(limits["nvidia.com/gpu"]) == cfg.learner.num_ranks  # a GPU a bundle
    # Every bundle's CPUs (a rank's and its worker's) fit the pods, and the custom resources asked are given.
    bundles_cpu = cfg.learner.num_ranks * (cfg.learner.cpus_per_rank + cfg.rollout.cpus_per_actor)
    assert bundles_cpu <= group["replicas"] * float(limits["cpu"])
    given = set(group.get("resources", {}))
    assert set(cfg.learner.resources) <= given and set(cfg.rollout.resources) <= given


def test_the_colocated_job_runs_the_4_gpu_paper_setting_and_a_retry_continues_it():
    job = JOB_4GPU["spec"]
    assert job["backoffLimit"] >= 1 and yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    argv, config, cfg = colocated_job_config()
    assert argv[:4] == ["python", "-m", "memr2", "train"] and argv[argv.index("--resume") + 1] == "auto"
    assert config == "deploy/paper-4gpu.yaml" and cfg.cluster.colocate and cfg.learner.num_ranks == 4
    assert cfg.model.name == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.metrics.run_dir.startswith("/mnt/memr2") and cfg.metrics.run_name  # on the claim, a fixed name


@pytest.mark.parametrize("sleep_level", [1, 2])
def test_the_colocated_pod_holds_the_host_memory_the_plan_asks(sleep_level):
    """On 80 GB GPUs the plan offloads the ranks' optimizer state and fp32 master to pinned host
    memory (and at sleep level 1 the engines' weights): they, /dev/shm and the learner pod's former
    256Gi for everything else fit the pod's memory."""
    from learner.plan.report import make_plan

    argv, config, _ = colocated_job_config()
    cfg = load_config(ROOT / config, [a for a in argv[4:] if "=" in a] + [f"rollout.sleep_level={sleep_level}"])
    host = make_plan(cfg, gpu_memory_gb=80)["colocate"]["host_memory"]
    (group,) = CLUSTER_4GPU["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
    memory = quantity_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
    assert host["gpus_per_node"] == int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert host["per_node_gb"] * 1e9 + quantity_bytes(shm) + quantity_bytes("256Gi") <= memory
