"""deploy/k8s: the pieces fit together — workloads, services, config, secrets, autoscaling."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from app.models import Namespace
from app.settings import Settings
from tests.unit.deploy.manifests import (
    K8S,
    LONG_RUNNING,
    LONG_TOKEN,
    PLACEHOLDER,
    ROOT,
    config,
    load,
    objects,
    only,
    pod_specs,
    settings_env_names,
)

# -- workloads -------------------------------------------------------------------------------


def test_every_container_has_resources_and_a_locked_down_security_context() -> None:
    seen = 0
    for kind, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, kind
        assert spec["enableServiceLinks"] is False, f"{kind}: Service 'wal' would set WAL_* env"
        mounts_by_volume = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            seen += 1
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{kind}/{c['name']}"
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in mounts_by_volume[tmp[0]["name"]], f"{kind}: /tmp"
    assert seen >= 2


def test_long_running_containers_have_all_three_probes_on_the_health_paths() -> None:
    for kind, spec in pod_specs():
        if kind not in LONG_RUNNING:
            continue
        for c in spec["containers"]:
            paths = {p: c[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")}
            assert paths == {"startupProbe": "/health/live", "livenessProbe": "/health/live"}
            assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
            port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"]["port"] in port_names


def test_the_statefulset_is_the_worker_fleet_described_in_the_brief() -> None:
    sts = only("StatefulSet", "wal")
    spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    assert pod["terminationGracePeriodSeconds"] == 60
    (worker,) = pod["containers"]
    assert worker["args"] == ["worker"]
    assert worker["ports"] == [{"name": "http", "containerPort": 6066, "protocol": "TCP"}]
    assert int(config()["WAL_WEB_PORT"]) == 6066
    assert worker["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "1", "memory": "1Gi"},
    }
    assert sts["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "6066",
        "prometheus.io/path": "/metrics",
    }
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    (claim,) = spec["volumeClaimTemplates"]
    data_mount = [m for m in worker["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert [m["mountPath"] for m in data_mount] == [config()["WAL_DATA_DIR"]] == ["/var/lib/wal"]


def test_env_comes_from_the_configmap_and_secret_that_exist() -> None:
    names = {(o["kind"], o["metadata"]["name"]) for o in objects()}
    for _, spec in pod_specs():
        for c in spec["containers"]:
            refs = {
                ("ConfigMap", e["configMapRef"]["name"])
                for e in c["envFrom"]
                if "configMapRef" in e
            }
            refs |= {("Secret", e["secretRef"]["name"]) for e in c["envFrom"] if "secretRef" in e}
            assert refs == {("ConfigMap", "wal-config"), ("Secret", "wal-secrets")} <= names


def test_table_routing_advertises_the_pod_name_under_the_headless_service() -> None:
    sts = only("StatefulSet", "wal")
    headless = only("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # $(VAR) is expanded by the kubelet from the env entries above it.
    assert env["WAL_CANONICAL_URL"]["value"] == (
        f"http://$(POD_NAME).{headless['metadata']['name']}.$(POD_NAMESPACE).svc"
        f":{config()['WAL_WEB_PORT']}"
    )
    names = list(env)
    assert names.index("POD_NAMESPACE") < names.index("WAL_CANONICAL_URL")
    assert names.index("POD_NAME") < names.index("WAL_CANONICAL_URL")
    assert config()["WAL_WEB_HOST"] == "0.0.0.0"


def test_services_and_the_pdb_select_the_worker_pods() -> None:
    sts = only("StatefulSet", "wal")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    for name in ("wal", "wal-headless"):
        svc = only("Service", name)
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert only("Service", "wal")["spec"]["type"] == "ClusterIP"
    pdb = only("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# -- configuration ---------------------------------------------------------------------------


def test_configmap_holds_known_non_secret_settings() -> None:
    data = config()
    assert set(data) <= settings_env_names(), set(data) - settings_env_names()
    secret_keys = set(only("Secret", "wal-secrets")["stringData"])
    assert not set(data) & secret_keys
    assert not {"WAL_SASL_PASSWORD", "WAL_DATABASE_URL", "WAL_REDIS_URL"} & set(data)
    expected = {"WAL_PARTITIONS": "12", "WAL_REPLICATION_FACTOR": "3", "WAL_WEB_HOST": "0.0.0.0"}
    assert expected.items() <= data.items()
    assert {"WAL_BROKER", "WAL_TOPIC_PREFIX", "WAL_LOG_LEVEL"} <= set(data)
    # Either store runs with the image (it ships rocksdict: deploy/Dockerfile, EXTRAS).
    assert data["WAL_STORE"] in ("memory://", "rocksdb://")


def secret_problems(secret: dict[str, Any]) -> list[str]:
    """Why ``secret`` might hold a real credential; empty when it holds placeholders only."""
    problems = [] if "data" not in secret else ["base64 `data` hides its values: use stringData"]
    for key, value in secret.get("stringData", {}).items():
        if "://" in value:
            url = urlsplit(value)
            if url.password != PLACEHOLDER:
                problems.append(f"{key}: the URL's password is not {PLACEHOLDER!r}")
        elif value != PLACEHOLDER:
            problems.append(f"{key}: {value!r} is not the placeholder {PLACEHOLDER!r}")
        if LONG_TOKEN.search(value):
            problems.append(f"{key}: contains a long token that looks like a real secret")
    return problems


def test_the_secret_holds_only_placeholders() -> None:
    secret = only("Secret", "wal-secrets")
    assert secret_problems(secret) == []
    wal_keys = {k for k in secret["stringData"] if k.startswith("WAL_")}
    assert wal_keys <= settings_env_names()
    assert {"WAL_DATABASE_URL", "WAL_REDIS_URL", "WAL_SASL_PASSWORD"} <= wal_keys
    # the admin keys' digests, and the key the namespaces-apply Job presents
    assert {"WAL_ADMIN_API_KEYS", "WAL_ADMIN_API_KEY"} <= wal_keys


@pytest.mark.parametrize(
    "value",
    [
        "postgresql+psycopg://wal:Tr0ub4dor&3@db:5432/wal",
        "hunter2",
        "change-me-AKIAIOSFODNN7EXAMPLEKEY1",
        "redis://:change-me@redis:6379/0?token=ghp_16C7e42F292c6912E7710c838347Ae178B4a",
    ],
)
def test_the_placeholder_check_rejects_real_looking_secrets(value: str) -> None:
    assert secret_problems({"stringData": {"X": value}})


def test_the_placeholder_check_rejects_base64_data() -> None:
    assert secret_problems({"data": {"X": "Y2hhbmdlLW1l"}})


def test_namespaces_job_applies_valid_configs_whose_secret_references_exist() -> None:
    job = only("Job", "wal-namespaces-apply")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["namespaces", "apply", "-f", "/config/namespaces.yaml"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/config"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = only("ConfigMap", volume["configMap"]["name"])
    text = configmap["data"]["namespaces.yaml"]
    docs = yaml.safe_load(text)["namespaces"]
    parsed = [Namespace.model_validate(doc) for doc in docs]
    local = yaml.safe_load((ROOT / "deploy" / "local" / "namespaces.yaml").read_text())
    assert [ns.name for ns in parsed] == [doc["name"] for doc in local["namespaces"]]
    references = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))
    secret_keys = set(only("Secret", "wal-secrets")["stringData"])
    assert references and references <= secret_keys
    assert set(secret_keys) - settings_env_names() <= references  # no unused extra keys
    assert "127.0.0.1" not in text


# -- autoscaling -----------------------------------------------------------------------------


def kafka_trigger() -> dict[str, Any]:
    (trigger,) = only("ScaledObject", "wal")["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    return trigger


def test_keda_scales_the_statefulset_on_lag_of_the_deliver_topic() -> None:
    scaled = only("ScaledObject", "wal")["spec"]
    defaults = Settings.model_fields
    data = config()
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "wal",
    }
    assert scaled["minReplicaCount"] == 1
    assert scaled["maxReplicaCount"] == int(data["WAL_PARTITIONS"]) == 12
    meta = kafka_trigger()["metadata"]
    prefix = data.get("WAL_TOPIC_PREFIX", defaults["topic_prefix"].default)
    assert meta["topic"] == f"{prefix}-deliver" == "wal-deliver"
    assert meta["consumerGroup"] == data.get("WAL_APP_ID", defaults["app_id"].default) == "wal"
    assert meta["offsetResetPolicy"] == "latest" and meta["allowIdleConsumers"] == "false"
    assert int(meta["lagThreshold"]) > 0
    brokers = [
        urlsplit(b if "://" in b else f"kafka://{b}").netloc for b in data["WAL_BROKER"].split(";")
    ]
    assert meta["bootstrapServers"].split(",") == brokers


def test_keda_speaks_the_same_kafka_security_as_the_workers() -> None:
    meta, data = kafka_trigger()["metadata"], config()
    protocol = data.get("WAL_SECURITY_PROTOCOL", "PLAINTEXT")
    assert (meta.get("tls") == "enable") == protocol.endswith("SSL")
    mechanisms = {
        "PLAIN": "plaintext",
        "SCRAM-SHA-256": "scram_sha256",
        "SCRAM-SHA-512": "scram_sha512",
    }
    if protocol.startswith("SASL"):
        assert meta["sasl"] == mechanisms[data["WAL_SASL_MECHANISM"]]
        auth = only("TriggerAuthentication", kafka_trigger()["authenticationRef"]["name"])
        refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
        assert {"username", "password"} <= set(refs)
        secret = only("Secret", "wal-secrets")
        assert {r["name"] for r in refs.values()} == {"wal-secrets"}
        assert refs["password"]["key"] == "WAL_SASL_PASSWORD"
        assert {r["key"] for r in refs.values()} <= set(secret["stringData"])


def test_the_hpa_alternative_targets_the_same_statefulset_and_ceiling() -> None:
    hpa = load(K8S / "hpa.yaml")[0]["spec"]
    assert hpa["scaleTargetRef"] == only("ScaledObject", "wal")["spec"]["scaleTargetRef"]
    assert hpa["maxReplicas"] == int(config()["WAL_PARTITIONS"])
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
