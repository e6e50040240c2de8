"""Which node gets the next task, and when queued tasks will be done: plain functions.

No clock, no I/O, no randomness: the engine builds a ``NodeSnapshot`` per node from what it
knows now and asks ``choose_node``; the same snapshots feed ``estimate_etas``. Times are
seconds from now; durations are seconds of output media; a node's ``speed`` is processing
seconds per second of media (2.0 = takes twice the media's length, lower is faster).

Policies:

    LEAST_LOADED    lowest in_flight / max_concurrent among nodes with a free slot
    ROUND_ROBIN     the next node with a free slot after the last one chosen
    SPEED_AWARE     the node where the task is expected to finish first; may answer None
                    (keep it queued) when a faster busy node frees soon enough to be worth
                    the wait and the tasks behind it do not need the free slot now

Whatever the policy, a node that is not accepting or has no free slot never gets work.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TypeGuard

DEFAULT_SPEED = 1.0
DEFAULT_MEDIA_SECONDS = 10.0
# Keeping the head queued for a busy node must pay clearly, twice over: the estimates are
# noisy, a GPU left idle is a certain loss, and every task arriving behind a waiting head
# waits too. So the head itself must finish much sooner on the busy node (WAIT_RATIO), and
# the plan of the whole known queue must end sooner too (PLAN_RATIO: a small margin, as
# both plans share all but their tail). bench/simulate_fleet.py chose the values: bursts
# still end on the fast nodes; under steady arrivals mean turnaround stays within ~5 % of
# never waiting.
WAIT_RATIO = 1.5
PLAN_RATIO = 1.05
WAIT_SLACK_S = 1.0
# Tasks behind the head that the look-ahead simulates: enough to see whether a slow free
# node will be needed, and it caps the cost of one decision on a long queue.
LOOKAHEAD_TASKS = 64
MIN_REMAINING_S = 1.0


class Policy(StrEnum):
    SPEED_AWARE = "speed_aware"
    LEAST_LOADED = "least_loaded"
    ROUND_ROBIN = "round_robin"


@dataclass(frozen=True)
class NodeSnapshot:
    name: str
    max_concurrent: int
    in_flight: int  # tasks the dispatcher holds a lease for on this node
    accepting: bool  # enabled, healthy, not draining
    # Processing seconds per second of output media (lower is faster); None until measured.
    speed: float | None = None
    # Estimated seconds until each running task on this node finishes.
    busy_until: tuple[float, ...] = ()

    @property
    def free_slots(self) -> int:
        return max(0, self.max_concurrent - self.in_flight)

    @property
    def load(self) -> float:
        return self.in_flight / self.max_concurrent


@dataclass(frozen=True)
class TaskDemand:
    # Seconds of output media (the audio's duration); None when the probe could not tell.
    media_seconds: float | None = None


# --- filling in what is not known -----------------------------------------------------------


def _usable(value: float | None) -> TypeGuard[float]:
    return value is not None and value > 0 and math.isfinite(value)


def _typical(values: Sequence[float | None], default: float) -> float:
    known = [v for v in values if _usable(v)]
    return statistics.median(known) if known else default


def _with_fallback(values: Sequence[float | None], default: float) -> list[float]:
    """Unknown values become the median of the known ones (``default`` if none is known)."""
    fallback = _typical(values, default)
    return [v if _usable(v) else fallback for v in values]


def effective_speeds(nodes: Sequence[NodeSnapshot]) -> list[float]:
    """Each node's speed; an unmeasured node is assumed typical of the fleet (its median)."""
    return _with_fallback([n.speed for n in nodes], DEFAULT_SPEED)


def effective_durations(tasks: Sequence[TaskDemand]) -> list[float]:
    """Each task's media seconds; an unprobed task is assumed typical of the queue."""
    return _with_fallback([t.media_seconds for t in tasks], DEFAULT_MEDIA_SECONDS)


def _running_ends(node: NodeSnapshot, speed: float, typical_s: float) -> list[float]:
    """When each of the node's ``in_flight`` tasks ends; unreported ones look just started."""
    known = sorted(max(0.0, t) for t in node.busy_until)[: node.in_flight]
    return known + [typical_s * speed] * (node.in_flight - len(known))


def _slot_times(node: NodeSnapshot, speed: float, typical_s: float) -> list[float]:
    """When each of the node's slots can next start a task (0.0 = free now), ascending.

    With more tasks in flight than slots (max_concurrent lowered by a reload) the first
    slot only opens once enough of them have ended, hence the last ``max_concurrent``.
    """
    if not node.accepting or node.max_concurrent <= 0:
        return []
    ends = [0.0] * node.max_concurrent + _running_ends(node, speed, typical_s)
    return sorted(ends)[-node.max_concurrent :]


# --- policies -------------------------------------------------------------------------------


def _open_indices(nodes: Sequence[NodeSnapshot]) -> list[int]:
    return [i for i, n in enumerate(nodes) if n.accepting and n.free_slots > 0]


def least_loaded(nodes: Sequence[NodeSnapshot]) -> str | None:
    """The accepting node with a free slot and the lowest in-flight / max_concurrent.

    Ties go to the node with more free slots, then to the first in fleet order, so the
    choice is deterministic.
    """
    candidates = _open_indices(nodes)
    if not candidates:
        return None
    best = min(candidates, key=lambda i: (nodes[i].load, -nodes[i].free_slots, i))
    return nodes[best].name


def round_robin(nodes: Sequence[NodeSnapshot], last_choice: str | None) -> str | None:
    """The first accepting node with a free slot after ``last_choice`` in fleet order.

    An unknown or missing ``last_choice`` (the node was removed) starts from the top.
    """
    names = [n.name for n in nodes]
    start = names.index(last_choice) + 1 if last_choice in names else 0
    for offset in range(len(nodes)):
        node = nodes[(start + offset) % len(nodes)]
        if node.accepting and node.free_slots > 0:
            return node.name
    return None


def speed_aware(
    nodes: Sequence[NodeSnapshot],
    task: TaskDemand,
    queued_behind: Sequence[TaskDemand] = (),
) -> str | None:
    """The free node where ``task`` finishes first, or None when waiting clearly pays.

    Waiting pays when a busy node would finish the task clearly earlier than any free node
    AND a greedy plan of the whole queue (this task plus ``queued_behind``) ends clearly
    earlier when the free slots stay idle until the next slot frees: with a long queue the
    slow node is needed anyway, so it gets work instead of idling.
    """
    open_nodes = _open_indices(nodes)
    if not open_nodes:
        return None
    speeds = effective_speeds(nodes)
    durations = effective_durations([task, *itertools.islice(queued_behind, LOOKAHEAD_TASKS)])
    typical = statistics.median(durations)
    slots = [_slot_times(n, s, typical) for n, s in zip(nodes, speeds, strict=True)]
    best = min(open_nodes, key=lambda i: _free_rank(nodes, speeds, durations[0], i))
    if _waiting_pays(slots, speeds, durations, best):
        return None
    return nodes[best].name


def _free_rank(
    nodes: Sequence[NodeSnapshot], speeds: Sequence[float], duration: float, i: int
) -> tuple[float, float, int, int]:
    # Finish first; on a tie spread the load, then keep fleet order.
    return (duration * speeds[i], nodes[i].load, -nodes[i].free_slots, i)


def _clearly_later(finish: float, alternative: float, ratio: float) -> bool:
    return finish > alternative * ratio + WAIT_SLACK_S


def _waiting_pays(
    slots: list[list[float]], speeds: Sequence[float], durations: Sequence[float], best: int
) -> bool:
    now_finish = durations[0] * speeds[best]
    soonest = min(h[0] + durations[0] * speeds[i] for i, h in enumerate(slots) if h)
    if not _clearly_later(now_finish, soonest, WAIT_RATIO):
        return False
    use_now = [list(h) for h in slots]
    use_now[best] = sorted(use_now[best][1:] + [now_finish])
    with_start = max(now_finish, _plan_makespan(use_now, speeds, durations[1:]))
    # If we wait, nothing starts before the engine asks again: when the next slot frees.
    next_free = min((t for h in slots for t in h if t > 0), default=0.0)
    idle = [[max(t, next_free) for t in h] for h in slots]
    return _clearly_later(with_start, _plan_makespan(idle, speeds, durations), PLAN_RATIO)


def _plan_makespan(
    slots: list[list[float]], speeds: Sequence[float], durations: Sequence[float]
) -> float:
    """Greedy list scheduling, in queue order, each task where it finishes first: the end.

    ``slots`` holds each node's ascending slot start times and is consumed.
    """
    last = 0.0
    for duration in durations:
        finish, i = min((h[0] + duration * speeds[i], i) for i, h in enumerate(slots) if h)
        heapq.heapreplace(slots[i], finish)
        last = max(last, finish)
    return last


def choose_node(
    nodes: Sequence[NodeSnapshot],
    task: TaskDemand,
    policy: Policy = Policy.SPEED_AWARE,
    last_choice: str | None = None,
    queued_behind: Sequence[TaskDemand] = (),
) -> str | None:
    """The node to start ``task`` (the queue head) on now, or None to keep it queued.

    ``last_choice`` only matters to ROUND_ROBIN, ``queued_behind`` (the rest of the queue,
    in order) only to SPEED_AWARE. Call again whenever a slot frees or a task arrives.
    """
    policy = Policy(policy)
    if policy is Policy.ROUND_ROBIN:
        return round_robin(nodes, last_choice)
    if policy is Policy.SPEED_AWARE:
        return speed_aware(nodes, task, queued_behind)
    return least_loaded(nodes)


# --- estimates ------------------------------------------------------------------------------


def estimate_remaining(
    media_seconds: float | None,
    speed: float | None,
    elapsed_s: float,
    floor_s: float = MIN_REMAINING_S,
) -> float:
    """Seconds a running task still needs: expected total minus elapsed, at least ``floor_s``.

    Once overdue, the overrun so far. Pass the node's effective speed (see
    ``effective_speeds``); None falls back to the defaults.
    """
    media = media_seconds if _usable(media_seconds) else DEFAULT_MEDIA_SECONDS
    expected = media * (speed if _usable(speed) else DEFAULT_SPEED)
    # Past its estimate a task is more likely slow or stuck than about to end: expect it to
    # run on for as long again as it has overrun, so a hung node stops looking "about to
    # free" to the speed-aware policy and the ETAs behind it grow instead of freezing.
    return max(floor_s, abs(expected - elapsed_s))


def update_speed(old: float | None, observed: float, alpha: float = 0.3) -> float | None:
    """Exponentially weighted speed: the first observation is taken as is.

    An observation that cannot be a speed (no time elapsed on a frozen test clock, a nan)
    teaches nothing and leaves ``old`` as it was, rather than raising in the middle of a
    task's completion bookkeeping. None only while nothing usable was ever observed.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if not _usable(observed):
        return old
    if not _usable(old):
        return observed
    return old + alpha * (observed - old)


def observed_speed(processing_s: float, media_seconds: float | None) -> float | None:
    """The speed one finished task shows, or None when it cannot teach anything."""
    if not _usable(media_seconds) or not _usable(processing_s):
        return None
    return processing_s / media_seconds


def estimate_etas(
    nodes: Sequence[NodeSnapshot],
    queued: Sequence[TaskDemand],
    policy: Policy = Policy.SPEED_AWARE,
    last_choice: str | None = None,
) -> list[float]:
    """Seconds from now until each queued task (in queue order) is expected to be done.

    Replays ``choose_node`` over virtual time: running tasks end at their ``busy_until``,
    queued ones start whenever the policy places them. ``math.inf`` for a task that no
    accepting node can ever take.
    """
    policy = Policy(policy)
    demands = [TaskDemand(d) for d in effective_durations(queued)]
    replay = _Replay.of(nodes, demands, last_choice)
    etas = [math.inf] * len(demands)
    head = replay.dispatch(demands, 0, policy, etas)
    while head < len(demands) and replay.advance():
        head = replay.dispatch(demands, head, policy, etas)
    return etas


@dataclass
class _Replay:
    nodes: Sequence[NodeSnapshot]
    speeds: list[float]
    ends: list[list[float]]  # per node, when each running task ends (virtual time)
    last_choice: str | None
    now: float = 0.0

    @classmethod
    def of(
        cls, nodes: Sequence[NodeSnapshot], demands: Sequence[TaskDemand], last: str | None
    ) -> _Replay:
        speeds = effective_speeds(nodes)
        typical = _typical([d.media_seconds for d in demands], DEFAULT_MEDIA_SECONDS)
        ends = [_running_ends(n, s, typical) for n, s in zip(nodes, speeds, strict=True)]
        return cls(nodes, speeds, ends, last)

    def snapshots(self) -> list[NodeSnapshot]:
        return [
            replace(n, in_flight=len(e), busy_until=tuple(t - self.now for t in e))
            for n, e in zip(self.nodes, self.ends, strict=True)
        ]

    def dispatch(
        self, demands: Sequence[TaskDemand], head: int, policy: Policy, etas: list[float]
    ) -> int:
        """Start queued tasks from ``head`` while the policy places them; the new head."""
        while head < len(demands):
            behind = demands[head + 1 : head + 1 + LOOKAHEAD_TASKS]
            name = choose_node(self.snapshots(), demands[head], policy, self.last_choice, behind)
            if name is None:
                break
            etas[head] = self.start(name, demands[head].media_seconds or 0.0)
            head += 1
        return head

    def start(self, name: str, media_seconds: float) -> float:
        i = next(i for i, n in enumerate(self.nodes) if n.name == name)
        end = self.now + media_seconds * self.speeds[i]
        self.ends[i].append(end)
        self.last_choice = name
        return end

    def advance(self) -> bool:
        """Move to the next moment a running task ends; False when nothing is running."""
        pending = [t for e in self.ends for t in e]
        if not pending:
            return False
        self.now = max(self.now, min(pending))
        self.ends = [[t for t in e if t > self.now] for e in self.ends]
        return True
