"""Operating a real run on this machine: launch detached (follow=false), status.yml while it trains, stop.yml
(every rank checkpoints, nothing is left running), then launch.yml -e resume=ID continues exactly: the losses after
the resume equal those of the same run left uninterrupted."""
import json
import subprocess
import time
import uuid

from helpers import RUNS, run_playbook

# 300 steps: the stop lands near step 60-110 (30 + what status and stop take), well before the end on a busy
# machine; the straight reference is the longest part of this test (~1 step/s here beside the cluster tier)
KNOBS = {"max_steps": 300, "block_size": 32, "micro_batch": 2, "log_every": 1, "save_every_minutes": 0,
         "poll_interval": 2, "seed": 77}


def _steps(run_id):
    lines = [json.loads(x) for x in (RUNS / run_id / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m["event"] == "step"}, lines


def _status(plan):
    argv = plan["hosts"][0]["commands"]["status_now"]["argv"]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout)


def test_detach_status_stop_and_resume_exactly(train_python):
    base = uuid.uuid4().hex[:6]
    straight, stopped = "straight-" + base, "stopped-" + base
    result = run_playbook("launch.yml", dict(KNOBS, run_id=straight))
    assert result.rc == 0, result.stdout[-4000:]
    reference, _ = _steps(straight)
    assert len(reference) == 300

    result = run_playbook("launch.yml", dict(KNOBS, run_id=stopped, follow=False))
    assert result.rc == 0, result.stdout[-4000:]
    assert "playbooks/follow.yml -e run_id=%s" % stopped in result.stdout
    plan = json.loads((RUNS / stopped / "plan.json").read_text())
    deadline = time.time() + 600
    while time.time() < deadline:  # the play has ended; the ranks train on
        st = _status(plan)
        if (st.get("progress") or {}).get("step", 0) >= 30:
            break
        assert st["state"] == "running", st
        time.sleep(1)
    assert st["ranks_alive"] == 2

    status = run_playbook("playbooks/status.yml", {"run_id": stopped})
    assert status.rc == 0, status.stdout[-3000:]
    assert "localhost  running  2/2" in status.stdout and "run %s: running — step " % stopped in status.stdout

    stop = run_playbook("playbooks/stop.yml", {"run_id": stopped})
    assert stop.rc == 0, stop.stdout[-3000:]
    assert "run %s: stopped on localhost" % stopped in stop.stdout
    assert "-e resume=%s" % stopped in stop.stdout
    st = _status(plan)
    assert (st["state"], st["ranks_alive"], st["reason"]) == ("exited", 0, "stopped on request")
    ps = subprocess.run(plan["hosts"][0]["commands"]["ps"]["argv"], capture_output=True, text=True, check=True)
    assert json.loads(ps.stdout)["pids"] == []
    _, events = _steps(stopped)
    halt = [e for e in events if e["event"] == "stopped"][-1]
    assert 30 <= halt["step"] < 300, halt

    resumed = run_playbook("launch.yml", {"resume": stopped, "poll_interval": 2})
    assert resumed.rc == 0, resumed.stdout[-4000:]
    assert "resuming from step %d" % halt["step"] in resumed.stdout
    summary = json.loads((RUNS / stopped / "summary.json").read_text())
    assert summary["steps"] == 300
    after = {s: loss for s, loss in _steps(stopped)[0].items() if s > halt["step"]}
    assert sorted(after) == list(range(halt["step"] + 1, 301))
    worst = max(abs(after[s] - reference[s]) / abs(reference[s]) for s in after)
    assert worst < 1e-3, worst


def test_resume_on_another_world_size_goes_through_a_universal_checkpoint(train_python):
    """2 ranks write step 8; resuming on 1 rank gathers the shards, converts them with DeepSpeed's ds_to_universal
    and continues from step 8 at the same global batch (the loss goes on from where it was, not from the first
    loss); a further resume on that 1 rank is exact again."""
    run_id = "world-" + uuid.uuid4().hex[:6]
    knobs = dict(KNOBS, max_steps=8, save_every=4, cpu_ranks=2, micro_batch=2)
    first = run_playbook("launch.yml", dict(knobs, run_id=run_id))
    assert first.rc == 0, first.stdout[-4000:]
    before, _ = _steps(run_id)
    assert json.loads((RUNS / run_id / "started.json").read_text())["world_size"] == 2

    resumed = run_playbook("launch.yml", {"resume": run_id, "max_steps": 12, "cpu_ranks": 1})
    assert resumed.rc == 0, resumed.stdout[-4000:]
    assert "resume: run %s was written by 2 rank(s) on localhost; now 1 rank(s)" % run_id in resumed.stdout
    assert "global batch 4 kept (gradient accumulation 2)" in resumed.stdout
    assert "resuming from step 8, written by 2 rank(s), now 1: gathering on localhost" in resumed.stdout
    after, events = _steps(run_id)
    start = [e for e in events if e["event"] == "start"][-1]
    assert (start["world_size"], start["start_step"], start["grad_accum"]) == (1, 8, 2)
    assert sorted(after) == list(range(1, 13))
    # the loss at step 9 follows step 8's, far below where training started
    assert abs(after[9] - before[8]) < 0.25 * abs(before[1] - before[8]) + 0.05, (before, after)
    plan = json.loads((RUNS / run_id / "plan.json").read_text())
    ckpt = plan["hosts"][0]["paths"]["out"] + "/checkpoint"
    listing = json.loads(subprocess.run(plan["hosts"][0]["commands"]["checkpoints"]["argv"], capture_output=True,
                                        text=True, check=True).stdout)
    assert listing["universal"] == [8] and listing["layouts"]["12"]["world_size"] == 1, (ckpt, listing)

    again = run_playbook("launch.yml", {"resume": run_id, "max_steps": 14, "cpu_ranks": 1})
    assert again.rc == 0, again.stdout[-4000:]
    assert "exact continuation" in again.stdout and "resuming from step 12, complete on every host" in again.stdout
