"""The worker gives memory back once after each busy spell, never during one."""

from __future__ import annotations

import pytest

from app.engine import memory


class Clock:
    def __init__(self) -> None:
        self.now, self.cpu = 0.0, 0.0

    def spend(self, seconds: float, load: float) -> None:
        self.now += seconds
        self.cpu += seconds * load


def test_it_trims_once_when_a_busy_spell_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(memory, "_trim", trims.append)
    clock = Clock()
    trimmer = memory.Trimmer(clock=lambda: clock.now, cpu=lambda: clock.cpu)
    clock.spend(10, 0.01)
    assert not trimmer.look() and trims == []  # quiet from the start: nothing to give back
    clock.spend(10, 0.9)
    assert not trimmer.look()  # busy: not now
    clock.spend(10, 0.1)
    assert not trimmer.look()  # winding down, not quiet yet
    clock.spend(10, 0.01)
    assert trimmer.look() and trims == [0]  # quiet after busy: once
    clock.spend(10, 0.01)
    assert not trimmer.look() and trims == [0]


def test_without_glibc_there_is_nothing_to_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_trim", None)
    assert memory.trim() is False
