"""The local stack's Kafka: one node by default, or a cluster of voters on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.ops import stack
from app.settings import Settings


def props(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_one_broker_is_the_default_in_the_old_place(tmp_path: Path) -> None:
    (node,) = stack.kafka_nodes(Settings(stack_dir=tmp_path))
    assert (node.name, node.port, node.controller_port) == ("kafka", 9092, 9093)
    node.kdir.mkdir()
    conf = props(stack._kafka_configure(node, [node]))
    assert conf["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert conf["offsets.topic.replication.factor"] == "1"
    assert conf["min.insync.replicas"] == "1"


def test_three_brokers_are_voters_on_their_own_ports_and_dirs(tmp_path: Path) -> None:
    s = Settings(stack_dir=tmp_path, stack_brokers=3, broker="kafka://127.0.0.1:21000")
    nodes = stack.kafka_nodes(s)
    assert [(n.name, n.node_id, n.port) for n in nodes] == [
        ("kafka-1", 1, 21000),
        ("kafka-2", 2, 21002),
        ("kafka-3", 3, 21004),
    ]
    assert stack.bootstrap(s) == "kafka://127.0.0.1:21000;127.0.0.1:21002;127.0.0.1:21004"
    for node in nodes:
        node.kdir.mkdir()
        conf = props(stack._kafka_configure(node, nodes))
        assert conf["node.id"] == str(node.node_id)
        assert conf["listeners"].endswith(f"CONTROLLER://127.0.0.1:{node.port + 1}")
        assert conf["log.dirs"] == str(node.kdir / "data")
        assert conf["controller.quorum.voters"] == (
            "1@127.0.0.1:21001,2@127.0.0.1:21003,3@127.0.0.1:21005"
        )
        assert conf["min.insync.replicas"] == "2"
        assert conf["unclean.leader.election.enable"] == "false"
        for internal in ("offsets.topic", "transaction.state.log", "share.coordinator.state.topic"):
            assert conf[f"{internal}.replication.factor"] == "3"
        assert conf["transaction.state.log.min.isr"] == "2"


def test_every_node_of_a_cluster_is_formatted_with_one_id(tmp_path: Path) -> None:
    nodes = stack.kafka_nodes(Settings(stack_dir=tmp_path, stack_brokers=3))
    (nodes[1].kdir / "data").mkdir(parents=True)
    (nodes[1].kdir / "data" / "meta.properties").write_text("node.id=2\ncluster.id=abcXYZ\n")
    assert stack._cluster_id(nodes) == "abcXYZ"
    assert stack._cluster_id(nodes[:1]) != "abcXYZ"


def test_an_even_quorum_is_refused() -> None:
    with pytest.raises(ValidationError, match="odd"):
        Settings(stack_brokers=2)
