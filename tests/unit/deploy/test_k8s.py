"""deploy/k8s: every manifest validates strictly and offline; kustomize lists exactly them."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.deploy.manifests import (
    ALTERNATIVES,
    K8S,
    keda_validator,
    load,
    manifest_errors,
    manifest_files,
    object_errors,
    objects,
    pod_specs_of,
)

# -- strict schema validation ----------------------------------------------------------------


def test_the_network_is_really_off() -> None:
    with pytest.raises(AssertionError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))


def test_every_manifest_validates_strictly_offline() -> None:
    paths = manifest_files(K8S)
    assert {p.name for p in paths} >= {"statefulset.yaml", "keda-scaledobject.yaml", "hpa.yaml"}
    assert manifest_errors(paths) == []


def test_every_object_is_checked_against_a_schema() -> None:
    kinds = {o["kind"] for o in objects()}
    assert kinds == {
        "ConfigMap", "Secret", "Service", "StatefulSet", "PodDisruptionBudget", "Job",
        "HorizontalPodAutoscaler", "ScaledObject", "TriggerAuthentication",
    }  # fmt: skip


#: (file, text, replacement, a fragment the validation error must contain)
BREAKAGES = [
    ("statefulset.yaml", "readinessProbe:", "readinessProbes:", "'readinessProbes' was unexpected"),
    ("statefulset.yaml", "replicas: 3", "replicas: three", "spec.replicas: 'three' is not of type"),
    ("statefulset.yaml", "containerPort: 6066", "containerPort: http", "containerPort"),
    ("service-headless.yaml", "clusterIP: None", "clusterIp: None", "'clusterIp' was unexpected"),
    ("pdb.yaml", "maxUnavailable: 1", "maxUnavailabel: 1", "'maxUnavailabel' was unexpected"),
    ("job-namespaces-apply.yaml", "backoffLimit: 6", 'backoffLimit: "6"', "spec.backoffLimit"),
    ("secret.yaml", "stringData:", "stringdata:", "'stringdata' was unexpected"),
    ("hpa.yaml", "averageUtilization: 70", "averageUtilisation: 70", "'averageUtilisation'"),
    (
        "keda-scaledobject.yaml",
        'allowIdleConsumers: "false"',
        "allowIdleConsumers: false",
        "allowIdleConsumers: False is not of type 'string'",
    ),
    (
        "keda-scaledobject.yaml",
        'offsetResetPolicy: "latest"',
        'offsetResetPolicy: "newest"',
        "'newest' is not one of",
    ),
    (
        "keda-scaledobject.yaml",
        "minReplicaCount: 1",
        "minReplicas: 1",
        "'minReplicas' was unexpected",
    ),
    (
        "keda-scaledobject.yaml",
        "parameter: password",
        "parameter: passwd",
        "'passwd' is not one of",
    ),
    (
        "keda-scaledobject.yaml",
        'lagThreshold: "500"',
        "lagThreshold: 500",
        "lagThreshold: 500 is not of type 'string'",
    ),
    (
        "keda-scaledobject.yaml",
        "kind: StatefulSet",
        "kind: StatefulSet\n    replicas: 1",
        "'replicas' was unexpected",
    ),
]


@pytest.mark.parametrize(("name", "old", "new", "expect"), BREAKAGES)
def test_a_broken_manifest_is_caught(
    tmp_path: Path, name: str, old: str, new: str, expect: str
) -> None:
    shutil.copytree(K8S, tmp_path / "k8s")
    path = tmp_path / "k8s" / name
    text = path.read_text()
    assert text.count(old) == 1, f"{name} no longer contains {old!r} once: update the case"
    path.write_text(text.replace(old, new))
    errors = manifest_errors([path])
    assert errors and all(e.startswith(name) for e in errors), errors
    assert any(expect in e for e in errors), errors


# -- kustomization ---------------------------------------------------------------------------


def kustomize() -> Path:
    """The kustomize binary `make deps` builds (deploy/local/install-deps.sh pins it)."""
    script = (K8S.parent / "local" / "install-deps.sh").read_text()
    (version,) = re.findall(r"^KUSTOMIZE_VERSION=(\S+)$", script, re.M)
    cache = Path(os.environ.get("WAL_STACK_CACHE_DIR") or Path.home() / ".cache" / "wal")
    binary = cache / "bin" / f"kustomize-{version}"
    if not binary.exists():
        pytest.fail(f"{binary} is missing: run `make deps`", pytrace=False)
    return binary


def test_the_kustomize_build_validates_strictly() -> None:
    built = subprocess.run(
        [str(kustomize()), "build", str(K8S)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [doc for doc in yaml.safe_load_all(built) if doc]
    keda = keda_validator()
    assert [e for doc in docs for e in object_errors(doc, "kustomize build", keda)] == []
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert len(docs) == sum(len(load(K8S / name)) for name in kustomization["resources"])
    assert {doc["metadata"]["namespace"] for doc in docs} == {kustomization["namespace"]}
    images = {c["image"] for _, spec in pod_specs_of(docs) for c in spec["containers"]}
    assert images == {f"wal-fleet:{kustomization['images'][0]['newTag']}"}


def kustomization_problems(directory: Path) -> list[str]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = kustomization.get("resources", [])
    present = {p.name for p in manifest_files(directory)}
    problems = [f"listed twice: {n}" for n in sorted({n for n in listed if listed.count(n) > 1})]
    problems += [f"listed but missing: {n}" for n in sorted(set(listed) - present)]
    problems += [
        f"present but not listed: {n}" for n in sorted(present - set(listed) - ALTERNATIVES)
    ]
    problems += [f"alternative listed: {n}" for n in sorted(ALTERNATIVES & set(listed))]
    return problems


def test_kustomization_lists_exactly_the_manifests_that_exist() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization_problems(K8S) == []
    assert all((K8S / name).is_file() for name in ALTERNATIVES)


def test_kustomization_check_catches_a_stray_and_a_missing_file(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    (copy / "pdb.yaml").unlink()
    (copy / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert kustomization_problems(copy) == [
        "listed but missing: pdb.yaml",
        "present but not listed: extra.yaml",
    ]


def test_keda_and_hpa_are_documented_as_alternatives() -> None:
    readme = (K8S / "README.md").read_text()
    assert "hpa.yaml" in readme and "keda-scaledobject.yaml" in readme
    assert "not both" in readme.lower()
