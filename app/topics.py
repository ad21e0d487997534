"""The fleet's topics, as this worker's Faust app knows them, and the delay tiers.

Their names and headers are :mod:`app.names`; writing to them is
:mod:`app.engine.producing`.
"""

from __future__ import annotations

from app.fleet import fleet, settings
from app.names import tier_name, topic_names

#: Delay tiers, in seconds (WAL_DELAY_TIERS): a waiting message sits in the largest
#: tier that does not overshoot its due time, and hops down until it is due.
DELAY_TIERS: tuple[int, ...] = settings.tiers


NAMES = topic_names(settings)
ingest_topic = fleet.topic(NAMES["ingest"], partitions=settings.partitions)
deliver_topic = fleet.topic(NAMES["deliver"], partitions=settings.partitions)
stats_topic = fleet.topic(NAMES["stats"], partitions=settings.partitions)
status_topic = fleet.topic(NAMES["status"], partitions=settings.partitions)
delay_topics = {
    seconds: fleet.topic(NAMES[f"delay-{tier_name(seconds)}"], partitions=settings.partitions)
    for seconds in DELAY_TIERS
}


def delay_topic_for(remaining_ms: int) -> str:
    """The delay tier to wait in: the largest that does not overshoot ``remaining_ms``."""
    fitting = [t for t in DELAY_TIERS if t * 1000 <= remaining_ms] or [DELAY_TIERS[0]]
    return NAMES[f"delay-{tier_name(max(fitting))}"]
