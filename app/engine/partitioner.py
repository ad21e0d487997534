"""Kafka's default partitioner - murmur2 of the key bytes - computed in C.

aiokafka's ``DefaultPartitioner`` hashes in pure Python: about 20 µs a key,
and a busy worker hashes several keys per message (each keyed record it
produces, and each message id whose status it notes). ``murmurhash2`` gives
the same numbers (checked against aiokafka's in the unit tests) in well under
a microsecond. The fleet's producer and Faust's routing use :func:`partitioner`,
so everything that maps a key to a partition agrees with the Java clients.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from murmurhash2 import murmurhash2

#: The seed of Kafka's murmur2 (``Utils.murmur2``).
SEED = 0x9747B28C


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions`` (Kafka's ``toPositive(murmur2) % n``)."""
    return (murmurhash2(key, SEED) & 0x7FFFFFFF) % partitions


def partitions_of(keys: Iterable[str], partitions: int) -> list[int]:
    """:func:`partition_of` of each key's UTF-8 bytes, in one loop (a batch's status ids:
    a Python call per key cost as much as the hash)."""
    return [(murmurhash2(k.encode(), SEED) & 0x7FFFFFFF) % partitions for k in keys]


def partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """aiokafka's partitioner interface: keyed by hash, unkeyed to a random available one."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[partition_of(key, len(all_partitions))]
