"""Following a run has no limit: playbooks/follow.yml drives 1,000+ polls of one run in one play, and neither the
time per poll nor the controller's memory grows. The run is a fast synthetic one under the real supervisor
(roles/launch/files/dsfleet_node.py); the plan is the real planner's, so every command is the plan's."""
import datetime
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import textwrap
import uuid

import ansible_runner

from dsfleet_core import plan as P
from helpers import ROOT, RUNS

POLLS = 1000
SYNTHETIC = textwrap.dedent("""
    import json, os, sys, time
    out, stop = sys.argv[1], sys.argv[2]
    os.makedirs(out + "/heartbeat", exist_ok=True)
    metrics = open(out + "/metrics.jsonl", "a")
    def write(event, **fields):
        metrics.write(json.dumps(dict(event=event, time=time.time(), **fields)) + "\\n"); metrics.flush()
    t0, step, total = time.time(), 0, 10 ** 9
    write("start", total_steps=total, start_step=0)
    while not os.path.exists(stop):
        step += 1
        os.utime(out + "/heartbeat", None)
        open(out + "/heartbeat/rank-0", "a").close(); os.utime(out + "/heartbeat/rank-0", None)
        with open(out + "/progress.tmp", "w") as f:
            json.dump({"event": "step", "step": step, "total": total, "start_step": 0, "loss": 1.0 + 1.0 / step,
                       "tokens_per_s": 1000.0, "elapsed_s": time.time() - t0, "time": time.time()}, f)
        os.replace(out + "/progress.tmp", out + "/progress.json")
        if step % 50 == 0:
            write("step", step=step, loss=1.0 + 1.0 / step, tokens_per_s=1000.0, elapsed_s=time.time() - t0)
        time.sleep(0.02)
    write("end", steps=step, first_loss=2.0, final_loss=1.0 + 1.0 / step, tokens_per_s=1000.0,
          checkpoint_dir=out + "/checkpoint", export_dir=out + "/export", elapsed_s=time.time() - t0)
""")


def _rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _cpu_s(pid):
    """CPU seconds of the playbook process and of its workers (a retried task's polls run in one worker, which
    waits for each poll's module process): the cost of polling, whatever else this shared machine runs."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(entry):
        with open("/proc/%s/stat" % entry) as f:
            return f.read().rsplit(")", 1)[1].split()   # fields from the state on: ppid at 1, utime at 11

    total = sum(int(x) for x in fields(pid)[11:13])
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                mine = fields(entry)
            except OSError:
                continue
            if int(mine[1]) == pid:
                total += sum(int(x) for x in mine[11:15])
    return total / tick


def _playbook_pid(marker):
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = pathlib.Path("/proc/%s/cmdline" % entry).read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ansible-playbook" in cmdline and marker.encode() in cmdline:
                return int(entry)
    return None


def test_follow_a_thousand_polls_at_constant_cost(tmp_path):
    run_id = "follow-%s" % uuid.uuid4().hex[:6]
    home = tmp_path / "home"
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "bin" / "python").symlink_to(sys.executable)
    (home / "code").mkdir()
    shutil.copy(ROOT / "roles" / "launch" / "files" / "dsfleet_node.py", home / "code" / "dsfleet_node.py")
    record = {"name": "localhost", "address": "localhost", "local": True, "reachable": True, "home": str(home),
              "venv": str(home / "venv"), "interfaces": [{"name": "lo", "ipv4": ["127.0.0.1/8"]}],
              "gpu": {"accelerator": "cpu", "gpus": [], "cpu": {"cores": 2, "memory_mib": 4096, "bf16": False}}}
    plan = P.make_plan([record], {"run_id": run_id, "cpu_ranks": 1, "poll_interval": 0, "stall_timeout": 60})
    (RUNS / run_id).mkdir(parents=True)
    (RUNS / run_id / "plan.json").write_text(json.dumps(plan))
    me = plan["hosts"][0]
    out = pathlib.Path(me["paths"]["out"])
    out.mkdir(parents=True)
    stop = tmp_path / "stop"
    (tmp_path / "synthetic.py").write_text(SYNTHETIC)
    start = me["commands"]["start"]["argv"]
    supervisor = start[:start.index("--") + 1]  # the plan's supervisor, around a synthetic rank
    import subprocess
    started = subprocess.run(supervisor + [sys.executable, str(tmp_path / "synthetic.py"), str(out), str(stop)],
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0 and json.loads(started.stdout)["pid"], started.stderr

    polls, samples, cpu = [], {}, {}
    private = tempfile.mkdtemp(prefix="dsfleet-follow-")

    def on_event(event):
        if event.get("event") == "runner_retry" and event["event_data"].get("host") == "localhost":
            polls.append(datetime.datetime.fromisoformat(event["created"]).timestamp())
            if len(polls) in (20, 100, 120, POLLS - 100, POLLS):
                pid = _playbook_pid(private)
                cpu[len(polls)] = _cpu_s(pid) if pid else None
                samples[len(polls)] = _rss_kib(pid) if pid else None
            if len(polls) == POLLS:
                stop.write_text("enough")
        return True

    env = {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_CALLBACK_PLUGINS": str(ROOT / "callback_plugins"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    try:
        runner = ansible_runner.run(private_data_dir=private, project_dir=str(ROOT),
                                    playbook=str(ROOT / "playbooks" / "follow.yml"),
                                    inventory=str(ROOT / "inventory" / "localhost.yml"), extravars={"run_id": run_id},
                                    envvars=env, quiet=True, timeout=1800, event_handler=on_event,
                                    settings={"suppress_env_files": True})
        stdout = runner.stdout.read()
    finally:
        stop.write_text("enough")
        subprocess.run(me["commands"]["stop"]["argv"], capture_output=True, timeout=60)
        shutil.rmtree(private, ignore_errors=True)
    assert runner.rc == 0, stdout[-4000:]
    assert len(polls) >= POLLS
    # one progress line per poll, from the master's status
    assert stdout.count("[localhost] step ") >= POLLS - 5
    # the cost of a poll does not grow with the number of polls: the controller's CPU seconds per poll, polls 20-120
    # against the last 100 (the suite runs its cluster tier beside this one: wall time swings with that load)
    assert all(cpu.get(n) is not None for n in (20, 120, POLLS - 100, POLLS)), cpu
    cpu_early, cpu_late = (cpu[120] - cpu[20]) / 100, (cpu[POLLS] - cpu[POLLS - 100]) / 100
    assert 0 < cpu_late < cpu_early * 1.5 + 0.005, (cpu_early, cpu_late)
    # and the time between polls (medians) stays of the same order
    gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
    early, late = statistics.median(gaps[20:120]), statistics.median(gaps[-100:])
    assert late < early * 3 + 0.1, (early, late)
    # nor does the controller's memory
    assert samples[100] and samples[POLLS], samples
    assert samples[POLLS] - samples[100] < 30 * 1024, samples
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert summary["steps"] > 0 and summary["run_id"] == run_id
    print("polls %d, median gap %.3fs -> %.3fs, controller CPU per poll %.4fs -> %.4fs, RSS %d -> %d KiB" % (
        len(polls), early, late, cpu_early, cpu_late, samples[100], samples[POLLS]))
