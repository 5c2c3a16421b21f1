"""Fair share on a device (worker/gpu/turns.py): which jobs each call takes."""

from __future__ import annotations

from worker.gpu.turns import Waiting, fair_order, next_call


def job(
    n: int,
    project: str,
    interactive: bool = True,
    plan: str = "p",
    images: int = 1,
    room: int = 4,
) -> Waiting:
    return Waiting(f"job_{n:04d}", project, interactive, plan, images, room)


def ids(jobs: list[Waiting]) -> list[str]:
    return [j.job_id for j in jobs]


def test_interactive_jobs_go_before_batch_lines_whatever_their_age() -> None:
    lines = [job(i, "a", interactive=False) for i in range(10)]
    single = job(99, "b")
    assert fair_order([*lines, single], {})[0] == single
    assert ids(next_call(fair_order([*lines, single], {}))) == [
        "job_0099",
        "job_0000",
        "job_0001",
        "job_0002",
    ]


def test_projects_take_turns_within_each_kind() -> None:
    a = [job(i, "a", interactive=False) for i in range(4)]
    b = [job(10 + i, "b", interactive=False) for i in range(2)]
    order = fair_order([*a, *b], {})
    assert [j.project_id for j in order] == ["a", "b", "a", "b", "a", "a"]


def test_between_equals_the_project_served_longest_ago_goes_first() -> None:
    a, b = job(1, "a"), job(2, "b")
    assert fair_order([a, b], {"a": 7, "b": 3})[0] == b
    assert fair_order([a, b], {})[0] == a  # never served: by arrival


def test_a_call_takes_companions_of_the_same_plan_up_to_its_room() -> None:
    head = job(1, "a", images=2)
    other_plan = job(2, "b", plan="q")
    too_big = job(3, "c", images=3)
    fits = job(4, "d", images=2)
    late = job(5, "e")
    taken = next_call([head, other_plan, too_big, fits, late])
    # 2 + 2 fill the room of 4: the job of another plan and the one that does not
    # fit wait for a later call (where they may lead) instead of holding it back.
    assert ids(taken) == ["job_0001", "job_0004"]
    rest = [other_plan, too_big, late]
    assert ids(next_call(fair_order(rest, {}))) == ["job_0002"]


def test_a_head_bigger_than_a_call_runs_alone() -> None:
    big = job(1, "a", images=6)
    assert next_call([big, job(2, "a")]) == [big]
    assert next_call([]) == []


def test_a_batch_of_fifty_holds_another_projects_request_back_one_call_at_most() -> None:
    """Project A's 50 lines wait; B's single request arrives: the next call is B's
    (with A's lines as companions), whatever A's age and numbers."""
    waiting = [job(i, "a", interactive=False) for i in range(50)]
    served: dict[str, int] = {"a": 1}
    calls = 0
    while waiting:
        calls += 1
        if calls == 3:
            waiting.append(job(500, "b"))
        taken = next_call(fair_order(waiting, served))
        for j in taken:
            served[j.project_id] = calls
        waiting = [j for j in waiting if j not in taken]
        if calls == 3:
            assert "job_0500" in ids(taken)
            assert len(taken) == 4  # the call still full: A's lines fill it
