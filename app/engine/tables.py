"""A Faust GlobalTable whose changelog is a topic of the fleet's choosing.

Faust names a changelog ``<app id>-<table>-changelog``, and its partition assignor
asks for that name even when a custom ``changelog_topic`` is given (it then fails
with a KeyError and the group never finishes joining). So the name is overridden
where both read it: ``_changelog_topic_name`` (pinned in
``tests/unit/engine/test_upstream.py``).
"""

from __future__ import annotations

from typing import Any

import faust


class TopicGlobalTable(faust.GlobalTable):
    """A GlobalTable over ``changelog_name`` (for example the public namespaces topic)."""

    def __init__(self, app: Any, *, changelog_name: str, **kwargs: Any) -> None:
        self._wal_changelog_name = changelog_name  # read while Faust's init runs
        super().__init__(app, **kwargs)

    def _changelog_topic_name(self) -> str:
        return self._wal_changelog_name
