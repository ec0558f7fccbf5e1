"""``infra/`` is declarative; these checks keep it consistent with the code and with what KubeRay
v1.7 / Ray 2.60 accept (field names and required fields taken from KubeRay's CRDs and validation,
the autoscaler's own parser of a RayCluster, Ray's cluster-launcher schema). No cluster needed."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cluster import CRF_NODE_RESOURCE, GPU_NODE_RESOURCE

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# From KubeRay v1.7.0's CRDs (ray.io_rayclusters/rayjobs/raycronjobs.yaml, version v1).
RAYCLUSTER_SPEC_KEYS = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "headGroupSpec", "headServiceAnnotations", "historyServerOptions", "managedBy",
                        "networkPolicy", "rayVersion", "suspend", "tlsOptions", "upgradeStrategy",
                        "workerGroupSpecs"}
HEAD_GROUP_KEYS = {"enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources",
                   "serviceType", "template"}
WORKER_GROUP_KEYS = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                     "priority", "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
AUTOSCALER_OPTIONS_KEYS = {"args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy",
                           "resources", "securityContext", "upscalingMode", "version", "volumeMounts"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
                    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
                    "metadata", "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML",
                    "shutdownAfterJobFinishes", "submissionMode", "submitterConfig", "submitterPodTemplate",
                    "suspend", "ttlSecondsAfterFinished"}
RAYCRONJOB_SPEC_KEYS = {"jobTemplate", "schedule", "suspend", "timeZone"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _console_scripts() -> dict[str, str]:
    return PYPROJECT["project"]["scripts"]


def _check_entrypoint(command: str) -> None:
    """``deeplab-batch SUBCOMMAND --flag ...``: a real console script, subcommand and flags."""
    import argparse
    import importlib

    from jobs.cli import COMMANDS

    words = shlex.split(command)
    assert words[0] in _console_scripts(), f"{words[0]!r} is not a console script in pyproject.toml"
    assert words[1] in COMMANDS, f"{words[1]!r} is not in jobs.cli.COMMANDS"
    module = importlib.import_module(COMMANDS[words[1]][0])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    parser.parse_args(words[2:])  # SystemExit on an unknown or malformed flag


def _check_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, set(spec) - RAYCLUSTER_SPEC_KEYS
    assert "headGroupSpec" in spec and spec["workerGroupSpecs"]
    assert set(spec["autoscalerOptions"]) <= AUTOSCALER_OPTIONS_KEYS
    assert spec["authOptions"]["mode"] in ("token", "disabled")
    # token auth needs rayVersion >= 2.52 (KubeRay validation); and it must match the image's Ray
    pinned_ray = re.search(r"^ray\[[^\]]*\]==(\S+)$", (INFRA / "docker" / "constraints.txt").read_text(), re.M)
    assert spec["rayVersion"] == pinned_ray.group(1)

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS and "template" in head
    assert head["rayStartParams"]["num-cpus"] == "0"  # no work on the head
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # CRD: map of strings
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for group in groups.values():
        assert set(group) <= WORKER_GROUP_KEYS, set(group) - WORKER_GROUP_KEYS
        assert WORKER_GROUP_REQUIRED <= set(group)
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        assert not ("resources" in group and "resources" in group["rayStartParams"])  # KubeRay forbids both
        assert all(isinstance(v, str) for v in group.get("resources", {}).values())
        for container in group["template"]["spec"]["containers"]:
            assert "resources" in container and "limits" in container["resources"]
    for pod in [head, *groups.values()]:
        assert pod["template"]["spec"]["containers"], "KubeRay needs at least one container"
        assert pod["template"]["spec"]["serviceAccountName"] == "deeplab-batch"
        for container in pod["template"]["spec"]["containers"]:
            for env in container.get("env", []):  # credentials only by reference, never as values
                assert not re.search(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY", env["name"]) or "valueFrom" in env, env

    gpu = [g for g in groups.values() if GPU_NODE_RESOURCE in g.get("resources", {})]
    crf = [g for g in groups.values() if CRF_NODE_RESOURCE in g.get("resources", {})]
    assert len(gpu) == 1 and len(crf) == 1
    gpu_limits = gpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) == int(gpu[0]["resources"][GPU_NODE_RESOURCE]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu[0]["template"]["spec"]["tolerations"])
    assert "nvidia.com/gpu" not in crf[0]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_raycluster_has_the_fields_kuberay_requires():
    doc = _one(KUBERAY / "raycluster.yaml")
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCluster")
    _check_cluster_spec(doc["spec"])


def test_the_autoscaler_reads_the_groups_as_intended():
    """Ray's own translation of a RayCluster into autoscaler node types (what scales on demand)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    doc = _one(KUBERAY / "raycluster.yaml")
    doc["metadata"]["namespace"] = "default"
    node_types = _derive_autoscaling_config_from_ray_cr(doc)["available_node_types"]
    head = node_types.pop("headgroup")
    assert head["resources"].get("CPU", 0) == 0
    by_resource = {}
    for name, node in node_types.items():
        assert node["max_workers"] > node["min_workers"] >= 0, (name, node)  # autoscaling
        for key in (GPU_NODE_RESOURCE, CRF_NODE_RESOURCE):
            if key in node["resources"]:
                by_resource[key] = node["resources"]
    assert by_resource[GPU_NODE_RESOURCE]["GPU"] >= 1
    assert by_resource[CRF_NODE_RESOURCE]["CPU"] > by_resource[CRF_NODE_RESOURCE][CRF_NODE_RESOURCE] >= 1
    assert by_resource[CRF_NODE_RESOURCE].get("GPU", 0) == 0


def test_rayjob_runs_an_incremental_segment_on_the_same_cluster_spec():
    job = _one(KUBERAY / "rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, set(spec) - RAYJOB_SPEC_KEYS
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    assert job["metadata"]["generateName"] and "name" not in job["metadata"]  # `kubectl create` each run
    assert spec["rayClusterSpec"] == _one(KUBERAY / "raycluster.yaml")["spec"]
    _check_entrypoint(spec["entrypoint"])
    words = shlex.split(spec["entrypoint"])
    assert words[1] == "segment" and "--incremental" in words
    config_path = words[words.index("--config") + 1]
    assert config_path == "/etc/deeplab-batch/segment.yaml"


def test_segment_config_configmap_is_a_valid_segment_config():
    from pipeline.config import from_mapping

    config_map = _one(KUBERAY / "segment-config.yaml")
    config = from_mapping(yaml.safe_load(config_map["data"]["segment.yaml"]), source="segment-config.yaml")
    assert config.crf.resources == {CRF_NODE_RESOURCE: 1.0}
    head = _one(KUBERAY / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]
    mounted = {v["name"]: v["configMap"]["name"] for v in head["volumes"]}
    mount = next(m for m in head["containers"][0]["volumeMounts"] if mounted.get(m["name"]))
    assert mounted[mount["name"]] == config_map["metadata"]["name"]
    assert f"{mount['mountPath']}/segment.yaml" == "/etc/deeplab-batch/segment.yaml"


def test_segment_config_pools_match_the_autoscaling_groups():
    """The cluster starts as the head alone: the job must ask for GPU nodes (device cuda), wait long enough for a
    cold node, and bound its elastic pools by what the groups can reach (Ray does not report the groups)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from pipeline.config import from_mapping

    config = from_mapping(yaml.safe_load(_one(KUBERAY / "segment-config.yaml")["data"]["segment.yaml"]))
    doc = _one(KUBERAY / "raycluster.yaml")
    doc["metadata"]["namespace"] = "default"
    node_types = _derive_autoscaling_config_from_ray_cr(doc)["available_node_types"]
    reach = {key: sum(t["max_workers"] * t["resources"].get(key, 0) for t in node_types.values())
             for key in ("GPU", CRF_NODE_RESOURCE)}
    assert all(t["min_workers"] == 0 for name, t in node_types.items() if name != "headgroup")
    assert config.network.device == "cuda" and config.ray.autoscale_wait_s >= 300
    assert config.network.max_pool_size * config.network.num_gpus == reach["GPU"]
    assert config.crf.max_pool_size * config.crf.resources[CRF_NODE_RESOURCE] == reach[CRF_NODE_RESOURCE]


def test_raycronjob_template_is_the_rayjob():
    cron = _one(KUBERAY / "raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert set(cron["spec"]) <= RAYCRONJOB_SPEC_KEYS and {"jobTemplate", "schedule"} <= set(cron["spec"])
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["jobTemplate"] == _one(KUBERAY / "rayjob.yaml")["spec"]


def test_cronjob_launches_the_rayjob_with_just_enough_rbac():
    docs = {d["kind"]: d for d in _docs(KUBERAY / "cronjob.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "CronJob"}
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1" and len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    mount = container["volumeMounts"][0]
    assert container["command"][3] == f"{mount['mountPath']}/rayjob.yaml"
    assert re.fullmatch(r".+:v\d+\.\d+\.\d+", container["image"])  # pinned
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
    assert "delete" not in rule["verbs"]
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]
    # no overlap: the run's deadline is shorter than a daily period
    assert _one(KUBERAY / "rayjob.yaml")["spec"]["activeDeadlineSeconds"] < 24 * 3600


def test_no_credentials_in_manifests_or_image():
    pattern = re.compile(
        r"(AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{30,}|BEGIN [A-Z ]*PRIVATE KEY)", re.I
    )
    for path in [*INFRA.rglob("*.yaml"), INFRA / "docker" / "Dockerfile"]:
        assert not pattern.search(path.read_text()), path
    assert "kind: Secret\n" not in "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    sa = _one(KUBERAY / "serviceaccount.yaml")
    assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]


# ---------------------------------------------------------------------------- container image


def _dockerfile() -> str:
    return (INFRA / "docker" / "Dockerfile").read_text()


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", _dockerfile(), re.M)
    assert match, f"Dockerfile: no ARG {name}=..."
    return match.group(1)


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


def test_dockerfile_entrypoint_is_the_console_script():
    match = re.search(r"^ENTRYPOINT \[(.*)\]$", _dockerfile(), re.M)
    assert match, "Dockerfile: no exec-form ENTRYPOINT"
    assert [w.strip().strip('"') for w in match.group(1).split(",")] == ["deeplab-batch"]
    assert "deeplab-batch" in _console_scripts()


def test_dockerfile_bases_are_pinned():
    base = _arg("BASE_IMAGE")
    assert re.fullmatch(r"python:3\.11[\w.-]*@sha256:[0-9a-f]{64}", base), base
    cuda = re.search(r"BASE_IMAGE=(nvidia/cuda:\S+)", _dockerfile()).group(1)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu22\.04@sha256:[0-9a-f]{64}", cuda), cuda
    cuda_index = re.search(r"TORCH_INDEX_URL=(https://download\.pytorch\.org/whl/cu(\d+))", _dockerfile())
    major, minor = re.search(r"cuda:(\d+)\.(\d+)", cuda).groups()
    assert cuda_index.group(2) == f"{major}{minor}", "the torch CUDA wheel must match the base's CUDA"
    assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+(@sha256:[0-9a-f]{64})?", _arg("UV_IMAGE"))


def test_pinned_versions_satisfy_pyproject():
    from packaging.requirements import Requirement

    pins = _constraints()
    assert _arg("TORCH_VERSION") == pins["torch"]
    for dependency in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower()
        assert name in pins, f"constraints.txt: no pin for {name} (pyproject.toml depends on it)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], dependency)


def test_opt_in_runtime_env_lists_the_project_dependencies():
    from pipeline.cluster import load_runtime_env_file

    env = load_runtime_env_file(INFRA / "runtime_env" / "with-dependencies.yaml")
    assert sorted(env["pip"]["packages"]) == sorted(PYPROJECT["project"]["dependencies"])


# ---------------------------------------------------------------------------- AWS cluster launcher


def test_aws_launcher_config_is_valid_for_ray():
    from ray.autoscaler._private.util import validate_config

    config = yaml.safe_load((INFRA / "aws" / "ray-cluster.yaml").read_text())
    validate_config(config)  # Ray's own schema
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if GPU_NODE_RESOURCE in t["resources"]]
    crf = [t for t in types.values() if CRF_NODE_RESOURCE in t["resources"]]
    assert len(gpu) == 1 and gpu[0]["resources"]["GPU"] >= 1 and gpu[0]["max_workers"] > gpu[0]["min_workers"]
    assert len(crf) == 1 and crf[0]["resources"].get("GPU", 0) == 0 and crf[0]["max_workers"] > crf[0]["min_workers"]
    for node in (gpu[0], crf[0]):
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert "--entrypoint=" in config["docker"]["run_options"]  # the image's ENTRYPOINT would eat `bash`


@pytest.mark.parametrize("path", sorted(p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*.yaml")))
def test_every_manifest_parses(path):
    assert _docs(INFRA / path)
