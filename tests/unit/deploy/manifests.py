"""Loading and validating deploy/k8s for the tests beside this module.

Kubernetes objects are validated with kubernetes-validate's bundled strict schemas
(unknown fields and wrong types fail) for one pinned Kubernetes version; KEDA's
objects with jsonschema against deploy/k8s/schemas/keda-scaledobject.schema.json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
KEDA_SCHEMA = K8S / "schemas" / "keda-scaledobject.schema.json"
KUBERNETES_VERSION = "1.33.0"
#: Manifests that exist but are deliberately not applied by kustomize.
ALTERNATIVES = {"hpa.yaml"}
PLACEHOLDER = "change-me"
#: 20+ characters of a key/token alphabet with letters and digits: an API key, a password.
LONG_TOKEN = re.compile(r"(?=[\w+/=-]*\d)(?=[\w+/=-]*[A-Za-z])[\w+/=-]{20,}")
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING = {"StatefulSet", "Deployment", "DaemonSet"}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifest_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.name != "kustomization.yaml")


def keda_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def object_errors(doc: dict[str, Any], where: str, keda: jsonschema.Validator) -> list[str]:
    where = f"{where}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if str(doc.get("apiVersion", "")).startswith("keda.sh/"):
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in keda.iter_errors(doc)
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]  # an unknown kind must not pass silently
    return []


def manifest_errors(paths: list[Path]) -> list[str]:
    """Every validation problem of the objects in ``paths``; empty when all are valid."""
    keda = keda_validator()
    return [
        error
        for path in paths
        for doc in load(path)
        for error in object_errors(doc, path.name, keda)
    ]


def objects() -> list[dict[str, Any]]:
    return [doc for path in manifest_files(K8S) for doc in load(path)]


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects() if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    return pod_specs_of(objects())


def pod_specs_of(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in docs:
        if o["kind"] == "CronJob":
            yield o["kind"], o["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif o["kind"] in WORKLOADS:
            yield o["kind"], o["spec"]["template"]["spec"]


def config() -> dict[str, str]:
    return only("ConfigMap", "wal-config")["data"]


def settings_env_names() -> set[str]:
    return {f"WAL_{name.upper()}" for name in Settings.model_fields}
