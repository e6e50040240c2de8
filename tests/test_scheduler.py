"""Node selection and ETAs: tables of fleets, no clock, no I/O."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.scheduler import (
    DEFAULT_MEDIA_SECONDS,
    NodeSnapshot,
    Policy,
    TaskDemand,
    choose_node,
    effective_durations,
    effective_speeds,
    estimate_etas,
    estimate_remaining,
    least_loaded,
    observed_speed,
    update_speed,
)

SA, LL, RR = Policy.SPEED_AWARE, Policy.LEAST_LOADED, Policy.ROUND_ROBIN


def node(
    name: str,
    cap: int = 1,
    busy: tuple[float, ...] = (),
    speed: float | None = None,
    accepting: bool = True,
    in_flight: int | None = None,
) -> NodeSnapshot:
    """A node running ``len(busy)`` tasks unless ``in_flight`` says otherwise."""
    flying = len(busy) if in_flight is None else in_flight
    return NodeSnapshot(name, cap, flying, accepting, speed, busy)


def tasks(*media: float | None) -> tuple[TaskDemand, ...]:
    return tuple(TaskDemand(m) for m in media)


@dataclass(frozen=True)
class Case:
    id: str
    fleet: tuple[NodeSnapshot, ...]
    expected: dict[Policy, str | None]
    task: float | None = 10.0
    behind: tuple[TaskDemand, ...] = ()
    last: str | None = None


def same(answer: str | None) -> dict[Policy, str | None]:
    return {SA: answer, LL: answer, RR: answer}


FAST_BUSY_SLOW_FREE = (node("fast", busy=(2.0,), speed=1.0), node("slow", speed=4.0))

CASES = [
    # --- every policy ---
    Case("empty fleet", (), same(None)),
    Case("all full", (node("a", busy=(5.0,)), node("b", cap=2, busy=(3.0, 4.0))), same(None)),
    Case(
        "non-accepting skipped even when fastest",
        (node("a", speed=0.5, accepting=False), node("b", speed=1.0)),
        same("b"),
    ),
    Case("all non-accepting", (node("a", accepting=False), node("b", accepting=False)), same(None)),
    Case(
        "more in flight than slots (max_concurrent lowered)",
        (node("a", cap=1, busy=(5.0, 8.0)), node("b", cap=2, busy=(1.0, 2.0, 3.0))),
        same(None),
    ),
    Case("zero slots", (node("a", cap=0), node("b")), same("b")),
    # --- least loaded: ratio, then free slots, then fleet order ---
    Case(
        "lowest ratio wins, not most free slots",
        (node("a", cap=2, busy=(9.0,)), node("b", cap=4, busy=(9.0,))),
        {SA: "b", LL: "b", RR: "a"},
    ),
    Case(
        "lowest ratio beats more free slots",
        (node("a", cap=4, busy=(9.0, 9.0)), node("b", cap=1)),
        {SA: "b", LL: "b", RR: "a"},
    ),
    Case(
        "equal load: more free slots",
        (node("a", cap=1), node("b", cap=2)),
        {SA: "b", LL: "b", RR: "a"},
    ),
    Case("full tie: fleet order", (node("a"), node("b")), same("a")),
    # --- round robin ---
    Case(
        "rr: next after last",
        (node("a"), node("b"), node("c")),
        {SA: "a", LL: "a", RR: "b"},
        last="a",
    ),
    Case("rr: wraps after the last node", (node("a"), node("b"), node("c")), same("a"), last="c"),
    Case(
        "rr: skips full and non-accepting",
        (node("a"), node("b", busy=(1.0,)), node("c", accepting=False), node("d")),
        {SA: "a", LL: "a", RR: "d"},
        last="a",
    ),
    Case(
        "rr: wraps past full nodes to itself",
        (node("a"), node("b", busy=(1.0,)), node("c", busy=(1.0,))),
        same("a"),
        last="a",
    ),
    Case(
        "rr: removed last choice starts at the top", (node("a"), node("b")), same("a"), last="gone"
    ),
    # --- speed aware ---
    Case(
        "sa: fastest free node",
        (node("a", speed=1.0), node("b", speed=0.5), node("c", speed=2.0)),
        {SA: "b", LL: "a", RR: "a"},
    ),
    Case(
        "sa: a free slot on a busy fast node counts",
        (node("a", speed=1.0), node("b", cap=2, busy=(50.0,), speed=0.5)),
        {SA: "b", LL: "a", RR: "a"},
    ),
    Case(
        "sa: last task waits for a fast node about to free rather than a 4x slower one",
        FAST_BUSY_SLOW_FREE,
        {SA: None, LL: "slow", RR: "slow"},
    ),
    Case(
        "sa: still waits with one task behind (the fast node does both first)",
        FAST_BUSY_SLOW_FREE,
        {SA: None, LL: "slow", RR: "slow"},
        behind=tasks(10.0),
    ),
    Case(
        "sa: does not wait when the queue needs the slow node too",
        FAST_BUSY_SLOW_FREE,
        {SA: "slow", LL: "slow", RR: "slow"},
        behind=tasks(*[10.0] * 5),
    ),
    Case(
        "sa: does not wait when the fast node frees late",
        (node("fast", busy=(100.0,), speed=1.0), node("slow", speed=4.0)),
        same("slow"),
    ),
    Case(
        "sa: does not wait for a marginal gain",
        (node("fast", busy=(2.0,), speed=1.0), node("free", speed=1.3)),
        same("free"),
    ),
    Case(
        "sa: does not wait for a node that is not accepting",
        (node("fast", busy=(2.0,), speed=1.0, accepting=False), node("slow", speed=4.0)),
        same("slow"),
    ),
    Case(
        "sa: a short task does not wait",
        (node("fast", busy=(30.0,), speed=1.0), node("slow", speed=2.0)),
        same("slow"),
        task=10.0,
    ),
    Case(
        "sa: a long task waits",
        (node("fast", busy=(30.0,), speed=1.0), node("slow", speed=2.0)),
        {SA: None, LL: "slow", RR: "slow"},
        task=150.0,
    ),
    Case(
        "sa: running task without an estimate is assumed just started",
        (node("fast", in_flight=1, speed=1.0), node("slow", speed=4.0)),
        {SA: None, LL: "slow", RR: "slow"},
    ),
    # --- unknowns ---
    Case(
        "unknown speeds everywhere: like least loaded",
        (node("a", cap=2, busy=(9.0,)), node("b", cap=1)),
        {SA: "b", LL: "b", RR: "a"},
    ),
    Case(
        "unknown speed is the fleet median, not the slowest",
        (
            node("a", busy=(5.0,), speed=0.5),
            node("b"),
            node("c", speed=4.0),
            node("d", busy=(50.0,), speed=1.0),
        ),
        same("b"),
    ),
    Case(
        "unknown duration is the queue median: long, so it waits",
        (
            node("fast1", busy=(30.0,), speed=1.0),
            node("fast2", busy=(30.0,), speed=1.0),
            node("slow", speed=2.0),
        ),
        {SA: None, LL: "slow", RR: "slow"},
        task=None,
        behind=tasks(150.0),
    ),
    Case(
        "unknown durations everywhere: the 10 s default, so it runs now",
        (
            node("fast1", busy=(30.0,), speed=1.0),
            node("fast2", busy=(30.0,), speed=1.0),
            node("slow", speed=2.0),
        ),
        same("slow"),
        task=None,
        behind=tasks(None),
    ),
]


@pytest.mark.parametrize(
    ("case", "policy"),
    [pytest.param(c, p, id=f"{c.id} [{p.value}]") for c in CASES for p in Policy],
)
def test_choose_node(case: Case, policy: Policy) -> None:
    task = TaskDemand(case.task)
    chosen = choose_node(case.fleet, task, policy, case.last, case.behind)
    assert chosen == case.expected[policy]


def test_policy_given_as_plain_string() -> None:
    fleet = (node("a"), node("b"))
    assert choose_node(fleet, TaskDemand(10.0), "round_robin", "a") == "b"  # type: ignore[arg-type]


def test_least_loaded_kept_for_callers() -> None:
    assert least_loaded((node("a", busy=(1.0,)), node("b"))) == "b"


# --- ETAs -----------------------------------------------------------------------------------

TWO_SAME = (node("a", speed=1.0), node("b", speed=1.0))
FAST_AND_SLOW = (node("fast", speed=0.5), node("slow", speed=4.0))


@pytest.mark.parametrize(
    ("fleet", "queued", "policy", "expected"),
    [
        pytest.param(TWO_SAME, tasks(10, 10, 10, 10), SA, [10, 10, 20, 20], id="two equal nodes"),
        pytest.param(TWO_SAME, tasks(10, 10, 10, 10), LL, [10, 10, 20, 20], id="two equal, ll"),
        pytest.param(TWO_SAME, tasks(10, 10, 10, 10), RR, [10, 10, 20, 20], id="two equal, rr"),
        pytest.param(TWO_SAME, (), SA, [], id="empty queue"),
        pytest.param(
            (node("a", busy=(5.0,), speed=1.0),), tasks(10, 10), SA, [15, 25], id="busy node"
        ),
        pytest.param(
            (node("a", cap=1, busy=(5.0, 8.0), speed=1.0),),
            tasks(10),
            SA,
            [18],
            id="over capacity: waits for both",
        ),
        pytest.param(FAST_AND_SLOW, tasks(10, 10, 10), SA, [5, 10, 15], id="sa keeps the fast"),
        pytest.param(FAST_AND_SLOW, tasks(10, 10, 10), LL, [5, 40, 10], id="ll uses the slow"),
        pytest.param(
            (node("a", speed=2.0), node("b", speed=1.0)),
            tasks(None, 30, None),
            LL,
            [60, 30, 60],
            id="unknown durations are the queue median",
        ),
        pytest.param(
            (node("a"), node("b", speed=2.0)),
            tasks(10, 10),
            LL,
            [20, 20],
            id="unknown speed is the known median",
        ),
        pytest.param(
            (node("a", accepting=False, speed=1.0),), tasks(10, 10), SA, [math.inf] * 2, id="none"
        ),
        pytest.param(
            (node("a", busy=(1.0,), accepting=False, speed=0.1), node("b", speed=1.0)),
            tasks(10),
            SA,
            [10],
            id="draining node gets nothing",
        ),
    ],
)
def test_estimate_etas(
    fleet: Sequence[NodeSnapshot],
    queued: Sequence[TaskDemand],
    policy: Policy,
    expected: list[float],
) -> None:
    assert estimate_etas(fleet, queued, policy) == pytest.approx(expected)


def test_estimate_etas_round_robin_continues_after_last_choice() -> None:
    fleet = (node("a", speed=1.0), node("b", speed=2.0))
    assert estimate_etas(fleet, tasks(10), RR, last_choice="a") == [20]


# --- speeds and remaining times -------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "observed", "alpha", "expected"),
    [
        (None, 2.0, 0.3, 2.0),
        (1.0, 2.0, 0.3, 1.3),
        (1.0, 1.0, 0.3, 1.0),
        (1.0, 3.0, 1.0, 3.0),
        (2.0, 1.0, 0.5, 1.5),
    ],
)
def test_update_speed(old: float | None, observed: float, alpha: float, expected: float) -> None:
    assert update_speed(old, observed, alpha) == pytest.approx(expected)


@pytest.mark.parametrize("old", [None, 1.5])
@pytest.mark.parametrize("observed", [0.0, -1.0, math.nan, math.inf])
def test_update_speed_ignores_impossible_observations(old: float | None, observed: float) -> None:
    assert update_speed(old, observed) == old


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_update_speed_refuses_a_bad_alpha(alpha: float) -> None:
    with pytest.raises(ValueError):
        update_speed(1.0, 2.0, alpha)


@pytest.mark.parametrize(
    ("media", "speed", "elapsed", "expected"),
    [
        (60.0, 2.0, 0.0, 120.0),
        (60.0, 2.0, 100.0, 20.0),
        (60.0, 2.0, 119.5, 1.0),  # the floor
        (60.0, 2.0, 150.0, 30.0),  # overdue: as long again as the overrun
        (None, None, 4.0, DEFAULT_MEDIA_SECONDS - 4.0),
        (60.0, None, 0.0, 60.0),
    ],
)
def test_estimate_remaining(
    media: float | None, speed: float | None, elapsed: float, expected: float
) -> None:
    assert estimate_remaining(media, speed, elapsed) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("processing", "media", "expected"),
    [(120.0, 60.0, 2.0), (30.0, None, None), (30.0, 0.0, None), (0.0, 60.0, None)],
)
def test_observed_speed(processing: float, media: float | None, expected: float | None) -> None:
    assert observed_speed(processing, media) == expected


def test_effective_speeds_and_durations() -> None:
    fleet = (node("a", speed=0.5), node("b"), node("c", speed=4.0), node("d", speed=1.0))
    assert effective_speeds(fleet) == [0.5, 1.0, 4.0, 1.0]
    assert effective_speeds((node("a"),)) == [1.0]
    assert effective_durations(tasks(None, 30, 60, None)) == [45, 30, 60, 45]
    assert effective_durations(tasks(None, 0.0)) == [DEFAULT_MEDIA_SECONDS] * 2


# --- properties -----------------------------------------------------------------------------

speeds = st.one_of(st.none(), st.floats(0.2, 5.0))
durations = st.one_of(st.none(), st.floats(1.0, 300.0))


@st.composite
def fleets(draw: st.DrawFn, same_speed: bool = False) -> tuple[NodeSnapshot, ...]:
    count = draw(st.integers(0, 5))
    shared = draw(speeds)
    built = []
    for i in range(count):
        cap = draw(st.integers(0, 3))
        busy = tuple(draw(st.lists(st.floats(0.0, 500.0), max_size=cap + 1)))
        speed = shared if same_speed else draw(speeds)
        built.append(node(f"n{i}", cap, busy, speed, accepting=draw(st.booleans())))
    return tuple(built)


@settings(max_examples=300, deadline=None)
@given(
    fleet=fleets(),
    task=durations,
    behind=st.lists(durations, max_size=8),
    policy=st.sampled_from(Policy),
    last=st.sampled_from([None, "n0", "n2", "gone"]),
)
def test_chosen_node_is_accepting_with_a_free_slot(
    fleet: tuple[NodeSnapshot, ...],
    task: float | None,
    behind: list[float | None],
    policy: Policy,
    last: str | None,
) -> None:
    chosen = choose_node(fleet, TaskDemand(task), policy, last, tasks(*behind))
    usable = [n for n in fleet if n.accepting and n.free_slots > 0]
    if not usable:
        assert chosen is None
    elif policy is not SA:
        assert chosen in {n.name for n in usable}
    else:
        assert chosen is None or chosen in {n.name for n in usable}


@settings(max_examples=200, deadline=None)
@given(fleet=fleets(), queued=st.lists(durations, max_size=10), policy=st.sampled_from(Policy))
def test_etas_are_finite_exactly_when_some_node_can_work(
    fleet: tuple[NodeSnapshot, ...], queued: list[float | None], policy: Policy
) -> None:
    etas = estimate_etas(fleet, tasks(*queued), policy)
    assert len(etas) == len(queued)
    can_work = any(n.accepting and n.max_concurrent > 0 for n in fleet)
    assert all(math.isfinite(e) == can_work for e in etas)
    fastest = min(effective_speeds(fleet), default=1.0)
    for eta, own in zip(etas, effective_durations(tasks(*queued)), strict=True):
        assert eta >= own * fastest - 1e-9


@settings(max_examples=200, deadline=None)
@given(
    fleet=fleets(same_speed=True),
    duration=st.floats(1.0, 300.0),
    count=st.integers(0, 10),
    policy=st.sampled_from(Policy),
)
def test_equal_tasks_on_equal_nodes_finish_in_queue_order(
    fleet: tuple[NodeSnapshot, ...], duration: float, count: int, policy: Policy
) -> None:
    etas = estimate_etas(fleet, tasks(*[duration] * count), policy)
    assert etas == sorted(etas)


def test_queued_behind_may_be_a_deque() -> None:
    behind = deque(tasks(*[10.0] * 5))
    assert choose_node(FAST_BUSY_SLOW_FREE, TaskDemand(10.0), SA, None, behind) == "slow"
