"""Every file under cluster/, and the cluster image they run, parses and carries what makes it run.

Pure and fast: YAML, the Dockerfile's text, `make -n`, the CLI's own flag parsers, Ray's own
cluster-config schema and validation, KubeRay v1.7.0's rules as its source states them, and the
IAM policies in cluster/aws-iam/ against the EC2 calls of Ray's AWS node provider; no Ray runtime,
no TensorFlow, no Docker, no Kubernetes API server, no network. What is checked
here is what breaks a cluster run silently or late: an entrypoint naming a script or flag that does
not exist, an image built on another Ray or with pins that drifted from pyproject.toml, a config
naming another image than `make image` builds, a GPU worker that asks for no GPU or may land on a
CPU node, auth off.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import pathlib
import re
import shlex
import subprocess
import tomllib

import jsonschema
import pytest
import yaml

from malaria_ray import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# AWS GPU families current at the time of writing (NVIDIA L4, L40S, A10G, H100/H200, B200).
CURRENT_GPU_INSTANCE = re.compile(r"^(g6|g6e|g5|p5|p5e|p5en|p6-b200)\.\w+$")
CRON_FIELD = re.compile(r"^[\d*/,\-]+$")


def _load(path: pathlib.Path):
    return yaml.safe_load(path.read_text())


def _ray_version() -> str:
    (ray_dep,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray[")]
    return ray_dep.split("==")[1]


RAY_VERSION = _ray_version()
RAY_GPU_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# The node label the GPU worker groups select (set by NVIDIA GPU Feature Discovery).
GPU_NODE_LABEL = {"nvidia.com/gpu.present": "true"}


def _expected_pip() -> list[str]:
    """The runtime deps every job env needs: pyproject's, minus ray, with TF's CUDA extra and
    MLflow's client (the RayJobs name a registered model: models:/NAME@ALIAS)."""
    deps = [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("ray[")]
    (gpu_tf,) = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    return [gpu_tf if d.startswith("tensorflow==") else d for d in deps] + PYPROJECT["project"]["optional-dependencies"]["mlflow"]


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined."""
    instructions, pending = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, args = pending.strip().partition(" ")
        instructions.append((word.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _docker_args(kind: str) -> list[list[str]]:
    return [shlex.split(args) for instr, args in _dockerfile() if instr == kind]


def _image_copies() -> dict[str, str]:
    """Build-context path -> path in the image, for every COPY of the Dockerfile."""
    copies = {}
    for argv in _docker_args("COPY"):
        *sources, dest = [a for a in argv if not a.startswith("--")]
        for src in sources:
            copies[src.rstrip("/")] = dest + pathlib.PurePosixPath(src).name if dest.endswith("/") else dest
    return copies


def _pip_installs() -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile runs, options included."""
    installs = []
    for argv in _docker_args("RUN"):
        command: list[str] = []
        for token in [*argv, "&&"]:
            if token in ("&&", "||", ";"):
                if command[:2] == ["pip", "install"] or command[:4] == ["python", "-m", "pip", "install"]:
                    installs.append(command[command.index("install") + 1:])
                command = []
            else:
                command.append(token)
    return installs


def _project_dir_in_image() -> str:
    """Where the image holds the project: the folder that the pyproject.toml, package and jobs/ went to."""
    copies = _image_copies()
    (project_dir,) = {str(pathlib.PurePosixPath(copies[p]).parent) for p in ("pyproject.toml", "malaria_ray", "jobs")}
    return project_dir


def _docker_ignored(relpath: str) -> bool:
    """Whether .dockerignore keeps ``relpath`` out of the build context (Docker's rules: a pattern
    matches the path or one of its parent folders; `**` spans folders; no `!` exceptions used)."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert not any(p.startswith("!") for p in patterns), "update _docker_ignored for ! exceptions"
    parts = relpath.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        rx = re.escape(pattern.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, prefix) for prefix in prefixes):
            return True
    return False


def _make(*args: str) -> subprocess.CompletedProcess:
    # The Makefile's defaults, not whatever IMAGE or DOCKER the caller's shell exports.
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGE", "DOCKER", "VERSION", "MAKEFLAGS")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def _make_image() -> str:
    """The image name `make image` builds, read from what make would run."""
    out = _make("-n", "image")
    assert out.returncode == 0, out.stderr
    (build,) = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("docker build")]
    assert build[-1] == ".", build
    return build[build.index("-t") + 1]


def _kuberay_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(KUBERAY.glob("*.yaml"))}


def _one(kind: str, name: str) -> dict:
    (doc,) = _kuberay_docs()[name]
    assert doc["kind"] == kind and doc["apiVersion"] == "ray.io/v1"
    return doc


def _job_specs() -> dict[str, dict]:
    """Every RayJob spec in cluster/kuberay, including RayCronJob templates."""
    specs = {}
    for name, docs in _kuberay_docs().items():
        for doc in docs:
            if doc["kind"] == "RayJob":
                specs[name] = doc["spec"]
            elif doc["kind"] == "RayCronJob":
                specs[name] = doc["spec"]["jobTemplate"]
    return specs


def _cluster_specs() -> dict[str, dict]:
    specs = {name: spec["rayClusterSpec"] for name, spec in _job_specs().items()}
    specs["raycluster.yaml"] = _one("RayCluster", "raycluster.yaml")["spec"]
    return specs


def _entrypoint(spec: dict) -> tuple[str, list[str]]:
    """(the jobs/ script, relative to the repo, and its flags) of a RayJob that runs the image's copy."""
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python", f"entrypoint must run a jobs/ script with python: {argv}"
    project_dir = _project_dir_in_image() + "/"
    assert argv[1].startswith(project_dir), f"entrypoint must name the image's copy under {project_dir}: {argv[1]}"
    return argv[1].removeprefix(project_dir), argv[2:]


def _image_refs() -> dict[str, str]:
    """Where each config names an image -> the image it names."""
    launcher = _load(CLUSTER / "aws-gpu.yaml")
    refs = {f"aws-gpu.yaml docker.{k}": launcher["docker"][k] for k in ("image", "head_image", "worker_image")
            if k in launcher["docker"]}
    for nt, node in launcher["available_node_types"].items():
        for k in ("image", "head_image", "worker_image"):
            if k in node.get("docker", {}):
                refs[f"aws-gpu.yaml {nt}.docker.{k}"] = node["docker"][k]
    for name, spec in _cluster_specs().items():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in group["template"]["spec"]["containers"]:
                refs[f"{name} {group.get('groupName', 'head')}/{c['name']}"] = c["image"]
    return refs


# ---------------------------------------------------------------- runtime env


def test_runtime_env_installs_nothing_and_leaves_working_dir_to_the_cli():
    env = _load(CLUSTER / "runtime_env.yaml")
    # `ray job submit --working-dir .` overrides any working_dir here; keeping one would only
    # mislead a reader into thinking it is used.
    assert "working_dir" not in env
    # The cluster image holds the stack: a package list here would rebuild it on every fresh node.
    assert not {"pip", "uv", "conda"} & set(env), f"runtime_env.yaml installs packages: {sorted(env)}"
    # TF must see these before import; Keras 3 custom training step needs tf-keras kept off.
    assert env["env_vars"]["TF_USE_LEGACY_KERAS"] == "0"
    assert env["env_vars"]["KERAS_BACKEND"] == "tensorflow"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
    for pattern in (".git/", ".venv/", "*.parquet", "*.keras"):
        assert pattern in env["excludes"]


def test_runtime_env_for_stock_ray_images_is_runtime_env_plus_pyprojects_pins():
    base = _load(CLUSTER / "runtime_env.yaml")
    env = _load(CLUSTER / "runtime_env_pip.yaml")
    assert "working_dir" not in env
    assert env["pip"]["packages"] == _expected_pip()
    assert not any(p.split("[")[0].startswith("ray") for p in env["pip"]["packages"])
    assert set(env) == set(base) | {"pip"}, sorted(env)
    assert env["excludes"] == base["excludes"] and env["env_vars"] == base["env_vars"]


# ---------------------------------------------------------------- the cluster image


def test_dockerfile_builds_on_the_pinned_ray():
    (base,) = _docker_args("FROM")
    assert len(base) == 1, f"one plain FROM, no stage name or platform: {base}"
    # A digest may follow the tag (docs/operations.md); the tag must still say which Ray it is.
    assert DIGEST.sub("", base[0]) == RAY_GPU_IMAGE, f"FROM {base[0]}, pyproject pins Ray {RAY_VERSION}"


def test_dockerfile_installs_exactly_pyprojects_pins_and_the_project():
    installs = _pip_installs()
    assert installs, "the Dockerfile installs nothing"
    for args in installs:
        assert "--no-cache-dir" in args, f"pip's cache would stay in a layer: {args}"
        assert not {"-e", "--editable", "-U", "--upgrade", "--force-reinstall"} & set(args), args
    project_dir = _project_dir_in_image()
    specs = [a for args in installs for a in args if not a.startswith("-") and a != project_dir]
    # Pins exactly as pyproject.toml has them, TF with its CUDA extra, Ray left to the base image
    # (pip must not replace the Ray the image was built for); nothing else sneaks in.
    assert specs == _expected_pip(), f"Dockerfile installs {specs}, pyproject pins {_expected_pip()}"
    # The project itself, without the dev extras, from the folder that holds pyproject.toml.
    (project,) = [args for args in installs if project_dir in args]
    assert project_dir + "[" not in " ".join(project), f"install the project without extras: {project}"
    assert not any(a.startswith("-r") or a.startswith("--requirement") for args in installs for a in args)


def test_dockerfile_bakes_the_imagenet_weights_the_model_loads():
    """`--weights imagenet` on a cluster without egress: the file is in the image's Keras cache,
    under the name and from the URL `malaria_ray.model` uses, before the project layer."""
    from malaria_ray.model import IMAGENET_FILE, IMAGENET_URL

    runs = [" ".join(argv) for argv in _docker_args("RUN")]
    (bake,) = [r for r in runs if "get_file" in r]
    assert f"'{IMAGENET_FILE}'" in bake and f"'{IMAGENET_URL}'" in bake and "cache_subdir='models'" in bake, bake
    assert runs.index(bake) < next(i for i, r in enumerate(runs) if _project_dir_in_image() in r)


def test_dockerfile_sets_runtime_envs_variables_and_runs_as_non_root():
    env = {}
    for argv in _docker_args("ENV"):
        for pair in argv:
            key, sep, value = pair.partition("=")
            assert sep, f"ENV {pair}: use KEY=VALUE"
            env[key] = value
    assert env == _load(CLUSTER / "runtime_env.yaml")["env_vars"]
    users = _docker_args("USER")
    assert users and users[-1][0].split(":")[0] not in ("root", "0"), f"the image must end as a non-root user: {users}"
    text = (REPO / "Dockerfile").read_text()
    for needle in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "auth_token"):
        assert needle.lower() not in text.lower(), f"{needle} in the Dockerfile: images are not a place for secrets"
    assert not _docker_args("ARG"), "build args land in the image history; the build needs none"


def test_dockerignore_keeps_local_state_out_and_lets_the_project_in():
    copies = _image_copies()
    assert set(copies) == {"pyproject.toml", "README.md", "malaria_ray", "jobs"}, f"the image copies {sorted(copies)}"
    needed = ["pyproject.toml", "README.md"] + [str(p.relative_to(REPO)) for d in ("malaria_ray", "jobs")
                                                for p in (REPO / d).glob("*.py")]
    assert len(needed) > 4 and not [p for p in needed if _docker_ignored(p)], "the build context lacks a file the image copies"
    for path in (".git/HEAD", ".venv/bin/python", ".pytest_cache/v/x", "demo-out/train-run/model.keras", "runs/a/x",
                 "tests/test_x.py", "bench/x.py", "data/part-0.parquet", "model.keras", "w/model.h5",
                 "malaria_ray/__pycache__/cli.cpython-311.pyc", "malaria_ray.egg-info/PKG-INFO", ".env"):
        assert _docker_ignored(path), f".dockerignore lets {path} into the build context"


def test_make_image_builds_the_versioned_image_and_explains_a_missing_docker():
    assert _make_image() == f"malaria-ray:{PYPROJECT['project']['version']}"
    phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.M)
    assert phony and "image" in phony.group(1).split()
    out = _make("image", "DOCKER=/nonexistent/docker")
    assert out.returncode != 0
    assert "/nonexistent/docker' not found" in out.stderr and "install Docker" in out.stderr, out.stderr


def test_every_cluster_config_runs_the_one_image_make_builds():
    refs = _image_refs()
    assert len(refs) >= 1 + 2 * len(_cluster_specs()), f"an image reference is missing: {sorted(refs)}"
    # One reference everywhere (a digest pin, where used, is pinned everywhere alike).
    assert len(set(refs.values())) == 1, f"configs name different images: {refs}"
    (ref,) = set(refs.values())
    registry, _, name = DIGEST.sub("", ref).rpartition("/")
    assert registry, f"{ref}: a cluster pulls the image from a registry, not a local name"
    assert name == _make_image(), f"{ref}: `make image` builds {_make_image()}"
    assert "rayproject/" not in ref


# ---------------------------------------------------------------- AWS cluster launcher


def test_aws_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(CLUSTER / "aws-gpu.yaml")
    # prepare_config merges the AWS defaults exactly as `ray up` does; validate_config then checks
    # the JSON schema and the node-type invariants.
    validate_config(prepare_config(copy.deepcopy(raw)))

    assert raw["provider"]["type"] == "aws"
    assert "ray-ml" not in yaml.safe_dump(raw)
    head = raw["available_node_types"][raw["head_node_type"]]
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert not CURRENT_GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "head should be a CPU node"
    assert head["resources"].get("GPU", 0) == 0
    for name, node in workers.items():
        assert CURRENT_GPU_INSTANCE.match(node["node_config"]["InstanceType"]), name
        assert node["min_workers"] == 0 < node["max_workers"], f"{name} must autoscale from zero"


def test_aws_launcher_installs_nothing_on_the_nodes_and_turns_token_auth_on():
    raw = _load(CLUSTER / "aws-gpu.yaml")
    # The image holds the stack; a pip install per node would be minutes per node and could drift.
    commands = [c for k, v in raw.items() if k.endswith("_commands") for c in v]
    commands += [c for node in raw["available_node_types"].values() for k, v in node.items() if k.endswith("_commands")
                 for c in v]
    assert not [c for c in commands if re.search(r"\b(pip|uv|conda)\b", c)], commands
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    # The token is copied from the operator's ~/.ray, never from a path inside the checkout.
    ((dest, src),) = raw["file_mounts"].items()
    assert dest.endswith("/.ray/auth_token") and src.startswith("~/.ray/")
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


# ---------------------------------------------------------------- KubeRay


def test_every_kuberay_ray_version_is_the_pinned_ray():
    # The image's Ray is the pinned Ray (test_dockerfile_builds_on_the_pinned_ray); the operator
    # must be told the same version.
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == RAY_VERSION, name


def test_every_kuberay_cluster_has_token_auth_and_gpu_workers_on_gpu_nodes():
    for name, spec in _cluster_specs().items():
        assert spec["authOptions"]["mode"] == "token", name
        head = spec["headGroupSpec"]["template"]["spec"]
        assert not [c for c in head["containers"] if "nvidia.com/gpu" in str(c.get("resources"))], f"{name}: GPU head"
        for group in spec["workerGroupSpecs"]:
            where = f"{name}/{group['groupName']}"
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            resources = container["resources"]
            assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, where
            # Extended resources are not overcommitted: Kubernetes rejects requests != limits.
            assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == \
                resources["limits"]["nvidia.com/gpu"], where
            assert pod.get("nodeSelector", {}).items() >= GPU_NODE_LABEL.items(), f"{where}: no GPU nodeSelector"
            assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]), where
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where


def test_rayjob_entrypoints_name_real_scripts_and_flags_the_cli_accepts():
    parsers = {"jobs/train.py": cli.parse_train, "jobs/score.py": cli.score_config}
    seen = set()
    for name, spec in _job_specs().items():
        script, flags = _entrypoint(spec)
        assert script in parsers, f"{name}: unknown entrypoint {script}"
        assert (REPO / script).is_file(), f"{name}: {script} does not exist"
        try:
            parsers[script](flags)  # the same parser jobs/*.py uses; bad flags exit 2
        except SystemExit as exc:
            pytest.fail(f"{name}: `{script}` rejects its flags {flags} (exit {exc.code})")
        seen.add(script)
    assert seen == set(parsers), "need a RayJob for training and one for scoring"


def test_rayjobs_free_their_gpus_and_fit_the_work_they_submit():
    for name, spec in _job_specs().items():
        assert _cluster_deleted_after_s(spec) == 0, f"{name}: GPU pods outlive the job"
        assert spec["activeDeadlineSeconds"] > 0, name
        script, flags = _entrypoint(spec)
        gpus = sum(
            g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        )
        if script == "jobs/train.py":
            cfg = cli.parse_train(flags)[0]
            assert cfg.use_gpu, f"{name}: training on a GPU cluster without --use-gpu"
            assert gpus >= cfg.num_workers, f"{name}: {cfg.num_workers} GPU workers, {gpus} GPUs"
        else:
            cfg = cli.score_config(flags)
            assert cfg.gpus_per_actor > 0, f"{name}: scoring on GPU nodes with --gpus-per-actor 0"
            assert gpus >= cfg.actors * cfg.gpus_per_actor, f"{name}: {cfg.actors} actors, {gpus} GPUs"
            assert cfg.skip_scored, f"{name}: nightly scoring must be resumable (--skip-scored)"


def test_rayjob_runtime_envs_install_nothing_and_run_the_images_code():
    base = _load(CLUSTER / "runtime_env.yaml")
    for name, spec in _job_specs().items():
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert env["env_vars"] == base["env_vars"], name
        # The image holds the stack and the released code: no per-pod install, and no working_dir
        # whose code would silently shadow the image's (entrypoints name the image's jobs/).
        assert set(env) == {"env_vars"}, f"{name}: runtime env has {sorted(env)}"


def test_nightly_schedule_runs_exactly_the_score_rayjob():
    cron = _one("RayCronJob", "raycronjob-score-nightly.yaml")["spec"]
    assert cron["jobTemplate"] == _one("RayJob", "rayjob-score.yaml")["spec"]
    fields = cron["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), cron["schedule"]
    assert fields[2:] == ["*", "*", "*"], "nightly means every day"
    assert cron["timeZone"] == "UTC" and cron["suspend"] is False


# ---------------------------------------------------------------- credentials


def test_no_credentials_in_any_cluster_file():
    files = [*sorted(CLUSTER.rglob("*.yaml")), REPO / "Dockerfile", REPO / ".dockerignore"]
    text = "\n".join(p.read_text() for p in files)
    for needle in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "aws_secret"):
        assert needle.lower() not in text.lower(), f"{needle} in cluster/: use roles and Secrets"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is in cluster/"
    # A Ray token may be referenced by path (~/.ray/auth_token) or Secret, never written inline.
    assert not re.search(r"(?i)(RAY_AUTH_TOKEN|auth_token)\s*[:=]\s*[\"']?[A-Za-z0-9+=_-]{16,}", text)


# ---------------------------------------------------------------- KubeRay v1.7 semantics
#
# Checked here as KubeRay v1.7.0's source states them (read, not copied into the project): names,
# deletion rules (as its controller validates them), /dev/shm, the ServiceAccount. Not checked here:
# the CRDs' OpenAPI schemas and CEL rules, and the operator's admission (a server-side dry run on a
# real cluster does that: docs/operations.md).

# KubeRay v1.7.0 ray-operator/controllers/ray/utils/constant.go: a RayJob's name leaves room for
# the RayCluster's suffix; a RayCronJob's leaves room for "-<minutes since epoch>" on each RayJob.
MAX_RAYJOB_NAME, MAX_RAYCRONJOB_NAME = 53 - 6, 53 - 6 - 11
# The API server appends 5 random characters to metadata.generateName.
GENERATED_SUFFIX = 5
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
TERMINAL = [("jobStatus", "SUCCEEDED"), ("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")]
QUANTITY = re.compile(r"^(\d+)(Ki|Mi|Gi|Ti)?$")


def _bytes(quantity: str) -> int:
    m = QUANTITY.match(quantity)
    assert m, f"unexpected quantity {quantity}"
    return int(m.group(1)) * 1024 ** ["", "Ki", "Mi", "Gi", "Ti"].index(m.group(2) or "")


def _rules(spec: dict) -> dict[tuple[str, str, str], int]:
    """(condition field, value, policy) -> ttlSeconds of a RayJob spec's deletionRules."""
    rules = {}
    for rule in spec.get("deletionStrategy", {}).get("deletionRules", []):
        cond = {k: v for k, v in rule["condition"].items() if k != "ttlSeconds"}
        (field, value), = cond.items()  # KubeRay: exactly one of jobStatus / jobDeploymentStatus
        key = (field, value, rule["policy"])
        assert key not in rules, f"duplicate deletion rule {key}"
        rules[key] = rule["condition"].get("ttlSeconds", 0)
    return rules


def _cluster_deleted_after_s(spec: dict) -> int:
    """Seconds after any terminal end (success, failure, deadline) until KubeRay v1.7 deletes the
    job's RayCluster, by the one cleanup mechanism the spec uses; fails on a spec KubeRay rejects."""
    rules = _rules(spec)
    if rules:
        # rayjob_controller.go: rules mode excludes shutdownAfterJobFinishes and the global TTL.
        assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished"), \
            "KubeRay rejects shutdownAfterJobFinishes/ttlSecondsAfterFinished beside deletionRules"
        missing = [t for t in TERMINAL if (*t, "DeleteCluster") not in rules and (*t, "DeleteSelf") not in rules]
        assert not missing, f"no deletion rule for {missing}: that ending keeps its GPU pods"
        return max(min(rules.get((*t, p), 2**31) for p in ("DeleteCluster", "DeleteSelf")) for t in TERMINAL)
    assert spec.get("shutdownAfterJobFinishes") is True, "nothing deletes the RayCluster"
    return spec.get("ttlSecondsAfterFinished", 0)


def _pod_specs() -> dict[str, dict]:
    return {f"{name} {group.get('groupName', 'head')}": group["template"]["spec"]
            for name, spec in _cluster_specs().items()
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]}


def test_deletion_strategy_holds_only_rules_and_cel_checked_fields_stay_unset():
    # KubeRay rejects deletionRules beside the deprecated onSuccess/onFailure; fields with CEL rules
    # of their own stay unset (the operator validates those, not these tests).
    for name, spec in _job_specs().items():
        assert set(spec.get("deletionStrategy", {"deletionRules": 0})) == {"deletionRules"}, name
        assert "managedBy" not in spec, name
    for name, spec in _cluster_specs().items():
        assert not {"managedBy", "gcsFaultToleranceOptions"} & set(spec), name


def test_kuberay_names_fit_kuberay_and_the_documented_kubectl_verb():
    for name, docs in _kuberay_docs().items():
        for doc in docs:
            meta = doc["metadata"]
            assert ("name" in meta) != ("generateName" in meta), f"{name}: exactly one of name/generateName"
            full = meta.get("name") or meta["generateName"] + "x" * GENERATED_SUFFIX
            assert DNS_1035.match(full), f"{name}: {full} is not a DNS-1035 label"
            limit = {"RayJob": MAX_RAYJOB_NAME, "RayCronJob": MAX_RAYCRONJOB_NAME}.get(doc["kind"], 63)
            assert len(full) <= limit, f"{name}: {full} longer than {limit}"
    # A one-off scoring run is created again and again: a fixed name fails the second time.
    assert _one("RayJob", "rayjob-score.yaml")["metadata"]["generateName"] == "malaria-score-"
    # `kubectl apply` cannot create an object without a name; `kubectl create` of a fixed name
    # works once. Every command in the docs and the manifests' headers must fit its file.
    texts = [(p.name, p.read_text()) for p in [REPO / "docs/operations.md", REPO / "README.md", *KUBERAY.glob("*.yaml")]]
    commands = [(where, verb, pathlib.Path(f).name) for where, text in texts
                for verb, f in re.findall(r"kubectl (apply|create) -f (\S+\.yaml)", text)]
    assert len(commands) >= 5, commands
    for where, verb, file in commands:
        assert (KUBERAY / file).is_file(), f"{where}: kubectl {verb} -f {file}: no such manifest"
        generated = any("generateName" in d["metadata"] for d in _kuberay_docs()[file])
        assert verb == ("create" if generated else "apply"), \
            f"{where}: `kubectl {verb} -f {file}` ({'generateName' if generated else 'fixed name'})"


def test_rayjob_deletion_rules_are_valid_and_bound_the_nightly_history():
    for name, spec in _job_specs().items():
        rules = _rules(spec)
        # KubeRay's validateTTLConsistency: per condition, DeleteCluster before (<=) DeleteSelf.
        for field, value in TERMINAL:
            cluster, self_ = rules.get((field, value, "DeleteCluster")), rules.get((field, value, "DeleteSelf"))
            if cluster is not None and self_ is not None:
                assert cluster <= self_, f"{name}: {value}: DeleteSelf before DeleteCluster"
        if not rules:
            assert spec["ttlSecondsAfterFinished"] <= 60, f"{name}: the finished cluster is kept too long"
    # RayCronJob (v1.7) has no history limit and deletes nothing: each nightly RayJob must delete
    # itself after every kind of end, or they pile up one a night for ever.
    cron = _rules(_one("RayCronJob", "raycronjob-score-nightly.yaml")["spec"]["jobTemplate"])
    for field, value in TERMINAL:
        ttl = cron.get((field, value, "DeleteSelf"))
        assert ttl is not None, f"a nightly RayJob that ends {value} is never deleted"
        # Long enough to read a failed night's log the next working day, short enough to stay few.
        assert 2 * 86400 <= ttl <= 14 * 86400, f"{value}: DeleteSelf after {ttl} s"


def test_dev_shm_is_capped_above_rays_object_store():
    from ray._private.ray_constants import DEFAULT_OBJECT_STORE_MEMORY_PROPORTION

    for where, pod in _pod_specs().items():
        (container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        (shm,) = [v for v in pod["volumes"] if mounts.get(v["name"]) == "/dev/shm"]
        assert shm["emptyDir"]["medium"] == "Memory", where
        limit = _bytes(container["resources"]["limits"]["memory"])
        size = _bytes(shm["emptyDir"]["sizeLimit"])
        store = DEFAULT_OBJECT_STORE_MEMORY_PROPORTION * limit
        # Ray sizes the store from memory, not from /dev/shm (it caps at shm only above 10 GB):
        # a smaller tmpfs would fail allocations the store believes it has.
        assert size >= 1.1 * store, f"{where}: /dev/shm {size} B under Ray's object store {store:.0f} B"
        assert size <= 0.5 * limit, f"{where}: /dev/shm may take {size} B of the pod's {limit} B"


def test_every_pod_runs_as_the_shipped_service_account_with_an_iam_role():
    (sa,) = _kuberay_docs()["serviceaccount.yaml"]
    assert sa["apiVersion"] == "v1" and sa["kind"] == "ServiceAccount"
    names = {where: pod.get("serviceAccountName") for where, pod in _pod_specs().items()}
    assert set(names.values()) == {sa["metadata"]["name"]}, names
    role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]{1,64}", role), role
    # Pull secrets belong on the service account (every pod gets them), not in one pod template.
    assert not [w for w, pod in _pod_specs().items() if "imagePullSecrets" in pod]
    assert "imagePullSecrets" in (KUBERAY / "serviceaccount.yaml").read_text(), "document the pull-secret block"


# ---------------------------------------------------------------- AWS launcher IAM

AWS_IAM = CLUSTER / "aws-iam"


def _policy(name: str) -> list[dict]:
    doc = json.loads((AWS_IAM / name).read_text())
    assert doc["Version"] == "2012-10-17"
    return [{**s, "Action": [s["Action"]] if isinstance(s["Action"], str) else s["Action"],
             "Resource": [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]}
            for s in doc["Statement"]]


def _allowed(statements: list[dict], action: str, resource: str = "*") -> list[dict]:
    """The Allow statements that grant ``action`` on ``resource`` (IAM's * wildcards; conditions kept)."""
    return [s for s in statements if s["Effect"] == "Allow"
            and any(fnmatch.fnmatchcase(action, a) for a in s["Action"])
            and any(fnmatch.fnmatchcase(resource, r) for r in s["Resource"])]


def _node_provider_ec2_actions() -> set[str]:
    """The EC2 API actions Ray's installed AWS node provider (the head's autoscaler) calls."""
    import ray.autoscaler._private.aws.node_provider as node_provider

    source = pathlib.Path(node_provider.__file__).read_text()
    # Client and resource calls, called or passed on as a function (terminate_instances_func = ...).
    calls = set(re.findall(r"\.(create_instances|create_tags|start_instances|stop_instances|terminate_instances|"
                           r"describe_\w+)\b", source))
    calls |= {f"{verb}_instances" for verb in re.findall(r"\bnode\.(terminate|stop|start)\(\)", source)}
    if ".instances.filter(" in source:
        calls.add("describe_instances")
    assert {"create_instances", "terminate_instances", "describe_instances"} <= calls, calls
    camel = {c: "".join(w.capitalize() for w in c.split("_")) for c in calls}
    camel["create_instances"] = "RunInstances"  # boto3's resource call for the RunInstances API
    return {f"ec2:{a}" for a in camel.values()}


def test_aws_launcher_config_matches_rays_cluster_config_schema():
    import ray.autoscaler

    schema = json.loads((pathlib.Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    raw = _load(CLUSTER / "aws-gpu.yaml")
    assert not [e.message for e in validator.iter_errors(raw)]
    bad = {**raw, "idle_timeout_minute": 10}
    assert list(validator.iter_errors(bad)), "ray-schema.json no longer rejects an unknown top-level key"


def test_aws_head_profile_carries_what_the_autoscaler_needs_and_workers_only_s3():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    raw = _load(CLUSTER / "aws-gpu.yaml")
    head = raw["available_node_types"][raw["head_node_type"]]["node_config"]
    workers = [n["node_config"] for k, n in raw["available_node_types"].items() if k != raw["head_node_type"]]
    # An explicit head profile stops Ray from creating ray-autoscaler-v1 (aws/config.py,
    # _configure_iam_role), so this profile alone must let the head launch workers.
    head_profile = head["IamInstanceProfile"]["Name"]
    (worker_profile,) = {w["IamInstanceProfile"]["Name"] for w in workers}
    assert head_profile != worker_profile, "workers must not get the head's EC2 and PassRole rights"

    autoscaler = _policy("head-autoscaler-policy.json")
    s3 = _policy("s3-policy.json")
    for action in sorted(_node_provider_ec2_actions()):
        assert _allowed(autoscaler, action), f"Ray's AWS node provider calls {action}; the head may not"
    # Ending nodes is limited to this cluster's, by the tag Ray puts on every node it launches.
    for action in ("ec2:TerminateInstances", "ec2:StopInstances"):
        (stmt,) = _allowed(autoscaler, action)
        assert stmt["Condition"] == {"StringEquals": {f"aws:ResourceTag/{TAG_RAY_CLUSTER_NAME}": raw["cluster_name"]}}
    # Launching an instance with a profile passes its role (same name as the profile, as the docs
    # create them) to EC2; nothing else may be passed.
    (pass_role,) = _allowed(autoscaler, "iam:PassRole", f"arn:aws:iam::123456789012:role/{worker_profile}")
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    assert not _allowed(autoscaler, "iam:PassRole", f"arn:aws:iam::123456789012:role/{head_profile}")
    # ImageId resolve:ssm:<parameter> makes RunInstances read the parameter as the caller.
    for node in [head, *workers]:
        if node["ImageId"].startswith("resolve:ssm:"):
            param = node["ImageId"].removeprefix("resolve:ssm:")
            arn = f"arn:aws:ssm:{raw['provider']['region']}::parameter{param}"
            assert _allowed(autoscaler, "ssm:GetParameters", arn), f"the head cannot resolve {param}"
    # Neither policy is a blanket grant; the S3 policy grants S3 only.
    for stmt in autoscaler + s3:
        assert not {"*", "ec2:*", "iam:*", "s3:*"} & set(stmt["Action"]), stmt
    assert all(a.startswith("s3:") for stmt in s3 for a in stmt["Action"])


def test_s3_policy_covers_every_bucket_the_jobs_read_and_write():
    s3 = _policy("s3-policy.json")
    reads, writes = set(), set()
    for spec in _job_specs().values():
        _, flags = _entrypoint(spec)
        for flag, uri in zip(flags, flags[1:]):
            if uri.startswith("s3://"):
                (writes if flag == "--output" else reads).add(uri.removeprefix("s3://"))
    assert reads and writes
    for path in reads | writes:
        bucket = path.split("/")[0]
        assert _allowed(s3, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), bucket
        assert _allowed(s3, "s3:GetObject", f"arn:aws:s3:::{path}/x"), path
    for path in writes:
        # Scoring publishes parts and a lease (put, then delete); multipart uploads may be aborted.
        for action in ("s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"):
            assert _allowed(s3, action, f"arn:aws:s3:::{path}/x"), f"{action} on {path}"
    # A bucket no job writes to (the corpus and the slide archive) stays read-only.
    written = {w.split("/")[0] for w in writes}
    for bucket in {r.split("/")[0] for r in reads} - written:
        assert not _allowed(s3, "s3:PutObject", f"arn:aws:s3:::{bucket}/x"), f"{bucket} is input: read only"
