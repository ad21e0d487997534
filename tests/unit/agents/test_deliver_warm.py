"""Warming targets ahead of the first batch: which targets, once each, failures harmless."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from agents import deliver
from agents.deliver import calls
from app.errors import ConfigError
from app.models import Namespace
from app.settings import Settings
from targets.base import Outcome, Target, Write
from targets.pool import TargetPool

NAMESPACES = {
    "orders": Namespace.model_validate(
        {
            "name": "orders",
            "targets": [
                {"identifier": "pg", "type": "sql"},
                {"identifier": "old", "type": "sql", "enabled": False},
                {"identifier": "cache", "type": "sql", "config": {"broken": True}},
            ],
        }
    ),
    "plain": Namespace.model_validate({"name": "plain"}),  # no targets: the journal
    "off": Namespace.model_validate(
        {"name": "off", "enabled": False, "targets": [{"identifier": "pg", "type": "sql"}]}
    ),
}


class Fake(Target):
    kind = "fake"
    opened: list[str] = []
    warmed: list[str] = []

    async def open(self) -> None:
        await asyncio.sleep(0)  # two callers at once must still open it once
        Fake.opened.append(self.name)

    async def warm(self) -> None:
        if self.config.get("broken"):
            raise ConnectionRefusedError("down")
        Fake.warmed.append(self.name)

    async def deliver(self, batch: Sequence[Write]) -> list[Outcome]:
        raise AssertionError("warming delivers nothing")


@pytest.fixture(autouse=True)
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    Fake.opened, Fake.warmed = [], []
    monkeypatch.setattr(deliver, "all_names", lambda: sorted(NAMESPACES))
    monkeypatch.setattr(deliver, "lookup", NAMESPACES.get)
    monkeypatch.setattr(deliver, "JOURNAL", deliver.JOURNAL.model_copy(update={"type": "sql"}))

    def create(kind: str, name: str, config: dict[str, object], settings: Settings) -> Target:
        return Fake(name, config, settings)

    monkeypatch.setattr(calls, "POOL", TargetPool(deliver.settings, create=create))


async def test_the_enabled_targets_of_enabled_namespaces_are_opened_once_and_warmed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    results = await asyncio.gather(deliver.warm_targets(), deliver.warm_targets())
    assert results == [2, 2]  # pg and the journal; "cache" failed, "old" and "off" skipped
    assert sorted(Fake.opened) == ["cache", "journal", "pg"]  # once each, though asked twice
    assert sorted(Fake.warmed) == ["journal", "journal", "pg", "pg"]
    assert "warming target orders/cache failed: ConnectionRefusedError" in caplog.text
    assert "down" not in caplog.text  # the type only: a driver's message may name hosts


async def test_a_target_that_cannot_be_configured_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def refuse(self: Fake) -> None:
        raise ConfigError("sql target pg: unusable url")

    monkeypatch.setattr(Fake, "open", refuse)
    assert await deliver.warm_targets() == 0
    assert caplog.text.count("failed: ConfigError") == 3


async def test_only_the_first_namespaces_are_warmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deliver, "WARM_NAMESPACES", 1)  # "off" is not counted: disabled
    assert await deliver.warm_targets() == 1
    assert sorted(Fake.opened) == ["cache", "pg"]  # "orders" only ("plain" comes after it)
