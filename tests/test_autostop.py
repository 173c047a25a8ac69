"""Autostop (issue 13): the idle rule as a table of cases, the idle clock, the CLI's bad input.

The end to end acceptance (a real `ray up`, `ray submit`, the cluster going down by
itself and paid up) is in tests/test_cluster.py::test_autostop_tears_the_idle_cluster_down.
"""

from __future__ import annotations

import pytest

import ray_on_golem as rog

IDLE = {"jobs": 0, "resources_used": {}, "pending_demand": 0, "sessions": 0}


@pytest.mark.parametrize("report, error, busy", [
    # (what the head reports: its Ray and its open terminal sessions, probe error) -> why busy
    (dict(IDLE, jobs=1, resources_used={"CPU": 1.0}), None, "1 job(s) running"),
    (dict(IDLE, jobs=1), None, "1 job(s) running"),  # a driver that waits, holding no CPU
    (dict(IDLE, sessions=1), None, "1 ray exec/submit/attach session(s) open"),  # e.g. `ray attach`
    (dict(IDLE, pending_demand=3), None, "3 task(s)/actor(s) pending"),
    (dict(IDLE, resources_used={"CPU": 2.0}), None, "tasks or actors running (2 CPU)"),  # detached actor
    (None, "the probe exited with 1: ModuleNotFoundError", "cannot tell whether the head is idle: the probe"),
    (IDLE, None, None),  # idle
])  # fmt: skip
def test_idle_rule(report, error, busy):
    verdict = rog.autostop_busy(report, error)
    if busy is None:
        assert verdict is None
    else:
        assert verdict is not None and verdict.startswith(busy)


def test_idle_clock_warns_then_goes_down_and_work_resets_it():
    autostop = rog.Autostop(idle_minutes=5)  # 300 s; the warning 120 s before
    assert autostop.observe(None, 1000.0) == "idle"
    assert autostop.remaining(1100.0) == 200.0
    assert autostop.observe(None, 1150.0) == "idle"
    assert autostop.observe(None, 1180.0) == "warn"  # 120 s to go: said once
    assert autostop.observe(None, 1200.0) == "idle"
    assert autostop.observe("1 job(s) running", 1250.0) == "busy"  # work arrives: the clock restarts
    assert autostop.remaining(1250.0) is None
    assert autostop.observe(None, 1300.0) == "idle"
    assert autostop.observe(None, 1480.0) == "warn"
    assert autostop.observe(None, 1600.0) == "down"


def test_time_scale_divides_the_times():
    autostop = rog.Autostop(idle_minutes=1, time_scale=6.0)
    assert autostop.idle_s == 10.0
    assert autostop.check_interval_s == pytest.approx(rog.AUTOSTOP_CHECK_INTERVAL_S / 6)
    assert autostop.observe(None, 0.0) == "warn"  # less than the (scaled) warning time left at once
    assert autostop.observe(None, 10.0) == "down"


def test_setting_is_checked_naming_the_field():
    assert rog.autostop_setting(None) is None
    assert rog.autostop_setting({"idle_minutes": 2}) == {"idle_minutes": 2, "down": True}
    with pytest.raises(rog.UsageError, match=r"provider_parameters\.autostop\.idle_minutes: expected a number > 0"):
        rog.autostop_setting({"idle_minutes": -1})
    with pytest.raises(rog.UsageError, match=r"provider_parameters\.autostop\.idle_minuts: unknown key"):
        rog.autostop_setting({"idle_minuts": 1, "idle_minutes": 1})


def test_status_line_shows_setting_and_time_to_go():
    autostop = rog.Autostop(idle_minutes=10)
    autostop.observe("1 job(s) running", 0.0)
    assert rog.format_autostop(autostop.as_dict(0.0)) == (
        "autostop after 10 idle minute(s) (down): busy (1 job(s) running)")
    autostop.observe(None, 100.0)
    assert rog.format_autostop(autostop.as_dict(160.0)) == "autostop after 10 idle minute(s) (down): idle, 9m 0s to go"


@pytest.mark.parametrize("args, phrase", [
    (["autostop", "c1"], "one of the arguments -i/--idle-minutes --cancel is required"),
    (["autostop", "c1", "-i", "0"], "--idle-minutes: expected a number > 0"),
    (["autostop", "c1", "-i", "5", "--cancel"], "not allowed with argument"),
])
def test_autostop_cli_bad_input(run_cli, args, phrase):
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert phrase in proc.stderr


def test_autostop_cli_without_webserver(run_cli):
    proc = run_cli("autostop", "c1", "-i", "5", "--port", "1")
    assert proc.returncode == 1
    assert "no webserver is listening" in proc.stderr
