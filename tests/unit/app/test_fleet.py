"""The Faust app's configuration from settings: compression of what the fleet produces."""

from __future__ import annotations

import pytest
from aiokafka import codec

from app.fleet import compression, create_app
from app.settings import Settings


def test_no_compression_by_default_and_gzip_when_asked() -> None:
    assert create_app(Settings()).conf.producer_compression_type is None
    app = create_app(Settings(producer_compression="gzip"))
    assert app.conf.producer_compression_type == "gzip"


def test_a_codec_that_is_not_installed_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    with pytest.raises(RuntimeError, match="WAL_PRODUCER_COMPRESSION=zstd: its codec"):
        compression(Settings(producer_compression="zstd"))


def test_an_unknown_compression_is_refused() -> None:
    with pytest.raises(ValueError, match="producer_compression"):
        Settings(producer_compression="brotli")  # type: ignore[arg-type]
