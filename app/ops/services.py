"""The local stack's processes: their state file, pid files and logs, ports that answer,
and what a service's status says (used by ``app.ops.stack`` and ``app.ops.databases``)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import click

from app.settings import Settings

HOST = "127.0.0.1"


DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy" / "local"


LOG_TAIL_LINES = 30


State = dict[str, dict[str, str]]


class StackError(click.ClickException):
    """A service did not come up; the message ends with the tail of its log."""


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | str
    """The pid of the process ``up`` started, ``"external"``, or ``"-"``."""
    address: str
    running: bool
    log: Path | None
    note: str = ""

    def line(self) -> str:
        state = "running" if self.running else "down"
        log = f"  log {self.log}" if self.log else ""
        note = f"  ({self.note})" if self.note else ""
        line = f"{self.name:<11}{state:<9}{self.address:<17}pid {self.pid!s:<10}{log}{note}"
        return line.rstrip()


def stack_dir(settings: Settings) -> Path:
    return settings.stack_dir.expanduser().resolve()


def load_state(settings: Settings) -> State:
    path = stack_dir(settings) / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(settings: Settings, state: State) -> None:
    path = stack_dir(settings) / "state.json"
    if state:
        path.write_text(json.dumps(state, indent=2) + "\n")
    else:
        path.unlink(missing_ok=True)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def alive(pid: int | None, marker: str) -> bool:
    """Whether ``pid`` runs a command line containing ``marker``.

    The marker guards against a reused pid; a zombie has an empty command line.
    """
    if pid is None:
        return False
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_pid(pid: int, marker: str, timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not alive(pid, marker):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid, marker) and time.monotonic() < deadline:
            time.sleep(0.2)


def log_tail(*paths: Path) -> str:
    parts = []
    for path in paths:
        try:
            with path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
                lines = f.read().decode(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            continue
        if lines:
            parts.append(f"--- last lines of {path} ---\n" + "\n".join(lines))
    return "\n".join(parts) or "(no log output)"


def is_error(prev: str, line: str) -> bool:
    """An ERROR line, a cause, or the exception message right below an ERROR line."""
    if " ERROR " in line or " FATAL " in line or line.startswith("Caused by"):
        return True
    return " ERROR " in prev and not line.startswith(("[", "\t", " "))


def errors_in(path: Path, offset: int) -> str:
    """The ERROR lines and causes ``path`` gained past ``offset``: Kafka buries them fast."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    hits = [line for prev, line in itertools.pairwise(["", *lines]) if is_error(prev, line)]
    return "--- errors ---\n" + "\n".join(hits[:LOG_TAIL_LINES]) + "\n" if hits else ""


def status_of(
    name: str, port: int, pid: int | None, log: Path | None, note: str = ""
) -> ServiceStatus:
    running = port_open(port)
    shown: int | str = pid if pid is not None else ("external" if running else "-")
    return ServiceStatus(name, shown, f"{HOST}:{port}", running, log if pid else None, note)
