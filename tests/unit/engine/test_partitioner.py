"""The C partitioner agrees with aiokafka's (pure Python) Kafka default partitioner."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from app.engine.partitioner import partition_of, partitioner, partitions_of


def test_keys_land_where_kafkas_default_partitioner_puts_them() -> None:
    rng = random.Random(7)
    reference = DefaultPartitioner()
    for n in range(2_000):
        key = rng.randbytes(rng.randrange(0, 64)) if n % 2 else f"orders:{n}".encode()
        partitions = list(range(rng.choice([1, 3, 8, 12, 64])))
        assert partitioner(key, partitions, partitions) == reference(key, partitions, partitions)


def test_unkeyed_records_go_to_an_available_partition() -> None:
    assert {partitioner(None, [0, 1, 2, 3], [2]) for _ in range(50)} == {2}
    assert partitioner(None, [0, 1], []) in {0, 1}


def test_a_batch_of_ids_lands_where_each_id_alone_does() -> None:
    ids = [f"wal_{n:013d}_3_{n * 7}" for n in range(500)] + ["", "é-ü", "x" * 300]
    for partitions in (1, 8, 12):
        assert partitions_of(ids, partitions) == [partition_of(i.encode(), partitions) for i in ids]
