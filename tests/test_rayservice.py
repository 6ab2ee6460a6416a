"""k8s/rayservice.yaml: strictly valid against KubeRay's RayService CRD (vendored in tests/data),
the same pod safety rules as the other manifests (non-root, Guaranteed QoS, pinned image, secrets
by reference), ClusterIP services only, and a Serve config whose application ftdist can build."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from exports import export_tiny
from test_manifests import (OBJECT_META, Loader, check_container, check_non_root, check_resources, crd_dir,
                            dockerfile_args, read_crd, schema_errors, walk)

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "k8s" / "rayservice.yaml"


@pytest.fixture(scope="module")
def schema() -> dict:
    crd = yaml.load(read_crd(crd_dir(), "ray.io_rayservices.yaml"), Loader=Loader)
    s = copy.deepcopy(next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"])
    s["properties"]["metadata"] = OBJECT_META
    s["required"] = sorted({*s.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return s


@pytest.fixture(scope="module")
def service() -> dict:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "RayService" and docs[0]["apiVersion"] == "ray.io/v1"
    return docs[0]


def test_matches_the_rayservice_crd_strictly(service, schema):
    assert schema_errors(service, schema, "RayService") == []
    bad = copy.deepcopy(service)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    bad["spec"]["serveConfig"] = "v1 field"
    assert schema_errors(bad, schema) == [
        ".spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].imagePullPolcy: unknown field",
        ".spec.serveConfig: unknown field"]


def test_pods_are_non_root_guaranteed_pinned_and_services_cluster_ip(service):
    spec = service["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for tpl in templates:
        check_non_root("pod", tpl["spec"]["securityContext"])
        assert tpl["spec"]["serviceAccountName"] == "ftdist"
        for c in tpl["spec"]["containers"]:
            check_container(c["name"], c)
        shm = {v["name"]: v for v in tpl["spec"]["volumes"]}[tpl["spec"]["containers"][0]["volumeMounts"][0]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory"
    check_resources("autoscaler", spec["autoscalerOptions"]["resources"])
    check_non_root("autoscaler", spec["autoscalerOptions"]["securityContext"])
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP" and "serveService" not in service["spec"]
    assert not [d for d in walk(service) if d.get("type") in ("LoadBalancer", "NodePort")]
    assert spec["rayVersion"] == dockerfile_args()["RAY_VERSION"]
    for g in spec["workerGroupSpecs"]:
        assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_serve_config_builds_ftdist_s_application_from_s3(service, tmp_path, tiny_bert):
    from ray.serve._private.utils import import_attr

    from ftdist.errors import UserError

    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app = config["applications"][0]
    assert app["import_path"] == "ftdist.serve:app_builder" and app["route_prefix"] == "/"
    assert app["args"]["model"].startswith("s3://") and app["args"]["max_replicas"] > app["args"]["replicas"]
    assert config["http_options"]["host"] == "0.0.0.0"  # inside the pod; the Service in front is ClusterIP
    builder = import_attr(app["import_path"])
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert app["args"]["cpus_per_replica"] <= float(limits["cpu"])  # a replica fits a worker pod
    local = export_tiny(tiny_bert, tmp_path / "model")
    built = builder({**app["args"], "model": local})  # the same args, the export on local disk
    assert type(built).__name__ == "Application"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a complete ftdist export"):
        builder({**app["args"], "model": str(tmp_path / "empty")})
    with pytest.raises(UserError, match="unknown 'replica'"):
        builder({"model": local, "replica": 2})


def test_every_node_s_proxy_refuses_bodies_past_the_replicas_limit(service):
    """Serve runs a proxy on every node (proxy_location EveryNode): each Ray container carries the
    proxy callback and the body limit that the application's text limits give the replicas."""
    from ftdist.serve import Limits
    from ftdist.serve_proxy import proxy_environment

    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["proxy_location"] == "EveryNode"
    args = config["applications"][0]["args"]
    want = proxy_environment(Limits(max_texts=args["max_texts"], max_text_chars=args["max_text_chars"]).max_body_bytes)
    spec = service["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for tpl in templates:
        for c in tpl["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert {k: env.get(k) for k in want} == want, c["name"]
