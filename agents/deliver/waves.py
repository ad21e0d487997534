"""Deliver: ``ordering: key`` namespaces' writes in waves, one per (key, target), each
gated by the key's sequencing state (:mod:`tables.ordering`)."""

from __future__ import annotations

from agents.deliver.items import Item, ordered
from agents.deliver.outcomes import park
from app import names
from app.names import Record
from tables import ordering


def wave(pending: list[tuple[Item, str]]) -> tuple[list[tuple[Item, str]], list[tuple[Item, str]]]:
    """Split off what may go to the targets together: one write per ordered (key, target)."""
    if not any(ordered(item) for item, _ in pending):
        return pending, []
    wave, rest, seen = [], [], set()
    for item, identifier in pending:
        slot = (item.key, identifier)
        if ordered(item) and slot in seen:
            rest.append((item, identifier))
        else:
            seen.add(slot)
            wave.append((item, identifier))
    return wave, rest


def parked(
    write: tuple[Item, str],
    states: dict[bytes, dict[str, ordering.KeyState]],
    follow_ups: list[Record],
) -> bool:
    """Gate an ordered write; when it must wait behind its key, park it and say so."""
    item, identifier = write
    if not ordered(item):
        return False
    per_target = states.setdefault(item.key or b"", ordering.load(item.key or b""))
    action, state, seq = ordering.gate(
        per_target.get(identifier), item.writes[identifier].id, _carried_seq(item, identifier)
    )
    if state is not None:
        per_target[identifier] = state
    item.seqs[identifier] = seq
    if action == "deliver":
        return False
    follow_ups.append(park(item, identifier, seq))
    return True


def _carried_seq(item: Item, identifier: str) -> int | None:
    if item.headers.get(names.TARGET) != identifier or not item.headers.get(names.ORDER_SEQ):
        return None
    return int(item.headers[names.ORDER_SEQ])
