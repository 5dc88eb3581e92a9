"""deploy/ validated offline: KubeRay manifests against the CRD schemas (unknown fields refused, as
KubeRay's own kubeconform hook does), built-in kinds for their required fields, the embedded Serve
config and runtime env, and the versions and entry points the manifests and Dockerfiles name."""

from __future__ import annotations

import copy
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
BUILTIN_REQUIRED = {
    "Deployment": ["spec.selector", "spec.template.spec.containers"],
    "Service": ["spec.ports"],
    "ConfigMap": [],
    "Secret": [],
    "PersistentVolumeClaim": ["spec.accessModes", "spec.resources.requests.storage"],
}


def _strict(node):
    """additionalProperties: false on every object node with properties (the API server prunes unknown fields)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and node.get("type") == "object" and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def validators():
    jsonschema = pytest.importorskip("jsonschema")
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR} (expected in ../shared/kuberay-crds beside the project)")
    found = {}
    for kind, name in CRD_FILES.items():
        crd = yaml.safe_load((CRD_DIR / name).read_text())
        schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
        found[kind] = jsonschema.Draft7Validator(_strict(schema))
    return found


def _documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _errors(validators, document) -> list[str]:
    kind = document.get("kind")
    if kind in validators:
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[kind].iter_errors(document)]
    if kind in BUILTIN_REQUIRED:
        missing = []
        for dotted in ["apiVersion", "metadata.name", *BUILTIN_REQUIRED[kind]]:
            node = document
            for part in dotted.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node in (None, [], {}):
                missing.append(f"{dotted}: required")
        return missing
    return [f"kind {kind!r}: no schema known to this test"]


def test_every_manifest_validates(validators):
    documents = _documents()
    assert {d["kind"] for _, d in documents} >= {"RayJob", "RayService", "RayCluster", "Deployment", "Service", "PersistentVolumeClaim", "ConfigMap"}
    for path, document in documents:
        assert _errors(validators, document) == [], f"{path.name} {document['kind']}"


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True), "shutdownAfterJobFinish"),      # misspelled
    (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].__setitem__("replicas", "eight"), "'eight' is not of type"),
    (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("imagePullPolicyy", "Always"), "imagePullPolicyy"),
])
def test_a_misspelled_field_or_a_wrong_type_is_caught(validators, mutate, words):
    job = copy.deepcopy(next(d for _, d in _documents() if d["kind"] == "RayJob"))
    mutate(job)
    assert any(words in error for error in _errors(validators, job))


def test_the_rayservice_serves_serve_config_yaml_with_gpus_and_nothing_else_changed():
    from ray.serve.schema import ServeDeploySchema

    service = next(d for _, d in _documents() if d["kind"] == "RayService")
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(embedded)
    local = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    local["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = 1
    assert embedded == local


def test_the_committed_rayservice_is_what_render_rayservice_writes():
    import runpy

    render = runpy.run_path(str(DEPLOY / "render_rayservice.py"))["render"]
    assert (DEPLOY / "k8s" / "rayservice-stain.yaml").read_text() == render(), "run: python deploy/render_rayservice.py"


def test_the_rayjob_runs_the_command_the_job_submit_test_runs_and_its_runtime_env_parses():
    job = next(d for _, d in _documents() if d["kind"] == "RayJob")
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and "working_dir" in runtime_env
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:3] == ["python", "-m", "lmadda_tune.sweep"]  # tests/test_ray_job_submit.py submits the same
    importlib.import_module(command[2])
    config = command[command.index("--config") + 1]
    assert (REPO / config).is_file()
    module, _, attribute = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())["applications"][0]["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))


def test_ray_versions_agree_across_pyproject_dockerfiles_and_manifests():
    pinned = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    for dockerfile in sorted(DEPLOY.glob("Dockerfile*")):
        assert re.search(r"^FROM rayproject/ray:([0-9.]+)-", dockerfile.read_text(), re.M).group(1) == pinned, dockerfile.name
    versions = [d["spec"].get("rayVersion") or (d["spec"].get("rayClusterSpec") or d["spec"].get("rayClusterConfig"))["rayVersion"]
                for _, d in _documents() if d["kind"] in CRD_FILES]
    assert versions and set(versions) == {pinned}
    import ray

    assert ray.__version__ == pinned


def test_the_images_install_the_cluster_extra_and_it_keeps_boto3_beside_s3fs():
    """The cluster's images talk to an MLflow server on PostgreSQL with S3 artifacts (deploy/k8s/mlflow.yaml). boto3 is
    declared together with s3fs, whose aiobotocore pins botocore, so that pip picks the boto3 that matches it."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!\[ ]", requirement)[0] for requirement in extras["cluster"]}
    assert {"boto3", "psycopg2-binary", "s3fs"} <= names
    for dockerfile in sorted(DEPLOY.glob("Dockerfile*")):
        assert "pip install --no-cache-dir '.[cluster]'" in dockerfile.read_text(), dockerfile.name
