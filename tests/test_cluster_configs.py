"""Every file under cluster/ parses and carries the fields that make it run.

Pure and fast: YAML, the CLI's own flag parsers and Ray's own cluster-config validation; no Ray
runtime, no TensorFlow, no network. What is checked here is what breaks a cluster run silently or
late: an entrypoint naming a script or flag that does not exist, an image that is not the pinned
Ray, a pip pin that drifted from pyproject.toml, a GPU worker that asks for no GPU, auth off.
"""

from __future__ import annotations

import copy
import pathlib
import re
import shlex
import tomllib

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


def _expected_pip() -> list[str]:
    """The runtime deps every job env needs: pyproject's, minus ray, with TF's CUDA extra."""
    deps = [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("ray[")]
    (gpu_tf,) = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    return [gpu_tf if d.startswith("tensorflow==") else d for d in deps]


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
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python", f"entrypoint must run a jobs/ script with python: {argv}"
    return argv[1], argv[2:]


# ---------------------------------------------------------------- runtime env


def test_runtime_env_pins_match_pyproject_and_leave_working_dir_to_the_cli():
    env = _load(CLUSTER / "runtime_env.yaml")
    # `ray job submit --working-dir .` overrides any working_dir here; keeping one would only
    # mislead a reader into thinking it is used.
    assert "working_dir" not in env
    assert env["pip"]["packages"] == _expected_pip()
    assert not any(p.split("[")[0].startswith("ray") for p in env["pip"]["packages"])
    # TF must see these before import; Keras 3 custom training step needs tf-keras kept off.
    assert env["env_vars"]["TF_USE_LEGACY_KERAS"] == "0"
    assert env["env_vars"]["KERAS_BACKEND"] == "tensorflow"
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env_vars values must be strings"
    for pattern in (".git/", ".venv/", "*.parquet", "*.keras"):
        assert pattern in env["excludes"]


# ---------------------------------------------------------------- AWS cluster launcher


def test_aws_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(CLUSTER / "aws-gpu.yaml")
    # prepare_config merges the AWS defaults exactly as `ray up` does; validate_config then checks
    # the JSON schema and the node-type invariants.
    validate_config(prepare_config(copy.deepcopy(raw)))

    assert raw["provider"]["type"] == "aws"
    assert raw["docker"]["image"] == RAY_GPU_IMAGE
    assert "ray-ml" not in yaml.safe_dump(raw)
    head = raw["available_node_types"][raw["head_node_type"]]
    workers = {k: v for k, v in raw["available_node_types"].items() if k != raw["head_node_type"]}
    assert not CURRENT_GPU_INSTANCE.match(head["node_config"]["InstanceType"]), "head should be a CPU node"
    assert head["resources"].get("GPU", 0) == 0
    for name, node in workers.items():
        assert CURRENT_GPU_INSTANCE.match(node["node_config"]["InstanceType"]), name
        assert node["min_workers"] == 0 < node["max_workers"], f"{name} must autoscale from zero"


def test_aws_launcher_installs_pinned_tensorflow_and_turns_token_auth_on():
    raw = _load(CLUSTER / "aws-gpu.yaml")
    setup = " ".join(raw["setup_commands"])
    for dep in _expected_pip():
        assert f'"{dep}"' in setup, f"setup_commands lacks {dep} as pinned in pyproject.toml"
    assert "--env RAY_AUTH_MODE=token" in raw["docker"]["run_options"]
    # The token is copied from the operator's ~/.ray, never from a path inside the checkout.
    ((dest, src),) = raw["file_mounts"].items()
    assert dest.endswith("/.ray/auth_token") and src.startswith("~/.ray/")
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start


# ---------------------------------------------------------------- KubeRay


def test_every_kuberay_image_and_ray_version_is_the_pinned_ray():
    for name, spec in _cluster_specs().items():
        assert spec["rayVersion"] == RAY_VERSION, name
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
        assert images and set(images) == {RAY_GPU_IMAGE}, f"{name}: {images}"


def test_every_kuberay_cluster_has_token_auth_and_gpu_workers():
    for name, spec in _cluster_specs().items():
        assert spec["authOptions"]["mode"] == "token", name
        for group in spec["workerGroupSpecs"]:
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}/{group['groupName']}"
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), name
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name


def test_rayjob_entrypoints_name_real_scripts_and_flags_the_cli_accepts():
    parsers = {"jobs/train.py": cli.train_config, "jobs/score.py": cli.score_config}
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
        assert spec["shutdownAfterJobFinishes"] is True, name
        assert spec["activeDeadlineSeconds"] > 0, name
        script, flags = _entrypoint(spec)
        gpus = sum(
            g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        )
        if script == "jobs/train.py":
            cfg = cli.train_config(flags)
            assert cfg.use_gpu, f"{name}: training on a GPU cluster without --use-gpu"
            assert gpus >= cfg.num_workers, f"{name}: {cfg.num_workers} GPU workers, {gpus} GPUs"
        else:
            cfg = cli.score_config(flags)
            assert cfg.gpus_per_actor > 0, f"{name}: scoring on GPU nodes with --gpus-per-actor 0"
            assert gpus >= cfg.actors * cfg.gpus_per_actor, f"{name}: {cfg.actors} actors, {gpus} GPUs"
            assert cfg.skip_scored, f"{name}: nightly scoring must be resumable (--skip-scored)"


def test_rayjob_runtime_envs_match_runtime_env_yaml_and_ship_released_code():
    base = _load(CLUSTER / "runtime_env.yaml")
    for name, spec in _job_specs().items():
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert env["pip"] == base["pip"], name
        assert env["env_vars"] == base["env_vars"], name
        # The submitter pod has no checkout: code must come from a released archive.
        assert re.match(r"^(s3|gs|https)://.+\.zip$", env["working_dir"]), f"{name}: {env['working_dir']}"


def test_nightly_schedule_runs_exactly_the_score_rayjob():
    cron = _one("RayCronJob", "raycronjob-score-nightly.yaml")["spec"]
    assert cron["jobTemplate"] == _one("RayJob", "rayjob-score.yaml")["spec"]
    fields = cron["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), cron["schedule"]
    assert fields[2:] == ["*", "*", "*"], "nightly means every day"
    assert cron["timeZone"] == "UTC" and cron["suspend"] is False


# ---------------------------------------------------------------- credentials


def test_no_credentials_in_any_cluster_file():
    text = "\n".join(p.read_text() for p in sorted(CLUSTER.rglob("*.yaml")))
    for needle in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "aws_secret"):
        assert needle.lower() not in text.lower(), f"{needle} in cluster/: use roles and Secrets"
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is in cluster/"
    # A Ray token may be referenced by path (~/.ray/auth_token) or Secret, never written inline.
    assert not re.search(r"(?i)(RAY_AUTH_TOKEN|auth_token)\s*[:=]\s*[\"']?[A-Za-z0-9+=_-]{16,}", text)
