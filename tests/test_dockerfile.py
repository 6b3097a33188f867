"""deploy/Dockerfile, read statically (no Docker engine here): it must build with BuildKit and with
the classic builder, and agree with the project and the KubeRay manifests it serves."""

import re
import shlex
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "deploy/Dockerfile").read_text()
BASE_USER = "ray"  # rayproject/ray images run as ray (uid 1000, group users = 100)
# What deploy/Dockerfile was before it built without BuildKit: the check must refuse it.
ROOT_OWNED_EDITABLE = """\
FROM rayproject/ray:2.60.0-py311-gpu
WORKDIR /app/memory-r2
COPY --chown=ray:users . .
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir -e ".[gpu]"
"""


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in joined.splitlines() if ln.strip()]


def commands(run: str) -> list[list[str]]:
    """A RUN line's commands (split on && and ;), each as argv."""
    return [shlex.split(c) for c in re.split(r"&&|;", run) if c.strip()]


def installs_the_tree(argv: list[str]) -> bool:
    return argv[:2] == ["pip", "install"] and any(a == "." or a.startswith(".[") for a in argv[2:])


def dockerfile_errors(text: str) -> list[str]:
    """Who owns what, step by step: the classic builder makes WORKDIR root's, and installing the
    source tree (editable or not: setuptools writes build/ and *.egg-info into it) needs the
    running user to own it."""
    errs, user, workdir, owned = [], BASE_USER, "/", set()
    for op, args in instructions(text):
        if op == "USER":
            user = args.split(":")[0]
        elif op == "WORKDIR":
            workdir = args
        elif op == "COPY":
            chown = re.search(r"--chown=(\S+)", args)
            if chown is None or chown.group(1).split(":")[0] != user:
                errs.append(f"COPY {args}: not --chown'd to the running user {user}")
        elif op == "RUN":
            for argv in commands(args):
                if argv[:1] == ["sudo"]:
                    argv = argv[1:]
                elif argv[:1] == ["chown"] and user != "root":
                    errs.append(f"RUN {' '.join(argv)}: as {user}, not root")
                if argv[:1] == ["chown"]:
                    owner, *paths = [a for a in argv[1:] if not a.startswith("-")]
                    owned.update((owner.split(":")[0], path) for path in paths)
                if installs_the_tree(argv) and (user, workdir) not in owned and user != "root":
                    errs.append(f"RUN {' '.join(argv)}: {workdir} is root's under the classic builder; chown it to {user} first")
                if installs_the_tree(argv) and ({"-e", "--editable"} & set(argv)):
                    errs.append(f"RUN {' '.join(argv)}: an editable install; the image's code is fixed")
    if user != BASE_USER:
        errs.append(f"the image ends as {user}, not {BASE_USER} (KubeRay's pods and fsGroup 100 expect it)")
    return errs


def test_the_image_builds_without_buildkit():
    assert dockerfile_errors(DOCKERFILE) == []


def test_the_check_refuses_a_root_owned_workdir_and_an_editable_install():
    errs = dockerfile_errors(ROOT_OWNED_EDITABLE)
    assert len(errs) == 2 and "root's under the classic builder" in errs[0] and "editable" in errs[1]
    assert any("not --chown'd" in e for e in dockerfile_errors(DOCKERFILE.replace("--chown=ray:users", "--chown=root:root")))
    assert any("ends as root" in e for e in dockerfile_errors(DOCKERFILE + "USER root\n"))
    assert any("as ray, not root" in e for e in dockerfile_errors(DOCKERFILE.replace("USER root\n", "")))


def test_the_image_agrees_with_the_project_and_the_manifests():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = dict(re.match(r"([\w-]+)(?:\[.*\])?==(.+)", d).groups() for d in project["project"]["dependencies"])
    ops = instructions(DOCKERFILE)
    base = next(args for op, args in ops if op == "FROM")
    assert base == f"rayproject/ray:{pins['ray']}-py311-gpu"  # the Ray the project pins
    run = " ".join(args for op, args in ops if op == "RUN")
    assert f"torch=={pins['torch']}" in run and '".[gpu]"' in run and "gpu" in project["project"]["optional-dependencies"]
    # `python -m memr2` runs the installed package: memr2 is one of its packages and runnable.
    assert "memr2*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert (ROOT / "memr2/__main__.py").is_file()
    # The RayJob's entrypoint and image: the config it names is in the image's source tree.
    workdir = next(args for op, args in reversed(ops) if op == "WORKDIR")
    job = yaml.safe_load((ROOT / "deploy/kuberay/rayjob.yaml").read_text())
    config = shlex.split(job["spec"]["entrypoint"])
    config = Path(config[config.index("--config") + 1])
    assert config.is_relative_to(workdir) and (ROOT / config.relative_to(workdir)).is_file()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(config.relative_to(workdir).parts[0] == i for i in ignored)
    spec = job["spec"]["rayClusterSpec"]
    images = {c["image"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]] for c in g["template"]["spec"]["containers"]}
    assert images == {f"memr2:{project['project']['version']}-gpu"}
