"""deploy/Dockerfile: built from the repo root, copies only the package sources, runs as non-root.

No Docker engine is needed: the Dockerfile is parsed into its instructions.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
#: What the build may take from the context (the top level of the repo is fixed).
ALLOWED_SOURCES = {"pyproject.toml", "README.md", "app", "agents", "tables", "targets"}


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(?:[ \t]*(?:#[^\n]*)?\n)*", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def copy_sources(text: str) -> list[str]:
    """Every path a COPY/ADD takes from the build context (not from another stage)."""
    sources = []
    for keyword, args in instructions(text):
        if keyword in ("COPY", "ADD"):
            words = shlex.split(args)
            if any(w.startswith("--from=") for w in words):
                continue
            paths = [w for w in words if not w.startswith("--")]
            sources += [p.removeprefix("./").rstrip("/") for p in paths[:-1]]
    return sources


def dockerfile_problems(text: str) -> list[str]:
    steps = instructions(text)
    problems = [
        f"copies {s!r} from the context" for s in copy_sources(text) if s not in ALLOWED_SOURCES
    ]
    users = [args for keyword, args in steps if keyword == "USER"]
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    final_users = [args for k, args in steps[last_from:] if k == "USER"]
    if not final_users:
        problems.append("the final stage has no USER")
    elif not re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", final_users[-1]):
        problems.append(f"USER {final_users[-1]!r} is not a numeric non-root uid")
    if users and users[-1].split(":")[0] in ("root", "0"):
        problems.append("runs as root")
    return problems


def env_of(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions(text):
        if keyword == "ENV":
            env.update(word.split("=", 1) for word in shlex.split(args))  # type: ignore[misc]
    return env


def test_the_dockerfile_has_no_problems() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_it_copies_every_allowed_source_and_nothing_else() -> None:
    assert set(copy_sources(DOCKERFILE.read_text())) == ALLOWED_SOURCES


def test_it_is_a_multi_stage_build_on_python_311_slim() -> None:
    steps = instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    bases = [
        a.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        for k, a in steps
        if k == "FROM"
    ]
    assert len(bases) >= 2 and set(bases) == {"python:3.11-slim"}
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert "pip wheel" in runs and "python -m venv" in runs
    assert any(k == "COPY" and "--from=build" in a for k, a in steps)


def test_entrypoint_command_port_and_environment() -> None:
    text = DOCKERFILE.read_text()
    steps = dict(instructions(text))  # the last of each instruction wins, as in Docker
    assert json.loads(steps["ENTRYPOINT"]) == ["wal"]
    assert json.loads(steps["CMD"]) == ["worker"]
    assert steps["EXPOSE"] == "6066"
    env = env_of(text)
    assert env["WAL_WEB_HOST"] == "0.0.0.0"
    assert env["WAL_DATA_DIR"] == "/var/lib/wal"
    assert env["WAL_STORE"] == "memory://"
    assert env["PATH"].startswith("/opt/wal/bin:")


def test_the_image_user_is_the_pod_user() -> None:
    uid = dict(instructions(DOCKERFILE.read_text()))["USER"].split(":")[0]
    sts = yaml.safe_load((ROOT / "deploy" / "k8s" / "statefulset.yaml").read_text())
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_the_build_context_notes_say_how_to_build() -> None:
    assert "docker build -f deploy/Dockerfile" in DOCKERFILE.read_text()


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("COPY app ./app", "COPY . .", "copies '.'"),
        ("COPY targets ./targets", "COPY targets ./targets\nCOPY tests ./tests", "copies 'tests'"),
        ("USER 10001:10001", "USER root", "not a numeric non-root uid"),
        ("USER 10001:10001", "USER 0", "not a numeric non-root uid"),
        ("USER 10001:10001\n", "", "no USER"),
    ],
)
def test_a_broken_dockerfile_is_caught(old: str, new: str, problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert text.count(old) == 1
    problems = dockerfile_problems(text.replace(old, new))
    assert any(problem in p for p in problems), problems


def test_the_build_installs_the_rocksdb_extra_by_default() -> None:
    """WAL_STORE=rocksdb:// needs rocksdict in the image: the ``rocksdb`` extra, by default."""
    import tomllib

    text = DOCKERFILE.read_text()
    steps = instructions(text)
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    assert "rocksdb" in args["EXTRAS"].strip('"').split(",")
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert '"${wheel}${EXTRAS:+[${EXTRAS}]}"' in runs and "import rocksdict" in runs
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    rocksdb = extras["optional-dependencies"]["rocksdb"]
    assert any(r.startswith("rocksdict") for r in rocksdb), rocksdb
    assert "wal-fleet[rocksdb]" in extras["optional-dependencies"]["dev"]  # CI runs the store
