"""Bad input on a real 3-host rig: each failure is reported fast, names the host and the fix, starts nothing
(or stops everything it started).

The hosts are network namespaces with their own sshd (tests/rig/rig.py); setup.yml installs them once from the
controller's wheelhouse, then each test breaks one thing, runs launch.yml through ansible-runner and mends it.
"""

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from dsfleet_ckpt import rank_of_file
from helpers import ROOT, RUNS, run_playbook

sys.path.insert(0, str(ROOT / "tests" / "rig"))
import fake_hub  # noqa: E402
import slurm as slurmmod  # noqa: E402

import rig as rigmod  # noqa: E402

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

WORK = ROOT / "tests" / ".work"
VARS = {
    "python_env_python": "/usr/bin/python3",
    "python_env_wheelhouse": str(WORK / "wheelhouse"),
    "python_env_wheelhouse_build": True,
    "python_env_wheelhouse_python": "/usr/bin/python3",
    "cpu_ranks": 1,
    "poll_interval": 2,
    "extra_env": {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": "/var/tmp/dsfleet-test-torch-extensions"},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("rig")
    rig = rigmod.create(str(state), hosts=3, prefix="dsfft", subnet="10.177.60.0/24")
    try:
        result = run_playbook("setup.yml", VARS, inventory=rig.inventory)
        assert result.rc == 0, result.stdout[-5000:]
        again = run_playbook("setup.yml", VARS, inventory=rig.inventory)      # idempotent: nothing to change
        assert again.rc == 0 and again.changed == 0, (again.stats, again.stdout[-3000:])
        yield rig
    finally:
        rigmod.destroy(str(state))
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("dsfft") == 0


def launch(rig, tmp_path, **knobs):
    """launch.yml on the rig with a fresh ssh control dir (no connection reused from an earlier test)."""
    run_id = "rig-%s" % uuid.uuid4().hex[:6]
    env = {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp")}
    start = time.monotonic()
    result = run_playbook("launch.yml", dict(VARS, run_id=run_id, **knobs), inventory=rig.inventory, envvars=env)
    return result, run_id, time.monotonic() - start


def home(rig, host):
    return pathlib.Path(rig.host_dir(host, "root"))


def training_pids(rig, host):
    """PIDs in the host's namespace whose command line runs the training module."""
    pids = []
    for pid in rigmod.netns_pids(rig.host(host)["netns"]):
        try:
            cmdline = pathlib.Path("/proc/%d/cmdline" % pid).read_bytes()
        except OSError:
            continue
        if b"train.py" in cmdline or b"deepspeed" in cmdline:
            pids.append(pid)
    return pids


def test_worker_missing_python_env(cluster, tmp_path):
    venv = home(cluster, "h3") / ".dsfleet" / "venv"
    venv.rename(venv.with_name("venv.away"))
    try:
        result, run_id, took = launch(cluster, tmp_path)
    finally:
        venv.with_name("venv.away").rename(venv)
    assert result.rc != 0
    assert any("h3 has no dsfleet python environment" in f and "setup.yml" in f for f in result.failures), \
        result.failures
    assert took < 90
    assert not (RUNS / run_id / "logs").exists()
    assert all(training_pids(cluster, h) == [] for h in cluster.names)


def test_master_port_taken(cluster, tmp_path):
    port = 29544
    holder = subprocess.Popen(["ip", "netns", "exec", cluster.host("h1")["netns"], sys.executable, "-c",
                               "import socket, time; s = socket.socket(); s.bind(('', %d)); s.listen(1); "
                               "time.sleep(300)" % port])
    try:
        time.sleep(1)
        result, run_id, took = launch(cluster, tmp_path, master_port=port)
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=10)
    assert result.rc != 0
    assert any("port %d is already in use on master h1" % port in f and "-e master_port" in f
               for f in result.failures), result.failures
    assert took < 90
    assert all(training_pids(cluster, h) == [] for h in cluster.names)


def test_sshd_refuses_the_key(cluster, tmp_path):
    keys = home(cluster, "h2") / ".ssh" / "authorized_keys"
    saved = keys.read_text()
    keys.write_text("")
    try:
        result, run_id, took = launch(cluster, tmp_path)
    finally:
        keys.write_text(saved)
    assert result.rc != 0
    assert any("host h2 is unreachable" in f and "exclude=h2" in f for f in result.failures), result.failures
    assert took < 60


def test_rank_killed_on_a_worker_stops_every_host(cluster, tmp_path):
    killed = []

    def kill_when_training():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            metrics = list((home(cluster, "h1") / ".dsfleet" / "runs").glob("rig-*/out/metrics.jsonl"))
            if any('"step"' in m.read_text() for m in metrics):
                for pid in training_pids(cluster, "h2"):
                    cmdline = pathlib.Path("/proc/%d/cmdline" % pid).read_bytes()
                    if b"train.py" in cmdline and b"deepspeed.launcher" not in cmdline and b"--local_rank" in cmdline:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    result, run_id, took = launch(cluster, tmp_path, max_steps=3000)
    killer.join(timeout=5)
    assert killed, "never saw a training rank on h2"
    assert result.rc != 0
    failure = " ".join(result.failures)
    assert "training failed on" in failure and "Every rank was stopped" in failure, result.failures
    for host in cluster.names:
        assert (RUNS / run_id / "logs" / ("%s.log" % host)).is_file()
    time.sleep(1)
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}


def test_pdsh_from_a_master_that_is_not_the_first_host(cluster, tmp_path):
    """setup.yml's mesh and the plan's master agree: with the first host left out, the next one launches
    DeepSpeed's pdsh runner, reaching the others (and itself) by key with pinned host keys."""
    result, run_id, took = launch(cluster, tmp_path, launcher="pdsh", exclude="h1", max_steps=12)
    assert result.rc == 0, result.stdout[-5000:]
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert [h["name"] for h in summary["hosts"]] == ["h2", "h3"]
    assert (summary["launcher"], summary["checkpoint_host"], summary["steps"]) == ("pdsh", "h2", 12)
    assert summary["export_dir"] == "/root/.dsfleet/runs/%s/out/export" % run_id
    assert summary["final_loss"] < summary["first_loss"], summary
    hostfile = [line for line in (RUNS / run_id / "hostfile").read_text().splitlines() if not line.startswith("#")]
    assert hostfile == ["%s slots=1" % cluster.address(h) for h in ("h2", "h3")]
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}
    # the export DeepSpeed's pdsh-started rank 0 wrote on h2 loads with transformers there
    python = home(cluster, "h2") / ".dsfleet" / "venv" / "bin" / "python"
    loads = subprocess.run([str(python), "-c", "import sys; from transformers import AutoModelForCausalLM as M; "
                            "print(M.from_pretrained(sys.argv[1]).num_parameters())",
                            str(home(cluster, "h2") / ".dsfleet" / "runs" / run_id / "out" / "export")],
                           capture_output=True, text=True, timeout=300)
    assert loads.returncode == 0 and int(loads.stdout.split()[-1]) > 0, loads.stderr[-2000:]
    # every host reaches every host by key, host keys pinned: whichever host the plan picks can launch
    for src in cluster.names:
        for dst in cluster.names:
            proc = cluster.run_in(src, "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes %s hostname"
                                  % cluster.address(dst))
            assert (proc.returncode, proc.stdout.strip()) == (0, dst), (src, dst, proc.stderr)


def test_the_per_node_scripts_started_by_hand_reproduce_the_run(cluster, tmp_path):
    """runs/<id>/nodes/<host>.sh of a dry run, copied to each host and run there by hand (no Ansible, no ssh from
    host to host), train the same steps with the same losses as launch.yml does with the same knobs."""
    def losses(path):
        return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "step"]

    knobs = dict(max_steps=6, log_every=1, seed=7)
    dry, by_hand, _ = launch(cluster, tmp_path, dry_run=True, **knobs)
    assert dry.rc == 0, dry.stdout[-3000:]
    scripts = sorted(p.name for p in (RUNS / by_hand / "nodes").iterdir())
    assert scripts == ["h1.sh", "h2.sh", "h3.sh"], scripts
    for host in cluster.names:
        (home(cluster, host) / "node.sh").write_text((RUNS / by_hand / "nodes" / ("%s.sh" % host)).read_text())
    runs = {}

    def start(host):
        runs[host] = cluster.run_in(host, ["sh", "/root/node.sh"], timeout=900)

    threads = [threading.Thread(target=start, args=(h,)) for h in reversed(cluster.names)]   # the master last
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {h: r.returncode for h, r in runs.items()} == {h: 0 for h in cluster.names}, \
        {h: r.stderr[-1500:] for h, r in runs.items()}
    mine = losses(home(cluster, "h1") / ".dsfleet" / "runs" / by_hand / "out" / "metrics.jsonl")
    result, run_id, _ = launch(cluster, tmp_path, **knobs)
    assert result.rc == 0, result.stdout[-3000:]
    theirs = losses(RUNS / run_id / "metrics.jsonl")
    assert [s for s, _ in mine] == [s for s, _ in theirs] == list(range(1, 7)), (mine, theirs)
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(mine, theirs)), (mine, theirs)
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}
    # a finished run id is not trained again
    again = run_playbook("launch.yml", dict(VARS, run_id=run_id, **knobs), inventory=cluster.inventory,
                         envvars={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp")})
    assert again.rc == 0 and "run %s has already finished" % run_id in again.stdout, again.stdout[-3000:]
    assert losses(RUNS / run_id / "metrics.jsonl") == theirs


def operate(rig, tmp_path, playbook, run_id, **extra):
    env = {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp")}
    return run_playbook(playbook, dict(run_id=run_id, **extra), inventory=rig.inventory, envvars=env)


def wait_for_step(rig, run_id, step, limit=400):
    metrics = home(rig, "h1") / ".dsfleet" / "runs" / run_id / "out" / "progress.json"
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            if json.loads(metrics.read_text()).get("step", 0) >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(1)
    raise AssertionError("run %s never reached step %d" % (run_id, step))


def test_fsdp_and_ddp_train_on_three_hosts_and_fsdp_resumes_exactly_after_a_stop(cluster, tmp_path):
    """strategy=fsdp and strategy=ddp on the 3 hosts (torchrun on each, from the plan): the loss falls, each host
    keeps only its own rank's FSDP shard, and a run stopped by stop.yml (every rank checkpoints on SIGTERM) resumes
    with the losses of the same run left uninterrupted; DDP's first loss is FSDP's (same weights, same data)."""
    def losses(run_id):
        return {r["step"]: r["loss"] for r in map(json.loads, (RUNS / run_id / "metrics.jsonl").read_text()
                                                    .splitlines()) if r["event"] == "step"}

    knobs = dict(strategy="fsdp", max_steps=250, block_size=32, micro_batch=2, log_every=1, save_every_minutes=0,
                 seed=5)
    result, straight, _ = launch(cluster, tmp_path, **knobs)
    assert result.rc == 0, result.stdout[-4000:]
    assert "launcher ansible (torchrun on every host), FSDP (full sharding)" in result.stdout
    summary = json.loads((RUNS / straight / "summary.json").read_text())
    assert (summary["strategy"], summary["fsdp_sharding"], summary["steps"]) == ("fsdp", "full", 250)
    assert summary["final_loss"] < summary["first_loss"]
    reference = losses(straight)
    for rank, host in enumerate(cluster.names):
        tag = home(cluster, host) / ".dsfleet" / "runs" / straight / "out" / "checkpoint" / "global_step250"
        assert sorted(p.name for p in tag.glob("fsdp_rank_*.pt")) == ["fsdp_rank_%d.pt" % rank], host
        assert json.loads((tag / ".dsfleet-complete").read_text())["strategy"] == "fsdp-full"

    result, stopped, _ = launch(cluster, tmp_path, follow=False, **knobs)
    assert result.rc == 0, result.stdout[-3000:]
    wait_for_step(cluster, stopped, 20)
    stop = operate(cluster, tmp_path, "playbooks/stop.yml", stopped)
    assert stop.rc == 0, stop.stdout[-3000:]
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}
    halt = int(re.search(r"newest checkpoint complete on every host: step (\d+)", stop.stdout).group(1))
    assert 20 <= halt < 250, halt
    resumed = run_playbook("launch.yml", dict(VARS, resume=stopped), inventory=cluster.inventory,
                           envvars={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp2")})
    assert resumed.rc == 0, resumed.stdout[-4000:]
    assert "resuming from step %d, complete on every host (the same layout: exact)" % halt in resumed.stdout
    after = {s: v for s, v in losses(stopped).items() if s > halt}
    assert sorted(after) == list(range(halt + 1, 251))
    worst = max(abs(after[s] - reference[s]) / abs(reference[s]) for s in after)
    assert worst < 1e-4, worst

    result, ddp, _ = launch(cluster, tmp_path, **dict(knobs, strategy="ddp", max_steps=6))
    assert result.rc == 0, result.stdout[-4000:]
    summary = json.loads((RUNS / ddp / "summary.json").read_text())
    assert (summary["strategy"], summary["world_size"], summary["steps"]) == ("ddp", 3, 6)
    assert abs(losses(ddp)[1] - reference[1]) < 1e-4 * reference[1]
    assert summary["final_loss"] < summary["first_loss"]


def test_detached_run_is_followed_to_the_end(cluster, tmp_path):
    result, run_id, took = launch(cluster, tmp_path, follow=False, max_steps=30)
    assert result.rc == 0, result.stdout[-3000:]
    assert "follow:  ./dsfleet playbooks/follow.yml -e run_id=%s" % run_id in result.stdout
    assert not (RUNS / run_id / "summary.json").exists()
    followed = operate(cluster, tmp_path, "playbooks/follow.yml", run_id)
    assert followed.rc == 0, followed.stdout[-4000:]
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert summary["steps"] == 30 and [h["name"] for h in summary["hosts"]] == cluster.names
    assert all((RUNS / run_id / "logs" / ("%s.log" % h)).is_file() for h in cluster.names)


def test_status_then_stop_leaves_nothing_and_resume_continues(cluster, tmp_path):
    result, run_id, took = launch(cluster, tmp_path, follow=False, max_steps=100000, save_every_minutes=0,
                                  plot_every_s=0.5)
    assert result.rc == 0, result.stdout[-3000:]
    wait_for_step(cluster, run_id, 5)
    out = home(cluster, "h1") / ".dsfleet" / "runs" / run_id / "out"
    deadline = time.time() + 60
    while not (out / "plot.png").is_file() and time.time() < deadline:
        time.sleep(0.5)
    status = operate(cluster, tmp_path, "playbooks/status.yml", run_id)
    assert status.rc == 0, status.stdout[-3000:]
    # status brought the master's records of the running run to the controller: metrics, plot, TensorBoard events
    steps = [json.loads(line) for line in (RUNS / run_id / "metrics.jsonl").read_text().splitlines()]
    assert steps[0]["event"] == "start" and any(e["event"] == "step" and e["step"] >= 5 for e in steps)
    assert (RUNS / run_id / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((RUNS / run_id / "tensorboard").glob("events.out.tfevents.*"))) == 1
    for host in cluster.names:
        assert re.search(r"%s\s+running\s+1/1" % host, status.stdout), status.stdout[-3000:]
    assert "run %s: running — step " % run_id in status.stdout
    stop = operate(cluster, tmp_path, "playbooks/stop.yml", run_id)
    assert stop.rc == 0, stop.stdout[-3000:]
    report = stop.stdout[stop.stdout.find("Say what was stopped"):][:1500]
    stopped_on = re.search(r"run %s: stopped on ([^\"]+)\"" % run_id, report)
    assert stopped_on and "h1" in stopped_on.group(1), report
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}
    found = re.search(r"newest checkpoint complete on every host: step (\d+)", stop.stdout)
    assert found, stop.stdout[-3000:]
    halt = int(found.group(1))
    # every host holds its own shards of that checkpoint (no shared filesystem)
    for host in cluster.names:
        tag = home(cluster, host) / ".dsfleet" / "runs" / run_id / "out" / "checkpoint" / ("global_step%d" % halt)
        assert (tag / ".dsfleet-complete").is_file(), host
    resumed = run_playbook("launch.yml", dict(VARS, resume=run_id, max_steps=halt + 5), inventory=cluster.inventory,
                           envvars={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp2")})
    assert resumed.rc == 0, resumed.stdout[-4000:]
    assert "resuming from step %d, complete on every host (the same layout: exact)" % halt in resumed.stdout
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert summary["steps"] == halt + 5
    # h3 left out: 3 ranks -> 2. h1 takes rank 0 from its own shards and rank 2 from the copy h3 sent it, pulls
    # rank 1 from h2 over ssh, converts, and ships the universal checkpoint to h2
    smaller = run_playbook("launch.yml", dict(VARS, resume=run_id, max_steps=halt + 10, exclude="h3"),
                           inventory=cluster.inventory, envvars={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp3")})
    assert smaller.rc == 0, smaller.stdout[-4000:]
    assert ("resuming from step %d, written by 3 rank(s), now 2: gathering on h1 (h1: ranks 0; h1 (replica of h3): "
            "ranks 2; h2: ranks 1)" % (halt + 5)) in smaller.stdout, smaller.stdout[-4000:]
    universal = (home(cluster, "h2") / ".dsfleet" / "runs" / run_id / "out" / "checkpoint"
                 / ("global_step%d_universal" % (halt + 5)))
    assert (universal / ".dsfleet-complete").is_file() and (universal / "zero").is_dir()
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert summary["steps"] == halt + 10 and [h["name"] for h in summary["hosts"]] == ["h1", "h2"]


LOGITS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
x = torch.arange(64).reshape(2, 32) % 1000
out = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()(input_ids=x).logits.detach()
       for p in sys.argv[1:]]
print(json.dumps({"max_diff": float((out[0] - out[1]).abs().max()), "scale": float(out[0].abs().max())}))
"""


def test_a_zero3_run_on_three_hosts_exports_from_its_scattered_shards(cluster, tmp_path):
    """Each host holds only its own rank's ZeRO-3 partition; export.yml gathers them on h1, rebuilds the weights and
    fetches a Hugging Face directory to the controller that gives the training engine's logits; a mid-run checkpoint
    exports too (left on h1 with export_to=host), a step that is not a checkpoint fails naming those there are."""
    result, run_id, took = launch(cluster, tmp_path, max_steps=6, zero_stage=3, precision="fp32", block_size=32,
                                  save_every=3, keep_checkpoints=0)
    assert result.rc == 0, result.stdout[-3000:]
    for rank, host in enumerate(cluster.names):
        tag = home(cluster, host) / ".dsfleet" / "runs" / run_id / "out" / "checkpoint" / "global_step6"
        ranks = {rank_of_file(p.name) for p in tag.glob("*_optim_states.pt")}
        assert ranks == {rank}, (host, sorted(p.name for p in tag.iterdir()))
    exported = operate(cluster, tmp_path, "playbooks/export.yml", run_id)
    assert exported.rc == 0, exported.stdout[-4000:]
    assert "exporting step 6 on h1 from 3 rank(s)' files" in exported.stdout
    here = RUNS / run_id / "export-global_step6"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in here.iterdir()}
    # the engine's own end-of-run export (rank 0, on h1), loaded by the venv setup.yml built there
    python = home(cluster, "h1") / ".dsfleet" / "venv" / "bin" / "python"
    end_of_run = home(cluster, "h1") / ".dsfleet" / "runs" / run_id / "out" / "export"
    same = subprocess.run([str(python), "-c", LOGITS, str(here), str(end_of_run)], capture_output=True, text=True,
                          timeout=300)
    assert same.returncode == 0, same.stderr[-2000:]
    diff = json.loads(same.stdout.splitlines()[-1])
    assert diff["scale"] > 0 and diff["max_diff"] <= 1e-5 * diff["scale"], diff

    # a mid-run checkpoint, left on the host that gathered it
    mid = operate(cluster, tmp_path, "playbooks/export.yml", run_id, step=3, export_to="host")
    assert mid.rc == 0, mid.stdout[-4000:]
    assert "exporting step 3 on h1 from 3 rank(s)' files" in mid.stdout and "not fetched (export_to=host)" in mid.stdout
    assert not (RUNS / run_id / "export-global_step3").exists()
    on_host = home(cluster, "h1") / ".dsfleet" / "runs" / run_id / "out" / "export-global_step3"
    differs = subprocess.run([str(python), "-c", LOGITS, str(on_host), str(end_of_run)], capture_output=True,
                             text=True, timeout=300)
    assert differs.returncode == 0, differs.stderr[-2000:]
    assert json.loads(differs.stdout.splitlines()[-1])["max_diff"] > 1e-4   # three steps before the end
    bad = operate(cluster, tmp_path, "playbooks/export.yml", run_id, step=4)
    assert bad.rc != 0
    assert any("step 4 is not a checkpoint whose every rank's files are on the hosts (complete: 3, 6)" in f
               for f in bad.failures), bad.failures

    # inference from the run id: the export is shipped to every host; 20 prompts over 3 hosts come back in order
    prompts = tmp_path / "prompts.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "one two", "the river", "a cat", "my name", "we went", "long ago"]
    prompts.write_text("".join(json.dumps({"text": "%s %d" % (words[i % 10], i)}) + "\n" for i in range(20)))
    env = {"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp")}
    ask = dict(VARS, model=run_id, prompts=str(prompts), prompt_field="text", max_new_tokens=12, precision="fp32")
    spread = run_playbook("playbooks/infer.yml", dict(ask, run_id="ask-" + run_id, master_port=29620),
                          inventory=cluster.inventory, envvars=env)
    assert spread.rc == 0, spread.stdout[-5000:]
    assert "exporting step" not in spread.stdout  # the export above is used
    rows = [json.loads(line) for line in (RUNS / ("ask-" + run_id) / "generations.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(20))
    assert [r["prompt"] for r in rows] == ["%s %d" % (words[i % 10], i) for i in range(20)]
    assert [r["host"] for r in rows] == ["h1"] * 7 + ["h2"] * 7 + ["h3"] * 6
    for host in ("h2", "h3"):  # no shared filesystem: the model was copied to each host
        shipped = list((home(cluster, host) / ".dsfleet" / "models").glob("export-global_step6-*/model.safetensors"))
        assert len(shipped) == 1, host
    assert len({r["output"] for r in rows}) > 1
    # (tp=2 on every host gives the same text: tests/e2e/test_infer.py, on one host; not repeated here for time)


def test_a_dataset_only_the_controller_has_trains_on_every_host(cluster, tmp_path):
    """The hosts have their own /tmp: a jsonl file in the controller's is copied to each host's dsfleet home, read
    there, and not sent again by the next run (the copy on h2 keeps its inode and mtime)."""
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"text": "record %d of the user's own data, seen only here." % i}) + "\n"
                            for i in range(400)))
    result, run_id, _ = launch(cluster, tmp_path, max_steps=4, dataset=str(data), block_size=32, eval_fraction=0.1)
    assert result.rc == 0, result.stdout[-4000:]
    assert "dataset %s: on the controller only; copied to every host" % data in result.stdout
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert math.isfinite(summary["eval_loss"]) and summary["perplexity"] > 1, summary
    assert (RUNS / run_id / "plot.png").stat().st_size > 20000                     # the master's records
    assert [p.name.startswith("events.out.tfevents.") for p in (RUNS / run_id / "tensorboard").iterdir()] == [True]
    assert "records      %s/{metrics.jsonl,plot.png}" % (RUNS / run_id) in result.stdout
    # each host tokenized the copy once into its own token cache
    caches = {h: [p for p in (home(cluster, h) / ".dsfleet" / "cache" / "tokens").iterdir() if p.is_dir() and
                  json.loads((p / "meta.json").read_text())["source"].endswith("/mine.jsonl")]
              for h in cluster.names}
    assert all(len(c) == 1 for c in caches.values()), caches
    copies = {h: list((home(cluster, h) / ".dsfleet" / "inputs").glob("mine.jsonl-*/mine.jsonl")) for h in cluster.names}
    assert all(len(c) == 1 and c[0].read_text() == data.read_text() for c in copies.values()), copies
    first = copies["h2"][0].stat()
    again, second_id, _ = launch(cluster, tmp_path, max_steps=2, dataset=str(data), block_size=32)
    assert again.rc == 0, again.stdout[-4000:]
    after = copies["h2"][0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    summary = json.loads((RUNS / second_id / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["dataset"] == str(data)
    # the second run maps the same token cache (another run id, the same data): nothing tokenized again
    log = (RUNS / second_id / "logs" / "h1.log").read_text()
    assert re.search(r"token cache: reusing /\S+/\.dsfleet/cache/tokens/%s " % caches["h1"][0].name, log), log[-3000:]


def test_a_hub_model_only_the_master_can_reach_is_downloaded_once_and_shipped(cluster, tmp_path):
    """-e model=org/name where only the master has the network: a stand-in for the Hub (tests/rig/fake_hub.py) listens
    on h1's own loopback, which h2 and h3 cannot reach. h1 downloads the model once through huggingface_hub,
    sends it to h2 and h3 over the ssh mesh, all three train on it; the next run sends nothing and downloads
    nothing."""
    # built on h1 with its venv, in h1's own /tmp (the controller sees it under the rig's host dir; the repository
    # itself may lie under a /tmp that h1 does not see)
    name = "hub-%s" % uuid.uuid4().hex[:6]
    repo = pathlib.Path(cluster.host_dir("h1", "tmp")) / name
    model = repo / "fake-org" / "tiny-llama"
    preset = ROOT / "train" / "presets" / "tiny"
    shutil.copytree(preset, repo / "preset")
    vocab = json.loads((preset / "config.json").read_text())["vocab_size"]
    build = cluster.run_in("h1", ["/root/.dsfleet/venv/bin/python", "-c", fake_hub.BUILD_TINY_LLAMA,
                                  "/tmp/%s/fake-org/tiny-llama" % name, "/tmp/%s/preset" % name, str(vocab)],
                           timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    shutil.rmtree(repo / "preset")
    port_file, log = tmp_path / "hub.port", tmp_path / "hub.log"
    server = subprocess.Popen(["ip", "netns", "exec", cluster.host("h1")["netns"], sys.executable,
                               str(ROOT / "tests" / "rig" / "fake_hub.py"), "--root", str(repo), "--port-file",
                               str(port_file)], stderr=open(log, "w"))
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
        endpoint = "http://127.0.0.1:%s" % port_file.read_text().strip()
        probe = "import urllib.request; urllib.request.urlopen('%s/api/models/fake-org/tiny-llama', timeout=5)"
        assert cluster.run_in("h1", ["python3", "-c", probe % endpoint]).returncode == 0
        assert cluster.run_in("h2", ["python3", "-c", probe % endpoint]).returncode != 0   # no network but h1's
        env = {"HF_ENDPOINT": endpoint}
        run_id = "rig-%s" % uuid.uuid4().hex[:6]
        result = run_playbook("launch.yml", dict(VARS, run_id=run_id, model="fake-org/tiny-llama", max_steps=4,
                                                 block_size=32), inventory=cluster.inventory,
                              envvars=dict(env, ANSIBLE_SSH_CONTROL_PATH_DIR=str(tmp_path / "cp")))
        assert result.rc == 0, result.stdout[-5000:]
        assert "shipped to h2, h3 over the ssh mesh" in result.stdout
        assert re.search(r"fake-org/tiny-llama@main is commit [0-9a-f]{40} .*from the hub.*sent to h2, h3",
                         result.stdout), result.stdout[-4000:]
        plan = json.loads((RUNS / run_id / "plan.json").read_text())
        assert plan["sizing"]["known"] and plan["world_size"] == 3, plan["sizing"]
        names = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
        for host in cluster.names:
            folder = home(cluster, host) / ".dsfleet" / "inputs" / "hub" / "fake-org--tiny-llama--main"
            for name in names:
                assert (folder / name).read_bytes() == (model / name).read_bytes(), (host, name)
        gets = [line for line in log.read_text().splitlines() if line.startswith("fake_hub: GET ") and "/resolve/" in line]
        weights = [g for g in gets if "model.safetensors" in g]
        assert len(weights) == 1, gets          # downloaded once, by h1: the only host that can reach it
        summary = json.loads((RUNS / run_id / "summary.json").read_text())
        assert summary["steps"] == 4 and summary["world_size"] == 3, summary
        copy = (home(cluster, "h3") / ".dsfleet" / "inputs" / "hub" / "fake-org--tiny-llama--main"
                / "model.safetensors").stat()
        before = len(gets)
        again = run_playbook("launch.yml", dict(VARS, run_id=run_id + "b", model="fake-org/tiny-llama", max_steps=2,
                                                block_size=32), inventory=cluster.inventory,
                             envvars=dict(env, ANSIBLE_SSH_CONTROL_PATH_DIR=str(tmp_path / "cp2")))
        assert again.rc == 0, again.stdout[-4000:]
        assert "sent to no host; already on h2, h3" in again.stdout, again.stdout[-4000:]
        gets = [line for line in log.read_text().splitlines() if line.startswith("fake_hub: GET ") and "/resolve/" in line]
        assert [g for g in gets[before:] if "model.safetensors" in g] == [], gets[before:]
        after = (home(cluster, "h3") / ".dsfleet" / "inputs" / "hub" / "fake-org--tiny-llama--main"
                 / "model.safetensors").stat()
        assert (after.st_ino, after.st_mtime_ns) == (copy.st_ino, copy.st_mtime_ns)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(repo, ignore_errors=True)


def test_a_model_only_the_hosts_have_is_sized_from_the_masters_config(cluster, tmp_path):
    """The controller has no config.json for a path that lies only on the hosts (their own /root): the plan reads
    it on the master and sizes the model from it; a 7B model then does not fit three CPU ranks, before anything
    starts. A model that is nowhere says so in the plan."""
    configs = ROOT / "tests" / "fixtures" / "configs"
    for name, fixture in (("hostonly-gpt2", "gpt2"), ("hostonly-7b", "llama-2-7b")):
        assert not pathlib.Path("/root", name).exists()
        for host in cluster.names:
            folder = home(cluster, host) / name
            folder.mkdir(exist_ok=True)
            (folder / "config.json").write_text((configs / ("%s.json" % fixture)).read_text())
    dry, run_id, _ = launch(cluster, tmp_path, dry_run=True, model="/root/hostonly-gpt2")
    assert dry.rc == 0, dry.stdout[-3000:]
    sizing = json.loads((RUNS / run_id / "plan.json").read_text())["sizing"]
    assert sizing["known"] and (sizing["family"], sizing["params"]) == ("gpt2", 124439808), sizing
    big, _, took = launch(cluster, tmp_path, dry_run=True, model="/root/hostonly-7b")
    assert big.rc != 0 and took < 60
    assert any("the model does not fit: 6,738,415,616 parameters (llama)" in f for f in big.failures), big.failures
    nowhere, nowhere_id, _ = launch(cluster, tmp_path, dry_run=True, model="/root/no-such-model")
    assert nowhere.rc == 0, nowhere.stdout[-3000:]
    note = json.loads((RUNS / nowhere_id / "plan.json").read_text())["sizing"]["note"]
    assert note.startswith("not sized: no config.json for /root/no-such-model on the controller nor on h1: "
                           "/root/no-such-model is neither a directory nor a hub id"), note


@pytest.fixture(scope="module")
def slurm(cluster):
    """A real SLURM on the rig's hosts: slurmctld on h1, slurmd on h1-h3, one munged (tests/rig/slurm.py)."""
    s = slurmmod.start(cluster)
    try:
        yield s
    finally:
        s.stop()


def losses_of(run_id):
    return {r["step"]: r["loss"] for r in map(json.loads, (RUNS / run_id / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "step"}


def test_a_slurm_job_trains_on_three_nodes(cluster, slurm, tmp_path):
    """launcher=slurm: launch.yml renders job.sbatch from the plan, submits it on the master, follows it (queued
    while another job holds h3, then each node's progress) and collects as the other launchers do; the job's batch
    output comes back too. h1 runs two ranks, the others one: a heterogeneous job (tasks per node per component)."""
    inventory = tmp_path / "uneven.yml"
    inventory.write_text(re.sub(r'(\n( +)rig_netns: "[a-z]+-h1")', r'\1\n\2slots: 2',
                                pathlib.Path(cluster.inventory).read_text(), count=1))
    assert "slots: 2" in inventory.read_text()
    blocker = slurm.run("h1", "sbatch --parsable --exclusive -w h3 -J blocker --wrap 'sleep 600'")
    assert blocker.returncode == 0, blocker.stderr
    run_id = "rig-%s" % uuid.uuid4().hex[:6]
    released = []

    def release_h3_once_queued():
        deadline = time.time() + 300
        while time.time() < deadline:
            if slurm.run("h1", "squeue -h -t PD -n dsfleet-%s -o %%i" % run_id).stdout.strip():
                time.sleep(6)       # long enough for the follow loop to report it queued (poll_interval 2)
                released.append(slurm.run("h1", "scancel %s" % blocker.stdout.strip()).returncode)
                return
            time.sleep(0.5)

    releaser = threading.Thread(target=release_h3_once_queued, daemon=True)
    releaser.start()
    result = run_playbook("launch.yml", dict(VARS, run_id=run_id, launcher="slurm", max_steps=20, log_every=1),
                          inventory=str(inventory), envvars={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp")})
    releaser.join(timeout=5)
    assert result.rc == 0, result.stdout[-5000:] + slurm.log_tails()
    assert released == [0]
    run = RUNS / run_id
    job = json.loads((run / "slurm.json").read_text())["job_id"]
    assert "submitted as SLURM job %d (dsfleet-%s, 3 node(s): h1,h2,h3)" % (job, run_id) in result.stdout
    # (a heterogeneous job pends with no reason given; a plain one says Resources or Priority)
    assert re.search(r"\[h1\] queued: SLURM job %d PENDING\b" % job, result.stdout), result.stdout[-4000:]
    assert ("slurm: job dsfleet-%s on node(s) h1,h2,h3, whole nodes, a heterogeneous job (h1: 2 task(s) a node; "
            "h2,h3: 1 task(s) a node); each node's launcher is its one step task; submitted on h1" % run_id) \
        in result.stdout
    script = (run / "job.sbatch").read_text()
    assert "#SBATCH --nodelist=h1\n#SBATCH --ntasks-per-node=2\n" in script
    assert "#SBATCH hetjob\n#SBATCH --nodes=2\n#SBATCH --nodelist=h2,h3\n#SBATCH --ntasks-per-node=1\n" in script
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["launcher"], summary["steps"], summary["world_size"]) == ("slurm", 20, 4)
    assert summary["final_loss"] < summary["first_loss"], summary
    batch = (run / "logs" / ("slurm-%s-%d.out" % (run_id, job))).read_text()
    assert "SLURM job %d on h1 h2 h3; rank 0 on h1" % job in batch, batch
    for host in cluster.names:
        assert "==== dsfleet_node: started" in (run / "logs" / ("%s.log" % host)).read_text()
    shown = slurm.run("h1", "scontrol show job %d -o" % job).stdout
    assert "JobState=COMPLETED" in shown and "ExitCode=0:0" in shown, shown
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}


def test_a_cancelled_or_failed_slurm_job_fails_the_play_naming_the_node(cluster, slurm, tmp_path):
    """scancel of a running job: follow.yml (re-attached to a detached start) fails naming the node and the
    cancellation; the ranks checkpointed on SLURM's SIGTERM, which a resume plans from. A rank killed on h2: the
    play fails naming h2, and SLURM records the job as failed. Nothing is left running."""
    result, run_id, _ = launch(cluster, tmp_path, launcher="slurm", follow=False, max_steps=3000, log_every=1,
                               save_every_minutes=0)
    assert result.rc == 0, result.stdout[-4000:]
    job = json.loads((RUNS / run_id / "slurm.json").read_text())["job_id"]
    assert "follow:  ./dsfleet playbooks/follow.yml -e run_id=%s" % run_id in result.stdout
    wait_for_step(cluster, run_id, 5)
    cancel = slurm.run("h2", "scancel %d" % job)
    assert cancel.returncode == 0, cancel.stderr
    followed = operate(cluster, tmp_path, "playbooks/follow.yml", run_id)
    assert followed.rc != 0
    failure = " ".join(followed.failures)
    assert re.search(r"training failed on h[123]: SLURM job %d CANCELLED" % job, failure), followed.stdout[-4000:]
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}
    # every rank wrote a checkpoint on SLURM's SIGTERM, each host its own shards: `-e resume` continues from it
    # (resume itself is the same whatever the launcher: test_status_then_stop_leaves_nothing_and_resume_continues)
    steps = []
    for host in cluster.names:
        out = home(cluster, host) / ".dsfleet" / "runs" / run_id / "out"
        steps.append({int(p.parent.name[11:]) for p in (out / "checkpoint").glob("global_step*/.dsfleet-complete")})
    halt = max(set.intersection(*steps))
    assert halt >= 5 and "stopped at step %d on SIGTERM" % halt in (RUNS / run_id / "logs" / "h1.log").read_text()
    checks = operate(cluster, tmp_path, "launch.yml", run_id, resume=run_id, dry_run=True)
    assert checks.rc == 0 and "resume: run %s on the same layout (3 rank(s)): exact continuation" % run_id \
        in checks.stdout, checks.stdout[-3000:]

    killed = []

    def kill_a_rank_on_h2():
        deadline = time.time() + 400
        while time.time() < deadline and not killed:
            for pid in training_pids(cluster, "h2"):
                cmdline = pathlib.Path("/proc/%d/cmdline" % pid).read_bytes()
                if b"--local_rank" in cmdline and b"deepspeed.launcher" not in cmdline and list(
                        (home(cluster, "h1") / ".dsfleet" / "runs").glob("%s/out/heartbeat/rank-0" % failing[0])):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.5)

    failing = ["rig-%s" % uuid.uuid4().hex[:6]]
    killer = threading.Thread(target=kill_a_rank_on_h2, daemon=True)
    killer.start()
    result = run_playbook("launch.yml", dict(VARS, run_id=failing[0], launcher="slurm", max_steps=3000),
                          inventory=cluster.inventory, envvars={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp3")})
    killer.join(timeout=5)
    assert killed, "never saw a training rank on h2"
    assert result.rc != 0
    assert any("training failed on h2:" in f and "Every rank was stopped" in f for f in result.failures), \
        result.failures
    job = json.loads((RUNS / failing[0] / "slurm.json").read_text())["job_id"]
    deadline = time.time() + 60
    while "JobState=FAILED" not in slurm.run("h1", "scontrol show job %d -o" % job).stdout and time.time() < deadline:
        time.sleep(1)
    assert "JobState=FAILED" in slurm.run("h1", "scontrol show job %d -o" % job).stdout
    assert {h: training_pids(cluster, h) for h in cluster.names} == {h: [] for h in cluster.names}
    assert slurm.run("h1", "squeue -h -t R,PD -o %i").stdout.strip() == ""


def test_unreachable_host_fails_fast(cluster, tmp_path):
    # last: the host stays down. Its sshd is stopped by PID, as the rig recorded it.
    os.kill(cluster.host("h3")["sshd_pid"], signal.SIGTERM)
    time.sleep(0.5)
    result, run_id, took = launch(cluster, tmp_path)
    assert result.rc != 0
    assert any("host h3 is unreachable" in f for f in result.failures), result.failures
    assert took < 60
    # and with the host left out explicitly the plan goes ahead without it
    dry, dry_id, _ = launch(cluster, tmp_path, dry_run=True, exclude="h3")
    assert dry.rc == 0, dry.stdout[-3000:]
    plan = json.loads((RUNS / dry_id / "plan.json").read_text())
    assert [h["name"] for h in plan["hosts"]] == ["h1", "h2"]
    assert plan["excluded"] == [{"name": "h3", "reason": "excluded by the user (exclude=)"}]
    assert "left out: h3" in dry.stdout


def test_a_worker_host_dies_mid_run_and_the_run_resumes_on_the_host_left(cluster, tmp_path):
    """Every process of h2 is killed mid-run (h3 is down since the test before), after h2 copied a checkpoint to
    h1: the ranks on h1 stop too, and the play fails naming h2, well within a minute. Then resume with
    require_all_hosts=false continues on h1 alone, from that checkpoint at world size 1 (h2's shards come from
    the copy on h1, through a universal checkpoint), and the loss goes on from where it was."""
    killed, killed_at = [], []
    replicas = "rig-*/out/checkpoint-replicas/h2/global_step*/.dsfleet-complete"

    def kill_host_after_a_replica():
        deadline = time.time() + 400
        while time.time() < deadline:
            if any(p.stat().st_mtime > started for p in (home(cluster, "h1") / ".dsfleet" / "runs").glob(replicas)):
                for pid in rigmod.netns_pids(cluster.host("h2")["netns"]):
                    try:
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                    except ProcessLookupError:
                        pass
                killed_at.append(time.time())
                return
            time.sleep(0.5)

    started = time.time()
    killer = threading.Thread(target=kill_host_after_a_replica, daemon=True)
    killer.start()
    result, run_id, took = launch(cluster, tmp_path, max_steps=100000, exclude="h3", save_every=10, log_every=1)
    killer.join(timeout=5)
    assert killed, "never saw h2's checkpoint copied to h1"
    assert result.rc != 0
    failure = " ".join(result.failures)
    assert "training failed on h2: no status from host (unreachable" in failure, result.stdout[-5000:]
    assert time.time() - killed_at[0] < 90
    time.sleep(1)
    assert training_pids(cluster, "h1") == []

    out = home(cluster, "h1") / ".dsfleet" / "runs" / run_id / "out"
    own = {int(p.parent.name[11:]) for p in (out / "checkpoint").glob("global_step*/.dsfleet-complete")}
    copied = {int(p.parent.name[11:]) for p in (out / "checkpoint-replicas" / "h2").glob("global_step*/.dsfleet-complete")}
    step = max(own & copied)
    losses = {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if m["event"] == "step"}
    resumed = run_playbook("launch.yml", dict(VARS, resume=run_id, require_all_hosts=False, max_steps=step + 5,
                                              exclude=""),
                           inventory=cluster.inventory, envvars={"ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp_path / "cp2")})
    assert resumed.rc == 0, resumed.stdout[-5000:]
    assert "left out: h2 — unreachable" in resumed.stdout
    assert "resume: run %s was written by 2 rank(s) on h1, h2; now 1 rank(s)" % run_id in resumed.stdout
    assert re.search(r"resuming from step %d, written by 2 rank\(s\), now 1: gathering on h1 \(h1: ranks 0; "
                     r"h1 \(replica of h2\): ranks 1\)" % step, resumed.stdout), resumed.stdout[-5000:]
    after = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    start = [m for m in after if m["event"] == "start"][-1]
    assert (start["world_size"], start["start_step"]) == (1, step)
    first_after = [m for m in after if m["event"] == "step" and m["step"] == step + 1][-1]["loss"]
    assert abs(first_after - losses[step]) < 0.25 * abs(losses[1] - losses[step]) + 0.05, (losses, first_after)
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert summary["steps"] == step + 5 and [h["name"] for h in summary["hosts"]] == ["h1"]
