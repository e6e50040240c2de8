"""machines.json parsing and the health bookkeeping of nodes: pure functions, tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dispatcher.fleet import (
    ConfigError,
    Fleet,
    Health,
    MachineConfig,
    NodeMode,
    NodeRuntime,
    ejection_cooldown,
    parse_machines,
    probe_result,
)

GOOD = {
    "machines": [
        {"name": "a", "host": "10.0.0.1", "port": 8000, "max_concurrent": 2, "enabled": True},
        {"name": "b", "host": "h", "port": 8001},
    ]
}


def test_parse_the_seed_schema() -> None:
    machines = parse_machines(json.dumps(GOOD))
    assert [m.name for m in machines] == ["a", "b"]
    assert machines[0].base_url == "http://10.0.0.1:8000"
    assert machines[1].max_concurrent == 1 and machines[1].enabled


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"machines": {}}', "machines: Input should be a valid list"),
        ('{"machines": [{"name": "a", "host": "h"}]}', "machines.0.port: Field required"),
        ('{"machines": [{"name": "a", "host": "h", "port": 70000}]}', "machines.0.port"),
        (
            '{"machines": [{"name": "a", "host": "h", "port": 1, "max_concurrent": 0}]}',
            "machines.0.max_concurrent",
        ),
        (
            '{"machines": [{"name": "a", "host": "h", "port": 1},'
            ' {"name": "a", "host": "g", "port": 2}]}',
            "repeated: a",
        ),
        (
            '{"machines": [{"name": "a", "host": "h", "port": 1, "scheme": "ftp"}]}',
            "scheme must be http or https",
        ),
    ],
)
def test_bad_files_say_what_to_fix(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_machines(text)


def test_a_broken_file_keeps_the_last_good_fleet(tmp_path: Path) -> None:
    path = tmp_path / "machines.json"
    path.write_text(json.dumps(GOOD))
    fleet = Fleet(clock=lambda: 100.0)
    assert fleet.load_file(path)
    path.write_text('{"machines": [')
    assert not fleet.load_file(path)
    assert sorted(fleet.nodes) == ["a", "b"]
    assert (
        "not valid JSON" in fleet.config_error
        and "keeping the last good fleet" in fleet.config_error
    )


def test_removed_nodes_drain_and_disabled_nodes_take_nothing() -> None:
    fleet = Fleet(clock=lambda: 100.0)
    fleet.apply(parse_machines(json.dumps(GOOD)))
    fleet.nodes["a"].speed = 0.5  # learned; must survive a reload
    fleet.apply([MachineConfig(name="a", host="10.0.0.1", port=8000, enabled=False)])
    assert fleet.nodes["a"].mode is NodeMode.DISABLED and fleet.nodes["a"].speed == 0.5
    assert fleet.nodes["b"].mode is NodeMode.DRAINING
    assert not fleet.nodes["b"].accepting(100.0)
    fleet.forget_drained({"task-1": "b"})
    assert "b" in fleet.nodes  # still running something
    fleet.forget_drained({})
    assert "b" not in fleet.nodes


def _node(health: Health, failures: int = 0, successes: int = 0) -> NodeRuntime:
    node = NodeRuntime(MachineConfig(name="n", host="h", port=1))
    node.health, node.probe_failures, node.probe_successes = health, failures, successes
    return node


@pytest.mark.parametrize(
    ("health", "failures", "successes", "ok", "expected"),
    [
        (Health.UNKNOWN, 0, 0, True, Health.HEALTHY),
        (Health.HEALTHY, 0, 3, False, Health.HEALTHY),  # one miss is not a verdict
        (Health.HEALTHY, 1, 0, False, Health.UNHEALTHY),  # the second is
        (Health.UNHEALTHY, 0, 0, True, Health.UNHEALTHY),  # needs 2 successes to return
        (Health.UNHEALTHY, 0, 1, True, Health.HEALTHY),
        (Health.UNKNOWN, 1, 0, False, Health.UNHEALTHY),
    ],
)
def test_probe_thresholds(
    health: Health, failures: int, successes: int, ok: bool, expected: Health
) -> None:
    assert (
        probe_result(_node(health, failures, successes), ok, unhealthy_after=2, healthy_after=2)
        is expected
    )


@pytest.mark.parametrize(("n", "seconds"), [(1, 30), (2, 60), (3, 120), (10, 3600)])
def test_ejection_cooldown_grows(n: int, seconds: float) -> None:
    assert ejection_cooldown(n, 30.0) == seconds
