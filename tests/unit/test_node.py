"""The per-host supervisor (roles/launch/files/dsfleet_node.py, stdlib only) with real processes: it outlives the
caller, reports progress, and stops a run whose ranks stall or never start, saying why."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE = ROOT / "roles" / "launch" / "files" / "dsfleet_node.py"

# a stand-in for a rank: touches its heartbeat and writes progress.json for `steps` steps, then hangs or ends
FAKE_RANK = textwrap.dedent("""
    import json, os, sys, time
    out, steps, then = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.makedirs(out + "/heartbeat", exist_ok=True)
    for step in range(1, steps + 1):
        open(out + "/heartbeat/rank-0", "a").close(); os.utime(out + "/heartbeat/rank-0")
        with open(out + "/progress.json", "w") as f:
            json.dump({"event": "step", "step": step, "total": 100, "start_step": 0, "loss": 1.0 / step,
                       "elapsed_s": step * 0.1, "time": time.time()}, f)
        time.sleep(0.1)
    if then == "hang":
        time.sleep(600)
    print("fake rank done", flush=True)
""")


def node(*args, timeout=60):
    proc = subprocess.run([sys.executable, str(NODE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "out").mkdir()
    yield tmp_path
    node("stop", "--run-dir", tmp_path, "--grace", "1")  # never leave a process behind


def start(run_dir, steps, then, *watch):
    script = run_dir / "fake_rank.py"
    script.write_text(FAKE_RANK)
    return node("start", "--run-dir", run_dir, *watch, "--", sys.executable, script, run_dir / "out", steps, then)


def wait_exit(run_dir, limit=30):
    deadline = time.time() + limit
    while time.time() < deadline:
        st = node("status", "--run-dir", run_dir, "--wait", "1", "--report")
        if st["state"] != "running":
            return st
    raise AssertionError("still running after %ss" % limit)


def test_a_run_that_ends_reports_its_progress_and_rc(run_dir):
    state = start(run_dir, 3, "end", "--stall-timeout", "5")
    assert state["pid"] and state["stall_timeout"] == 5
    st = wait_exit(run_dir)
    assert (st["state"], st["rc"], st["reason"], st["report"]) == ("exited", 0, None, True)
    assert st["progress"]["step"] == 3 and st["dsfleet_status"] == 1
    assert "fake rank done" in st["log_tail"] and "dsfleet_node: started" not in st["log_tail"]


def test_a_stalled_rank_is_stopped_by_its_own_supervisor(run_dir):
    t0 = time.time()
    start(run_dir, 2, "hang", "--stall-timeout", "2", "--grace", "1")
    st = wait_exit(run_dir)
    assert st["state"] == "exited" and st["rc"] != 0
    assert st["reason"].startswith("no progress for") and "stall_timeout=2.0s" in st["reason"]
    assert st["progress"]["step"] == 2 and time.time() - t0 < 15
    assert node("ps", "--run-dir", run_dir)["pids"] == []


def test_no_first_step_within_the_startup_timeout(run_dir):
    start(run_dir, 0, "hang", "--startup-timeout", "2", "--grace", "1")
    st = wait_exit(run_dir)
    assert st["reason"] == "no training step within startup_timeout=2.0s" and st["rc"] != 0


def test_stop_says_it_was_asked_and_leaves_nothing(run_dir):
    start(run_dir, 1, "hang")
    time.sleep(0.5)
    stopped = node("stop", "--run-dir", run_dir, "--grace", "2")
    assert stopped["terminated"] and stopped["left"] == []
    st = node("status", "--run-dir", run_dir)
    assert (st["state"], st["reason"]) == ("exited", "stopped on request")
    assert node("stop", "--run-dir", run_dir, "--grace", "1")["terminated"] == []   # nothing more to stop


def test_a_restart_forgets_the_earlier_attempts_heartbeats(run_dir):
    start(run_dir, 1, "end")
    wait_exit(run_dir)
    beat = run_dir / "out" / "heartbeat" / "rank-0"
    os.utime(beat, (time.time() - 3600, time.time() - 3600))
    start(run_dir, 3, "end", "--stall-timeout", "30")  # an hour-old heartbeat would read as a stall
    st = wait_exit(run_dir)
    assert (st["rc"], st["reason"]) == (0, None)


def test_checkpoints_and_device_readings(run_dir):
    for step, complete in ((10, True), (20, True), (30, False)):
        tag = run_dir / "out" / "checkpoint" / ("global_step%d" % step)
        tag.mkdir(parents=True)
        if complete:
            (tag / ".dsfleet-complete").write_text("x")
    assert node("checkpoints", "--run-dir", run_dir) == {"complete": [10, 20]}
    st = node("status", "--run-dir", run_dir, "--devices", "cpu")
    assert st["state"] == "missing" and st["devices"][0]["memory_total_mib"] > 0
