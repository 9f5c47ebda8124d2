"""The per-host supervisor (roles/launch/files/dsfleet_node.py, stdlib only) with real processes: it outlives the
caller, reports progress, and stops a run whose ranks stall or never start, saying why."""
import base64
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

import dsfleet_ckpt as K

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
    found = node("checkpoints", "--run-dir", run_dir)
    assert found["complete"] == [10, 20] and found["universal"] == [] and found["replicas"] == {}
    st = node("status", "--run-dir", run_dir, "--devices", "cpu")
    assert st["state"] == "missing" and st["devices"][0]["memory_total_mib"] > 0


def test_a_tag_travels_by_pack_and_receive_whole_or_not_at_all(run_dir, tmp_path):
    """The gather's two ends with real pipes (ssh carries the same stream between hosts): pack sends the files of
    the ranks asked for plus the shared ones; receive unpacks into a folder that appears only when complete, and
    keeps the newest K replicas."""
    tag = run_dir / "out" / "checkpoint" / "global_step7"
    tag.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        (tag / name).write_bytes(name.encode() * 100)
    (tag / ".dsfleet-complete").write_text(json.dumps({"tag": "global_step7", "world_size": 2, "ranks": [0, 1]}))
    other = tmp_path / "other"
    packed = subprocess.run([sys.executable, str(NODE), "pack", "--run-dir", str(run_dir), "--step", "7",
                             "--ranks", "1"], capture_output=True, check=True).stdout
    # what replicate streams: the tag's files, the marker last
    source = tmp_path / "source"
    source.mkdir()
    (source / ".dsfleet-complete").write_text(json.dumps({"tag": "x", "world_size": 2, "ranks": [1]}))
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r|") as tar:
        tar.extractall(source / "x", filter="data")
    names = [p.name for p in (source / "x" / "pack").iterdir()]
    for name in names:
        (source / "x" / "pack" / name).rename(source / name)
    stream = io.BytesIO()
    K.write_tar(stream, str(source), sorted(names) + [".dsfleet-complete"], "t")
    for step in (3, 5, 7):
        got = subprocess.run([sys.executable, str(NODE), "receive", "--run-dir", str(other), "--dest",
                              "checkpoint-replicas/h1", "--name", "global_step%d" % step, "--keep", "2"],
                             input=stream.getvalue(), capture_output=True)
        assert got.returncode == 0, got.stderr
    held = other / "out" / "checkpoint-replicas" / "h1"
    assert sorted(p.name for p in held.iterdir()) == ["global_step5", "global_step7"]
    assert sorted(p.name for p in (held / "global_step7").iterdir()) == [
        ".dsfleet-complete", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
    assert node("checkpoints", "--run-dir", other)["replicas"] == {"h1": {"5": {"tag": "x", "world_size": 2, "ranks": [1]},
                                                                         "7": {"tag": "x", "world_size": 2, "ranks": [1]}}}
    # a stream cut short leaves no folder that looks complete, and a path out of the run is refused
    cut = subprocess.run([sys.executable, str(NODE), "receive", "--run-dir", str(other), "--dest", "checkpoint",
                          "--name", "global_step9"], input=packed[:len(packed) // 2], capture_output=True)
    assert cut.returncode != 0 and not (other / "out" / "checkpoint" / "global_step9").exists()
    bad = subprocess.run([sys.executable, str(NODE), "receive", "--run-dir", str(other), "--dest", "../../etc",
                          "--name", "x"], input=packed, capture_output=True, text=False)
    assert bad.returncode == 2 and b"refusing destination" in bad.stderr


def test_stage_unpacks_the_bundle_and_runs_every_check_in_one_call(tmp_path):
    """The plan's commands.stage on a host: the bundle (action_plugins/dsfleet_bundle.py) comes on stdin and is
    unpacked into the dsfleet home, then preflight, port and checkpoints come back as one JSON object."""
    sys.path.insert(0, str(ROOT / "action_plugins"))
    import dsfleet_bundle

    from dsfleet_core import plan as P

    run_files = tmp_path / "controller-run"
    run_files.mkdir()
    for name in ("plan.json", "hostfile", "ds_config.json", ".deepspeed_env", "replicas.json"):
        (run_files / name).write_text("{}\n")
    home = tmp_path / "home"
    home.mkdir()
    venv = sys.executable.rsplit("/bin/", 1)[0]
    record = {"name": "localhost", "address": "127.0.0.1", "local": True, "reachable": True, "home": str(home),
              "venv": venv, "path": "/usr/bin:/bin",
              "gpu": {"accelerator": "cpu", "gpus": [], "cpu": {"model": "x", "cores": 2, "memory_mib": 4096,
                                                                 "bf16": False}},
              "interfaces": [{"name": "lo", "ipv4": ["127.0.0.1/8"]}]}
    plan = P.make_plan([record], {"run_id": "r1", "resume": "r1", "master_port": 29999})
    me = plan["hosts"][0]
    paths, argv = me["paths"], list(me["commands"]["stage"]["argv"])
    bundle = tmp_path / "bundle.tar.gz"
    dsfleet_bundle.bundle(str(bundle), "r1", str(run_files), str(ROOT / "train"), str(NODE),
                          ["plan.json", "hostfile", "ds_config.json", ".deepspeed_env", "replicas.json"])
    # the plan's own command, with a stand-in preflight (the real one is the e2e tier's)
    preflight = {"argv": [sys.executable, "-c", "import json; print(json.dumps({'ok': True}))"], "env": {"X": "1"},
                 "cwd": paths["run_dir"]}
    argv[argv.index("--preflight") + 1] = json.dumps(preflight)
    assert argv[0] == paths["python"] and "--port" in argv and "--checkpoints" in argv
    # the bundle comes on stdin, base64, as the stage task hands it over
    got = subprocess.run(argv, input=base64.b64encode(bundle.read_bytes()).decode() + "\n", capture_output=True,
                         text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    result = json.loads(got.stdout)
    assert result["preflight"] == {"rc": 0, "result": {"ok": True}, "error": ""}
    assert result["checkpoints"]["complete"] == [] and result["port"]["port"] == 29999
    assert os.path.isfile(paths["train"]) and os.path.isfile(paths["node"]) and os.path.isdir(paths["out"])
    assert sorted(os.listdir(paths["run_dir"])) == [".deepspeed_env", "ds_config.json", "hostfile", "out", "plan.json",
                                                    "replicas.json"]
    # a failing preflight's error line comes back, the call itself still succeeds
    bad = dict(preflight, argv=[sys.executable, "-c",
                                "import sys; sys.stderr.write('noise\\ndsfleet-train: error: no model. Fix it\\n'); sys.exit(2)"])
    got = node("stage", "--run-dir", paths["run_dir"], "--preflight", json.dumps(bad))
    assert got["preflight"]["rc"] == 2 and got["preflight"]["error"] == "dsfleet-train: error: no model. Fix it"
    assert got["port"] is None and got["checkpoints"] is None


def _load_node_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dsfleet_node_under_test", NODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HOLD = textwrap.dedent("""
    import mmap, os, sys, time
    seg, lock = sys.argv[1], sys.argv[2]
    f = open(seg, "r+b"); m = mmap.mmap(f.fileno(), 4096); f.close()   # mapped only, as a rank holds its own
    fd = os.open(lock, os.O_RDONLY)                                      # open, as torch's FileBaton holds it
    print("holding", flush=True); time.sleep(60)
""")


def test_tidy_removes_only_what_no_process_holds(tmp_path):
    """DeepSpeed never unlinks its CPU all-reduce segments and a killed op build leaves torch's lock: tidy removes
    those, and never a segment a live rank maps, a lock a live build holds, a fresh lock, or anything else."""
    node_mod = _load_node_module()
    shm, ext = tmp_path / "shm", tmp_path / "ext"
    shm.mkdir()
    uid = os.getuid()
    names = {k: shm / ("deepspeed_allreduce_buffer_%d_127.0.0.1_%d_0" % (uid, port))
             for k, port in (("stale", 29500), ("live", 29501))}
    for path in names.values():
        path.write_bytes(b"\0" * 2**20)
    other = shm / "someone_elses_segment"
    other.write_bytes(b"x")
    locks = {}
    for op in ("deepspeed_shm_comm", "cpu_adam", "fused_adam"):
        (ext / op).mkdir(parents=True)
        locks[op] = ext / op / "lock"
        locks[op].write_bytes(b"")
    old = time.time() - 120
    for op in ("deepspeed_shm_comm", "cpu_adam"):
        os.utime(locks[op], (old, old))          # fused_adam's lock is seconds old: a build may be starting
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(names["live"]), str(locks["cpu_adam"])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        done = node_mod.tidy(shm_dir=str(shm), extension_dirs=[str(ext)])
        assert done["segments"] == [str(names["stale"])] and done["freed_mib"] == 1.0
        assert done["locks"] == [str(locks["deepspeed_shm_comm"])]
        assert names["live"].exists() and other.exists()
        assert locks["cpu_adam"].exists() and locks["fused_adam"].exists()
        note = node_mod._tidy_note(done)
        assert "1 shared-memory segment(s)" in note and "deepspeed_shm_comm/lock" in note
    finally:
        holder.kill()
        holder.wait()
    done = node_mod.tidy(shm_dir=str(shm), extension_dirs=[str(ext)])   # the holder is gone: its files too
    assert done["segments"] == [str(names["live"])] and done["locks"] == [str(locks["cpu_adam"])]
    assert node_mod.tidy(shm_dir=str(shm), extension_dirs=[str(ext)]) == {"segments": [], "freed_mib": 0.0,
                                                                          "locks": []}
    assert node_mod._tidy_note({"segments": [], "freed_mib": 0.0, "locks": []}) is None


# squeue -h --me --states=all --name N -o '%i|%T|%r|%N' and scontrol show job ID -o as slurm-wlm 22.05.8 printed
# them on the rig (tests/rig/slurm.py); the fake tools print what the test puts in their files
FAKE_SLURM_TOOL = "#!/bin/sh\ncat \"$(dirname \"$0\")/$(basename \"$0\").out\"\n"


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    tools = tmp_path / "slurm-bin"
    tools.mkdir()
    for name in ("squeue", "scontrol"):
        (tools / name).write_text(FAKE_SLURM_TOOL)
        (tools / name).chmod(0o755)
        (tools / (name + ".out")).write_text("")
    monkeypatch.setenv("PATH", "%s:%s" % (tools, os.environ["PATH"]))

    def say(squeue, scontrol=""):
        (tools / "squeue.out").write_text(squeue)
        (tools / "scontrol.out").write_text(scontrol)
    return say


def test_status_of_a_slurm_run_waits_for_the_job_and_says_how_it_ended(run_dir, fake_slurm):
    job = ["--slurm-job", "dsfleet-r"]
    fake_slurm("7|PENDING|Resources|\n")
    st = node("status", "--run-dir", run_dir, *job)
    assert st["state"] == "queued" and st["slurm"]["id"] == 7 and st["slurm"]["reason"] == "Resources"
    fake_slurm("")
    st = node("status", "--run-dir", run_dir, *job)
    assert st["state"] == "missing" and st["reason"].startswith("no SLURM job named dsfleet-r is queued or known")
    # an earlier attempt of the same run id is still listed: the newest job counts
    fake_slurm("6|COMPLETED|None|h[1-3]\n9|CANCELLED|None|h[1-3]\n",
               "JobId=9 JobName=dsfleet-r UserId=root(0) JobState=CANCELLED Reason=None Dependency=(null) "
               "Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15 NodeList=h[1-3] BatchHost=h1\n")
    st = node("status", "--run-dir", run_dir, *job)
    assert (st["state"], st["rc"]) == ("exited", 143)
    assert st["reason"] == "SLURM job 9 CANCELLED before this host's ranks started"
    # a heterogeneous job: one line per component (ID+N); the job is still coming while a component is
    fake_slurm("12+0|PENDING|None|\n12+1|PENDING|Resources|\n")
    st = node("status", "--run-dir", run_dir, *job)
    assert (st["state"], st["slurm"]["id"], st["slurm"]["reason"]) == ("queued", 12, "Resources")
    fake_slurm("12+0|RUNNING|None|h1\n12+1|RUNNING|None|h[2-3]\n")
    st = node("status", "--run-dir", run_dir, *job)
    assert (st["state"], st["slurm"]["nodes"]) == ("queued", "h1,h[2-3]")
    fake_slurm("12+0|CANCELLED|None|h1\n12+1|COMPLETED|None|h[2-3]\n",
               "JobId=12 HetJobId=12 HetJobOffset=0 JobState=CANCELLED Reason=None ExitCode=0:15 NodeList=h1\n"
               "JobId=13 HetJobId=12 HetJobOffset=1 JobState=COMPLETED Reason=None ExitCode=0:0 NodeList=h[2-3]\n")
    st = node("status", "--run-dir", run_dir, *job)
    assert (st["state"], st["rc"], st["slurm"]["nodes"]) == ("exited", 143, "h1,h[2-3]")
    assert st["reason"] == "SLURM job 12 CANCELLED before this host's ranks started"


def test_a_foreground_supervisor_passes_slurms_sigterm_to_the_ranks_and_exits_with_their_code(run_dir,
                                                                                                fake_slurm):
    script = run_dir / "fake_rank.py"
    script.write_text(FAKE_RANK)
    proc = subprocess.Popen([sys.executable, str(NODE), "start", "--run-dir", str(run_dir), "--foreground",
                             "--stall-timeout", "60", "--", sys.executable, str(script), str(run_dir / "out"), "3",
                             "hang"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = proc.stdout.readline()
        state = json.loads((run_dir / "node.json").read_text())
        assert state["foreground"] and state["supervisor"] == proc.pid
        assert said == "dsfleet_node: %s: started %s (pid %d); its output: %s/node.log\n" % (
            os.uname().nodename, os.path.basename(sys.executable), state["pid"], run_dir)
        fake_slurm("7|RUNNING|None|h1\n")
        assert node("status", "--run-dir", run_dir, "--slurm-job", "dsfleet-r")["state"] == "running"
        time.sleep(0.5)
        proc.send_signal(15)          # what scancel sends every process of the step
        assert proc.wait(timeout=20) == 128 + 15      # the rank died of the SIGTERM passed on to it
    finally:
        if proc.poll() is None:
            proc.kill()
    assert node("ps", "--run-dir", run_dir)["pids"] == []
    fake_slurm("7|CANCELLED|None|h1\n", "JobId=7 JobState=CANCELLED Reason=None ExitCode=0:15 NodeList=h1\n")
    st = node("status", "--run-dir", run_dir, "--slurm-job", "dsfleet-r")
    assert (st["state"], st["rc"]) == ("exited", -15)
    assert st["reason"] == ("SLURM job 7 CANCELLED: the supervisor got SIGTERM (the job was cancelled, or reached its "
                            "time limit)")


def test_a_foreground_supervisor_stopped_by_stop_yml_exits_0_so_slurm_records_the_job_completed(run_dir):
    script = run_dir / "fake_rank.py"
    script.write_text(FAKE_RANK)
    proc = subprocess.Popen([sys.executable, str(NODE), "start", "--run-dir", str(run_dir), "--foreground", "--",
                             sys.executable, str(script), str(run_dir / "out"), "2", "hang"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()
        stopped = node("stop", "--run-dir", run_dir, "--grace", "2")
        assert stopped["terminated"] and stopped["left"] == []
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    st = node("status", "--run-dir", run_dir)
    assert (st["state"], st["reason"]) == ("exited", "stopped on request") and st["rc"] != 0
