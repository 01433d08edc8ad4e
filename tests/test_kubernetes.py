"""deploy/kubernetes, checked without a cluster: every manifest against Kubernetes' published schemas
(kubernetes-validate, strict: an unknown field fails), and the promises between them (the autoscaler scales
the worker Deployment on its model's queue, readiness is the warm-up, the grace period covers the soft
shutdown, a fresh deploy with no worker takes a batch). KEDA's kinds have no published schema in that package:
they are checked field by field here."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from fleet import photo_folder, submit

from core.redis_url import redis_client
from producer.cli import itsd
from producer.local import RedisServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
KUBERNETES = "1.31.0"
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


def documents() -> list[dict]:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((DEPLOY / name).read_text())]


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == kind]


def test_kustomization_lists_every_manifest_in_the_folder():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in DEPLOY.glob("*.yaml") if p.stem != "kustomization"
    )


@pytest.mark.parametrize("doc", [d for d in documents() if d["kind"] not in KEDA_KINDS], ids=lambda d: d["kind"])
def test_each_manifest_is_valid_against_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_keda_kinds_have_no_schema_here_so_they_are_checked_by_hand():
    scaled, auth = by_kind("ScaledObject"), by_kind("TriggerAuthentication")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(scaled[0], KUBERNETES, strict=True)
    for doc in scaled + auth:
        assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["metadata"]["name"]
    (scaled_object,) = scaled
    spec = scaled_object["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "triggers",
    }
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis" and set(trigger["metadata"]) <= {
        "address",
        "listName",
        "listLength",
        "activationListLength",
        "databaseIndex",
    }
    assert all(isinstance(value, str) for value in trigger["metadata"].values())  # KEDA's metadata is strings


def test_the_autoscaler_scales_the_worker_deployment_on_its_models_queue_down_to_zero():
    (scaled_object,) = by_kind("ScaledObject")
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    spec = scaled_object["spec"]
    worker = deployments[spec["scaleTargetRef"]["name"]]
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    model = args[args.index("--model") + 1].split("=", 1)[0]
    (trigger,) = spec["triggers"]
    assert trigger["metadata"]["listName"] == f"itsd.{model}"
    assert spec["minReplicaCount"] == 0 and trigger["metadata"]["activationListLength"] == "0"
    (service,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "redis"]
    assert trigger["metadata"]["address"].startswith(f"{service['metadata']['name']}.")
    (auth,) = by_kind("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["secretTargetRef"][0]["name"] == "itsd-redis"


def test_a_fresh_deploy_with_no_worker_takes_a_batch_and_its_queue_wakes_the_autoscaler(tmp_path):
    """From zero: no worker runs (replicas 0) and none has ever registered the model, yet a submit is queued
    in the list KEDA reads, past its activation length, so KEDA starts the first worker."""
    (scaled_object,) = by_kind("ScaledObject")
    worker = {d["metadata"]["name"]: d for d in by_kind("Deployment")}[scaled_object["spec"]["scaleTargetRef"]["name"]]
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    model = args[args.index("--model") + 1].split("=", 1)[0]
    (trigger,) = scaled_object["spec"]["triggers"]
    assert worker["spec"]["replicas"] == 0 == scaled_object["spec"]["minReplicaCount"]
    inputs = photo_folder(tmp_path / "in", 3, (32, 32))
    with RedisServer() as redis:
        run = submit(redis.url, inputs, tmp_path / "out", "Cartoonize the image", model=model)
        waiting = redis_client(redis.url).llen(trigger["metadata"]["listName"])
    assert run.returncode == 0 and "3 queued" in run.stdout, run.stderr
    assert waiting == 3 > int(trigger["metadata"]["activationListLength"])


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_the_worker_is_ready_only_when_warmed_up_stops_softly_and_keeps_to_its_roots():
    (worker,) = [d for d in by_kind("Deployment") if d["metadata"]["name"].startswith("itsd-worker-")]
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = env_of(container)
    assert env["REMAP_SIGTERM"] == "SIGQUIT"
    args = container["args"]
    assert pod["terminationGracePeriodSeconds"] > float(args[args.index("--soft-shutdown-timeout") + 1])
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["ITSD_METRICS_PORT"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env["ITSD_INPUT_ROOTS"] == env["ITSD_OUTPUT_ROOTS"] == "/data"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and env["ITSD_CACHE_DIR"] in mounts  # TensorRT engines on a volume
    assert env["ITSD_BROKER_URL"] == "redis://:$(REDIS_PASSWORD)@redis:6379/0"  # the password never on argv
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "itsd-redis", "key": "password"}}
    assert not any("$(REDIS_PASSWORD)" in arg for arg in args)


@pytest.mark.parametrize("name", ["itsd-worker-cartoon", "itsd-metrics"])
def test_the_commands_the_pods_run_are_ones_itsd_accepts(name):
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == name]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    command = itsd.get_command(None, args[0])  # type: ignore[arg-type]
    assert command is not None
    params = {opt for p in command.params for opt in getattr(p, "opts", [])}
    assert {arg for arg in args[1:] if arg.startswith("--")} <= params


def test_redis_keeps_an_append_only_file_on_a_volume_with_a_password_and_no_eviction():
    (redis,) = by_kind("StatefulSet")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert '--requirepass "$REDIS_PASSWORD"' in command and "--dir /data" in command
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == container["volumeMounts"][0]["name"]


def test_the_pods_run_the_images_the_dockerfile_and_compose_build_on_their_ports_as_its_user():
    repo = DEPLOY.parent.parent
    dockerfile = (repo / "docker" / "worker.Dockerfile").read_text()
    compose = yaml.safe_load((repo / "compose.yaml").read_text())["services"]
    (image,) = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())["images"]
    assert f"{image['name']}:{image['newTag']}" == compose["worker"]["image"]  # what scripts/images build gpu tags
    deployments = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in by_kind("Deployment")}
    for pod in deployments.values():
        (container,) = pod["containers"]
        assert container["image"] == image["name"]
        assert pod["securityContext"]["runAsUser"] == 1000 and "\nUSER 1000\n" in dockerfile
    worker = deployments["itsd-worker-cartoon"]["containers"][0]
    assert f"ITSD_CACHE_DIR={env_of(worker)['ITSD_CACHE_DIR']}" in dockerfile  # the image's cache, on a volume
    assert env_of(worker)["ITSD_METRICS_PORT"] == compose["worker"]["environment"]["ITSD_METRICS_PORT"]
    metrics = deployments["itsd-metrics"]["containers"][0]
    assert metrics["args"] == compose["metrics"]["command"] and metrics["ports"][0]["containerPort"] == 9809
    (redis,) = by_kind("StatefulSet")
    assert redis["spec"]["template"]["spec"]["containers"][0]["image"] == compose["redis"]["image"]
