"""A deployment's declared limits held in a real Redis (shared/jobs/capacity.py):
images a minute with a one-second burst, calls at once, batch lines leaving room
to interactive jobs, tickets handing waiting lines their turns in order, and two
processes' holders sharing one limit; and a deployment whose cooldown ended
probed by one process alone (shared/jobs/routing.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared.jobs.capacity import BUSY_WAIT_SECONDS, Capacity
from shared.jobs.routing import Cooldowns, Target
from shared.jobs.schemas import GenerationParams
from shared.registry import PROCEDURAL, Deployment
from tests.support.processes import RedisServer

PARAMS = GenerationParams(model="m", prompt="p", n=1, size="64x64")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()
    server.stop()


_made = iter(range(1_000_000))


def _target(per_minute: int | None = None, at_once: int | None = None) -> Target:
    """A deployment of its own (a fresh name: no state left by another test)."""
    limits = Deployment(
        id=f"dep-{next(_made)}",
        base_url="http://upstream.test/v1",
        images_per_minute=per_minute,
        max_concurrency=at_once,
    )
    return Target(PROCEDURAL, PARAMS, "m", limits.id, cools=True, limits=limits)


def test_a_minute_limit_allows_one_second_of_it_at_once_then_paces(client: redis.Redis) -> None:
    capacity, target = Capacity(client, 60), _target(per_minute=600)  # 10 a second
    # One second's worth, less the jitter margin (20 ms: a fifth of an image).
    taken = [capacity.take(target, 1, interactive=True) for _ in range(9)]
    assert all(t.call_id for t in taken)
    refused = capacity.take(target, 1, interactive=True)
    assert refused.call_id is None
    assert 0 < refused.wait <= 0.1  # at most the next image's share of a second
    time.sleep(refused.wait + 0.01)
    assert capacity.take(target, 1, interactive=True).call_id


def test_a_call_counts_its_images(client: redis.Redis) -> None:
    capacity, target = Capacity(client, 60), _target(per_minute=600)
    assert capacity.take(target, 8, interactive=True).call_id
    refused = capacity.take(target, 4, interactive=True)
    assert refused.call_id is None
    assert refused.wait > 0.15  # two images' share more


def test_batch_lines_leave_a_tenth_of_the_burst_to_interactive_jobs(client: redis.Redis) -> None:
    capacity, target = Capacity(client, 60), _target(per_minute=600)
    lines = [capacity.take(target, 1, interactive=False) for _ in range(10)]
    assert sum(1 for t in lines if t.call_id) == 8
    assert capacity.take(target, 1, interactive=True).call_id  # the one left


def test_a_call_larger_than_the_burst_waits_for_an_empty_bucket_not_forever(
    client: redis.Redis,
) -> None:
    capacity, target = Capacity(client, 60), _target(per_minute=60)  # one a second
    assert capacity.take(target, 3, interactive=False).call_id  # an idle deployment takes it
    refused = capacity.take(target, 3, interactive=False)
    assert refused.call_id is None
    assert 2.9 < refused.wait <= 3.1  # the bucket full again, and the jitter margin


def test_calls_at_once_are_held_until_given_back(client: redis.Redis) -> None:
    capacity, target = Capacity(client, 60), _target(at_once=2)
    first, second = (capacity.take(target, 1, interactive=True) for _ in range(2))
    assert first.call_id
    assert second.call_id
    third = capacity.take(target, 1, interactive=True)
    assert third.call_id is None
    assert third.slots
    assert third.wait == pytest.approx(BUSY_WAIT_SECONDS)
    capacity.give_back(target, first)
    assert capacity.take(target, 1, interactive=True).call_id


def test_a_batch_line_leaves_one_slot_to_interactive_jobs(client: redis.Redis) -> None:
    capacity, target = Capacity(client, 60), _target(at_once=3)
    lines = [capacity.take(target, 1, interactive=False) for _ in range(3)]
    assert [bool(t.call_id) for t in lines] == [True, True, False]
    assert capacity.take(target, 1, interactive=True).call_id


def test_a_slot_whose_holder_died_frees_when_its_lease_ends(client: redis.Redis) -> None:
    capacity, target = Capacity(client, lease_seconds=1), _target(at_once=1)
    assert capacity.take(target, 1, interactive=True).call_id  # never given back
    assert capacity.take(target, 1, interactive=True).call_id is None
    time.sleep(1.05)
    assert capacity.take(target, 1, interactive=True).call_id


def test_tickets_hand_waiting_lines_their_turns_one_share_apart(client: redis.Redis) -> None:
    capacity, target = Capacity(client, 60), _target(per_minute=600)
    while capacity.take(target, 1, interactive=False).call_id:
        pass  # the burst spent
    waits = [capacity.book(target, 1).wait for _ in range(5)]
    steps = [later - earlier for earlier, later in itertools.pairwise(waits)]
    assert all(step == pytest.approx(0.1, abs=0.01) for step in steps)
    # Each comes back at its turn and finds room (no herd of refusals).
    start = time.monotonic()
    for wait in waits:
        time.sleep(max(0.0, start + wait + 0.005 - time.monotonic()))
        assert capacity.take(target, 1, interactive=False).call_id


def test_two_processes_share_one_limit(client: redis.Redis) -> None:
    target = _target(per_minute=600)
    one, other = Capacity(client, 60), Capacity(redis.Redis.from_url(_url(client)), 60)
    took = sum(
        1
        for _ in range(10)
        for capacity in (one, other)
        if capacity.take(target, 1, interactive=True).call_id
    )
    assert took == 9  # one burst between them, not one each


def test_paced_takers_stay_within_the_limit_and_use_it(client: redis.Redis) -> None:
    """Takers that wait their turn as the worker does get the limit's images over
    two seconds, plus the one burst: no more, and not much fewer."""
    capacity, target = Capacity(client, 60), _target(per_minute=1200)  # 20 a second
    taken, start = 0, time.monotonic()
    while time.monotonic() - start < 2.0:
        if capacity.take(target, 1, interactive=False).call_id:
            taken += 1
        else:
            time.sleep(capacity.book(target, 1).wait + 0.005)
    assert 17 + 38 <= taken <= 20 + 40  # burst (less what is kept back) + 2 s of pace


def test_without_redis_nothing_is_held(client: redis.Redis) -> None:
    capacity, target = Capacity(None, 60), _target(per_minute=1, at_once=1)
    assert all(capacity.take(target, 5, interactive=False).call_id is not None for _ in range(3))
    assert capacity.book(target, 1).wait == 0.0


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/0"


def test_one_process_probes_a_deployment_whose_cooldown_ended(client: redis.Redis) -> None:
    """Half open, through Redis: of two processes, the one that claims it probes;
    the other passes it over until the probe says healthy (or cools it again)."""
    one, other = Cooldowns(client), Cooldowns(redis.Redis.from_url(_url(client)))
    target = _target()
    model, ids = "m", [target.deployment]
    one.cool(target, 0.1)
    assert one.states(model, ids) == other.states(model, ids) == ["cooling"]
    time.sleep(0.15)
    assert one.states(model, ids) == other.states(model, ids) == ["half_open"]
    assert other.claim(target)
    assert not one.claim(target)  # the other one probes it
    other.cool(target, 0.1)  # the probe failed
    assert one.states(model, ids) == ["cooling"]
    time.sleep(0.15)
    assert one.claim(target)
    one.healthy(target)
    assert other.states(model, ids) == one.states(model, ids) == ["ok"]


def test_a_line_refused_for_a_slot_takes_no_ticket(client: redis.Redis) -> None:
    """Waiting on a full deployment's slots does not push the rate's waiting line
    back: once a slot frees, a line's turn is as near as the rate allows."""
    capacity, target = Capacity(client, 60), _target(per_minute=600, at_once=2)
    slots = [capacity.take(target, 1, interactive=True) for _ in range(2)]
    assert all(slot.call_id for slot in slots)
    booked = [capacity.book(target, 1) for _ in range(20)]
    assert all(b.slots for b in booked)
    assert [b.wait for b in booked] == [BUSY_WAIT_SECONDS] * 20
    for slot in slots:
        capacity.give_back(target, slot)
    assert capacity.book(target, 1).wait <= 0.1
