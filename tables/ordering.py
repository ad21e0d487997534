"""Ordering: per-key sequencing for namespaces with ``ordering: key``.

While a write for routing key *K* to target *T* waits in retry, later writes
for (*K*, *T*) must not overtake it. The table keeps, only for keys that are
*blocked* that way, a small state: the sequence numbers handed out (``last``),
the next one allowed through (``next``), and which message holds which number
(``ids``). Writes behind a blocked key are *parked*: sent round the 1 s delay
tier with their number in ``wal-order-seq`` until their turn comes. Other keys
are never held up. A key's state disappears when its last number is released.

Every transition is keyed by message id and sequence number, so replaying a
batch after a crash (the table's changelog may be ahead of the committed
offsets) makes the same decisions again.

The table is keyed by the ``wal-deliver`` record key and uses the producer's
partitioner, so its changelog partitions line up with ``wal-deliver``'s: the
worker that owns a key's records owns its state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import orjson

from app.engine.changelog import changelog_record
from app.fleet import fleet, settings
from app.names import Record

ordering = fleet.Table(
    "ordering",
    key_type=bytes,
    value_type=bytes,
    partitions=settings.partitions,
    use_partitioner=True,
    help="Blocked keys of ordering=key namespaces: sequence numbers per target.",
)

Action = Literal["deliver", "park"]


@dataclass
class KeyState:
    """Sequencing state of one (key, target) while the key is blocked."""

    next: int = 1
    last: int = 0
    ids: dict[str, int] = field(default_factory=dict)


def gate(
    state: KeyState | None, message_id: str, seq: int | None
) -> tuple[Action, KeyState | None, int | None]:
    """Deliver now or park? Returns the action, the new state and the write's number.

    ``seq`` is the number the write carries (header), if any.
    """
    if state is None:
        return "deliver", None, None  # not blocked (a carried number is stale: released)
    if seq is None:
        seq = state.ids.get(message_id)
    elif state.ids.get(message_id) != seq:
        # A number this state does not hold for it: released already (a replay), or
        # handed out by an earlier state of the key, dropped once all its numbers were
        # released (a stale copy). Either way the write is done: it goes (targets dedupe)
        # holding no number, so it releases none - it must not move ``next`` past a write
        # that holds that number now.
        return "deliver", state, None
    if seq is None:  # a new write behind a blocked key: take the next number, wait
        state.last += 1
        state.ids[message_id] = state.last
        return "park", state, state.last
    if seq <= state.next:  # its turn
        return "deliver", state, seq
    return "park", state, seq


def block(state: KeyState | None, message_id: str, seq: int | None) -> tuple[KeyState, int]:
    """A write is going to retry: make the key wait behind it; return its number."""
    if state is None:
        state = KeyState(next=1, last=1, ids={message_id: 1})
        return state, 1
    if seq is None:
        seq = state.ids.get(message_id)
    if seq is None:  # cannot happen through gate(); be safe: queue it last
        state.last += 1
        seq = state.ids[message_id] = state.last
    return state, seq


def release(state: KeyState | None, message_id: str, seq: int | None) -> KeyState | None:
    """A write is done (delivered or dead-lettered): let the next one through."""
    if state is None or seq is None or seq < state.next:
        return state
    state.ids.pop(message_id, None)
    if seq == state.next:
        state.next += 1
    return None if state.next > state.last else state


def load(key: bytes) -> dict[str, KeyState]:
    raw = ordering.get(key)
    if not raw:
        return {}
    return {t: KeyState(**s) for t, s in orjson.loads(raw).items()}


def save(key: bytes, states: dict[str, KeyState]) -> Record:
    """Store a key's states (none left: delete it); return the changelog record to emit."""
    live = {t: s.__dict__ for t, s in states.items() if s is not None}
    return changelog_record(ordering, key, orjson.dumps(live) if live else None)
