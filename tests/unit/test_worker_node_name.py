"""Each consumer's Celery node name is its own (issue 28: on RabbitMQ a node's
remote-control queue is exclusive, and two consumers named alike kill each other)."""

from __future__ import annotations

from worker.supervisor import node_name


def test_consumers_of_one_worker_and_host_get_different_names() -> None:
    names = {
        node_name(["default", "webhooks"], 101),
        node_name(["batch"], 102),
        node_name(["default", "webhooks"], 103),  # the first one, started again
    }
    assert names == {"default-webhooks.101@%h", "batch.102@%h", "default-webhooks.103@%h"}


def test_a_queue_name_cannot_break_the_node_name() -> None:
    name = node_name(["gpu@a100", "x" * 100], 7)
    assert name.count("@") == 1
    assert name.endswith(".7@%h")  # %h: Celery puts the host name there
    assert len(name.split("@")[0]) <= 64 + len(".7")
