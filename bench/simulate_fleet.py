"""How close each scheduling policy gets to the best possible makespan, and how good the ETAs are.

A discrete-event simulation in virtual time (nothing sleeps) of a fleet of fake GPU nodes with
different true speeds. The dispatcher side is driven only by ``dispatcher.scheduler``: it calls
``choose_node`` whenever a task arrives or a slot frees (queue head as ``task``, the rest as
``queued_behind``), it knows a node's speed only once ``update_speed`` has learned it from
finished tasks, and it asks ``estimate_etas`` for the ETAs a user would see.

Run: ``python bench/simulate_fleet.py [--seed N] [--tasks N] [--repeat N]`` (``--help`` for
the rest). Figures, not asserts: bench/README.md says what they mean and what they showed.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dispatcher import scheduler  # noqa: E402
from dispatcher.scheduler import (  # noqa: E402
    NodeSnapshot,
    Policy,
    TaskDemand,
    choose_node,
    effective_speeds,
    estimate_etas,
    estimate_remaining,
    update_speed,
)

NOISE = 0.10  # by default a task takes its node's true time for its media, +-10 %
MEDIA_RANGE_S = (5.0, 120.0)


@dataclass(frozen=True)
class FakeNode:
    name: str
    true_speed: float  # processing seconds per media second
    max_concurrent: int


# The "hinted" scenario starts from operator hints this far off: 25 % high, 25 % low, ...
HINT_ERROR = (1.25, 0.75)

FLEET = (
    FakeNode("gpu-1x-a", 1.0, 2),
    FakeNode("gpu-1x-b", 1.0, 1),
    FakeNode("gpu-2x", 0.5, 2),
    FakeNode("gpu-half", 2.0, 1),
)


@dataclass(frozen=True)
class Task:
    id: int
    arrival: float
    media_s: float
    noise: float  # multiplier on the true processing time, drawn once so policies compare fairly


@dataclass
class Running:
    task: Task
    node: int
    started: float


@dataclass
class Outcome:
    makespan: float
    mean_turnaround: float
    submit_errors: list[float]
    periodic_errors: list[float]


# --- workload -------------------------------------------------------------------------------


def capacity(fleet: Sequence[FakeNode]) -> float:
    """Media seconds the fleet processes per second with every slot busy."""
    return sum(n.max_concurrent / n.true_speed for n in fleet)


def make_tasks(rng: random.Random, count: int, mean_gap_s: float, noise: float) -> list[Task]:
    """``count`` tasks; all at t=0 when ``mean_gap_s`` is 0, else Poisson arrivals."""
    tasks, t = [], 0.0
    for i in range(count):
        media = rng.uniform(*MEDIA_RANGE_S)
        tasks.append(Task(i, t, media, rng.uniform(1 - noise, 1 + noise)))
        t += rng.expovariate(1 / mean_gap_s) if mean_gap_s > 0 else 0.0
    return tasks


def lower_bound(tasks: Sequence[Task], fleet: Sequence[FakeNode]) -> float:
    """No schedule ends before all work from any arrival on has run at full capacity."""
    work = [t.media_s * t.noise for t in tasks]
    fastest = min(n.true_speed for n in fleet)
    bounds = [t.arrival + sum(work[i:]) / capacity(fleet) for i, t in enumerate(tasks)]
    bounds += [t.arrival + w * fastest for t, w in zip(tasks, work, strict=True)]
    return max(bounds)


# --- simulation -----------------------------------------------------------------------------


@dataclass
class FleetSim:
    fleet: Sequence[FakeNode]
    tasks: Sequence[Task]
    policy: Policy
    sample_every: float
    now: float = 0.0
    learned: list[float | None] = field(default_factory=list)
    running: list[Running] = field(default_factory=list)
    queue: list[Task] = field(default_factory=list)
    done_at: dict[int, float] = field(default_factory=dict)
    last_choice: str | None = None
    events: list[tuple[float, int, str, object]] = field(default_factory=list)
    seq: Iterator[int] = field(default_factory=itertools.count)  # FIFO among equal times
    submit_etas: dict[int, float] = field(default_factory=dict)
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # at, task, eta

    def run(self) -> Outcome:
        self.learned = self.learned or [None] * len(self.fleet)
        for task in self.tasks:
            self.push(task.arrival, "arrive", task)
        self.push(0.0, "sample", None)
        while len(self.done_at) < len(self.tasks):
            self.step()
        return self.outcome()

    def push(self, at: float, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (at, next(self.seq), kind, payload))

    def step(self) -> None:
        """Apply every event of the next instant, then dispatch and take the ETAs."""
        self.now = self.events[0][0]
        kinds: list[str] = []
        while self.events and self.events[0][0] == self.now:
            _, _, kind, payload = heapq.heappop(self.events)
            kinds.append(kind)
            self.apply(kind, payload)
        if "arrive" in kinds:
            self.record_submit_etas()
        self.dispatch()
        if self.queue and not self.running:
            raise RuntimeError(f"{self.policy}: tasks queued on an idle fleet at t={self.now}")
        if "sample" in kinds:
            self.record_samples()

    def apply(self, kind: str, payload: object) -> None:
        if kind == "arrive":
            assert isinstance(payload, Task)
            self.queue.append(payload)
        elif kind == "finish":
            assert isinstance(payload, Running)
            self.finish(payload)
        elif len(self.done_at) < len(self.tasks):
            self.push(self.now + self.sample_every, "sample", None)

    def finish(self, run: Running) -> None:
        self.running.remove(run)
        self.done_at[run.task.id] = self.now
        observed = (self.now - run.started) / run.task.media_s
        self.learned[run.node] = update_speed(self.learned[run.node], observed)

    def snapshots(self) -> list[NodeSnapshot]:
        """What the dispatcher knows: learned speeds, and remaining times it estimates."""
        bare = [self.snapshot(i, ()) for i in range(len(self.fleet))]
        speeds = effective_speeds(bare)
        return [self.snapshot(i, self.busy_until(i, speeds[i])) for i in range(len(self.fleet))]

    def snapshot(self, i: int, busy_until: tuple[float, ...]) -> NodeSnapshot:
        node = self.fleet[i]
        in_flight = sum(1 for r in self.running if r.node == i)
        return NodeSnapshot(
            node.name, node.max_concurrent, in_flight, True, self.learned[i], busy_until
        )

    def busy_until(self, i: int, speed: float) -> tuple[float, ...]:
        mine = [r for r in self.running if r.node == i]
        return tuple(estimate_remaining(r.task.media_s, speed, self.now - r.started) for r in mine)

    def dispatch(self) -> None:
        while self.queue:
            head, *behind = (TaskDemand(t.media_s) for t in self.queue)
            name = choose_node(self.snapshots(), head, self.policy, self.last_choice, behind)
            if name is None:
                return
            self.start(self.queue.pop(0), name)

    def start(self, task: Task, name: str) -> None:
        i = next(i for i, n in enumerate(self.fleet) if n.name == name)
        run = Running(task, i, self.now)
        self.running.append(run)
        self.last_choice = name
        self.push(self.now + task.media_s * self.fleet[i].true_speed * task.noise, "finish", run)

    def queue_etas(self) -> list[float]:
        demands = [TaskDemand(t.media_s) for t in self.queue]
        return estimate_etas(self.snapshots(), demands, self.policy, self.last_choice)

    def record_submit_etas(self) -> None:
        for task, eta in zip(self.queue, self.queue_etas(), strict=True):
            self.submit_etas.setdefault(task.id, self.now + eta)

    def record_samples(self) -> None:
        """The ETA a status page would show now for every queued task, re-estimated."""
        for task, eta in zip(self.queue, self.queue_etas(), strict=True):
            self.samples.append((self.now, task.id, self.now + eta))

    def outcome(self) -> Outcome:
        by_id = {t.id: t for t in self.tasks}
        submit = [self.error(by_id[i].arrival, i, eta) for i, eta in self.submit_etas.items()]
        periodic = [self.error(at, i, eta) for at, i, eta in self.samples]
        turnaround = [self.done_at[t.id] - t.arrival for t in self.tasks]
        return Outcome(max(self.done_at.values()), statistics.mean(turnaround), submit, periodic)

    def error(self, at: float, task_id: int, eta: float) -> float:
        """Error relative to the time that was actually left when the ETA was given."""
        done = self.done_at[task_id]
        return abs(eta - done) / (done - at)


# --- report ---------------------------------------------------------------------------------

POLICIES = (Policy.SPEED_AWARE, Policy.LEAST_LOADED, Policy.ROUND_ROBIN)
HEADER = (
    f"{'scenario':<9} {'policy':<13} {'makespan':>9} {'bound':>8} {'ratio':>6} "
    f"{'turnaround':>10} {'eta@submit':>10} {'eta@resample':>12}"
)
LEGEND = """\
bound: total work / total capacity (for 'arrivals': the largest arrival + work from then on /
capacity); ratio = makespan / bound (target for speed_aware: <= 1.10). turnaround: mean
seconds from arrival to done. eta@submit: mean absolute % error of estimate_etas taken when
the task arrives ('burst': at t=0, before any speed is learned; 'hinted': the same burst
with machines.json speed hints 25 % off the truth; 'warm': a second burst
starting with the speeds learned in 'burst'); eta@resample: every queued task re-estimated
every SAMPLE s of virtual time (target: < 15 %). With --repeat, every column is the mean
over the seeds."""


@dataclass(frozen=True)
class Figures:
    makespan: float
    bound: float
    ratio: float
    turnaround: float
    eta_submit: float  # mean absolute relative error; nan when nothing was estimated
    eta_resample: float


def figures(result: Outcome, bound: float) -> Figures:
    def mean(errors: Sequence[float]) -> float:
        return statistics.mean(errors) if errors else math.nan

    return Figures(
        result.makespan,
        bound,
        result.makespan / bound,
        result.mean_turnaround,
        mean(result.submit_errors),
        mean(result.periodic_errors),
    )


def average(runs: Sequence[Figures]) -> Figures:
    """Column means; a seed that estimated nothing (nan) does not count."""

    def mean(column: Sequence[float]) -> float:
        known = [v for v in column if not math.isnan(v)]
        return statistics.mean(known) if known else math.nan

    return Figures(*(mean(column) for column in zip(*map(astuple, runs), strict=True)))


def pct(error: float) -> str:
    return "-" if math.isnan(error) else f"{100 * error:.1f} %"


def row(scenario: str, policy: Policy, f: Figures) -> str:
    return (
        f"{scenario:<9} {policy.value:<13} {f.makespan:>9.1f} {f.bound:>8.1f} {f.ratio:>6.3f} "
        f"{f.turnaround:>10.1f} {pct(f.eta_submit):>10} {pct(f.eta_resample):>12}"
    )


def scenarios(seed: int, args: argparse.Namespace) -> list[tuple[str, list[Task]]]:
    mean_media = sum(MEDIA_RANGE_S) / 2
    gap = mean_media / (capacity(FLEET) * args.load)
    return [
        ("burst", make_tasks(random.Random(seed), args.tasks, 0.0, args.noise)),
        ("hinted", make_tasks(random.Random(seed), args.tasks, 0.0, args.noise)),
        ("warm", make_tasks(random.Random(seed + 1), args.tasks, 0.0, args.noise)),
        ("arrivals", make_tasks(random.Random(seed + 2), args.tasks, gap, args.noise)),
    ]


def run_seed(seed: int, args: argparse.Namespace) -> dict[tuple[str, Policy], Figures]:
    """Every scenario under every policy; 'warm' starts from what 'burst' learned."""
    out: dict[tuple[str, Policy], Figures] = {}
    learned: dict[Policy, list[float | None]] = {}
    for name, tasks in scenarios(seed, args):
        for policy in POLICIES:
            sim = FleetSim(FLEET, tasks, policy, args.sample_every)
            sim.learned = list(learned.get(policy, [])) if name == "warm" else []
            if name == "hinted":  # machines.json "speed" hints, each 25 % off the truth
                sim.learned = [n.true_speed * HINT_ERROR[i % 2] for i, n in enumerate(FLEET)]
            out[name, policy] = figures(sim.run(), lower_bound(tasks, FLEET))
            learned[policy] = sim.learned
    return out


def run_all(args: argparse.Namespace) -> None:
    runs = [run_seed(seed, args) for seed in range(args.seed, args.seed + args.repeat)]
    for key in runs[0]:
        print(row(*key, average([run[key] for run in runs])))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1, help="average over seeds seed..")
    parser.add_argument("--load", type=float, default=0.9, help="offered load of 'arrivals'")
    parser.add_argument("--noise", type=float, default=NOISE, help="timing noise, 0.1 = +-10 %%")
    parser.add_argument("--sample-every", type=float, default=60.0, help="virtual seconds")
    parser.add_argument(
        "--wait-ratio",
        type=float,
        default=scheduler.WAIT_RATIO,
        help="experiment: override scheduler.WAIT_RATIO (a huge value = never wait)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    scheduler.WAIT_RATIO = args.wait_ratio
    fleet = ", ".join(f"{n.name} speed {n.true_speed} x{n.max_concurrent}" for n in FLEET)
    print(f"fleet: {fleet}; capacity {capacity(FLEET):.2f} media-s/s")
    low, high = MEDIA_RANGE_S
    print(
        f"seed {args.seed} (x{args.repeat}), {args.tasks} tasks of {low:.0f}-{high:.0f} s media,"
        f" +-{args.noise:.0%} timing noise; 'arrivals' at load {args.load};"
        f" wait ratio {scheduler.WAIT_RATIO}"
    )
    print(HEADER)
    run_all(args)
    print(LEGEND.replace("SAMPLE", f"{args.sample_every:g}"))


if __name__ == "__main__":
    main()
