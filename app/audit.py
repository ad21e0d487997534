"""The audit trail of admin actions: one log line and one count per action.

Every operation that changes the fleet's behaviour (``wal backfill``, namespace
changes, dead-letter replays, and what later joins them) calls :func:`audit`
once it is decided: who (the :class:`~app.web.access.Caller`, a key fingerprint,
never the key), what (an action name and its arguments), when (the line's time)
and how it ended. Lines go to the ``wal.audit`` logger, so a deployment can route
them apart; ``wal_admin_actions_total{action,outcome}`` counts them.
"""

from __future__ import annotations

import logging
from typing import Any

from app import metrics
from app.errors import Rejected
from app.web import access
from app.web.access import Caller

log = logging.getLogger("wal.audit")


def audit(caller: Caller | str, action: str, outcome: str = "ok", **details: Any) -> None:
    """Log and count one admin action. ``details`` must hold no secret (names, counts,
    times): they are written as they are."""
    metrics.ADMIN_ACTIONS.labels(action, outcome).inc()
    shown = " ".join(f"{k}={v}" for k, v in details.items() if v is not None)
    log.info(
        "audit: %s %s %s%s",
        caller,
        action,
        outcome,
        f" {shown}" if shown else "",
        extra={"actor": str(caller), "action": action, "outcome": outcome, "details": details},
    )


def require_admin(action: str, key: str | None, digests: frozenset[str]) -> Caller:
    """The admin behind ``key`` for ``action`` (:func:`app.web.access.admin`); a refusal is
    audited too (who: the presented key's fingerprint, or ``anonymous``) and re-raised."""
    try:
        return access.admin(key, digests)
    except Rejected as refused:
        who = f"key:{access.fingerprint(access.hash_key(key))}" if key else "anonymous"
        audit(who, action, "refused", reason=refused.code)
        raise
