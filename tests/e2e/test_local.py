"""End to end on the embedded default inventory: the real setup.yml + launch.yml, real DeepSpeed on CPU."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest

from helpers import RUNS, load_summary, run_playbook


def _run_id(tag):
    return "test-%s-%s" % (tag, uuid.uuid4().hex[:6])


def test_second_setup_changes_nothing(setup_result):
    again = run_playbook("setup.yml")
    assert again.rc == 0, again.stdout[-3000:]
    assert again.changed == 0, again.stdout[-6000:]


def test_setup_check_mode_runs(setup_result):
    check = run_playbook("setup.yml", cmdline="--check")
    assert check.rc == 0, check.stdout[-3000:]
    assert check.changed == 0


def test_launch_tiny_preset_two_ranks(train_python):
    run_id = _run_id("tiny")
    result = run_playbook("launch.yml", {"run_id": run_id, "max_steps": 200, "poll_interval": 2})
    assert result.rc == 0, result.stdout[-5000:]
    summary = load_summary(run_id)
    assert summary["world_size"] == 2
    assert [h["name"] for h in summary["hosts"]] == ["localhost"]
    assert summary["steps"] == 200
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["tokens_per_s"] > 0
    run_dir = RUNS / run_id
    for name in ("plan.json", "hostfile", "ds_config.json", ".deepspeed_env", "metrics.jsonl", "logs/localhost.log"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "hostfile").read_text().splitlines()[-1] == "localhost slots=2"
    ds_config = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_config["train_batch_size"] == 4 * 2 and ds_config["zero_optimization"]["stage"] == 2
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in steps if m["event"] == "step") == 200
    # progress was shown while it ran, and the summary table at the end
    assert "step " in result.stdout and "/200  loss" in result.stdout
    assert "summary: %s" % (run_dir / "summary.json") in result.stdout
    # the checkpoint exists and the export loads back with transformers
    assert pathlib.Path(summary["checkpoint_dir"]).is_dir()
    probe = subprocess.run(
        [train_python, "-c", "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
         "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]);"
         "ids = t('the weather', return_tensors='pt').input_ids;"
         "print(m.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1])", summary["export_dir"]],
        capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().splitlines()[-1] == "4"
    _assert_no_process_left(train_python, summary["host_run_dir"])
    # DeepSpeed's CPU all-reduce never unlinks its /dev/shm segments (~69 MB of RAM per rank per run): the host's
    # supervisor removes them when the ranks are gone
    port = json.loads((run_dir / "plan.json").read_text())["master"]["port"]
    pattern = "deepspeed_allreduce_buffer_%d_*_%d_*" % (os.getuid(), port)
    deadline = time.time() + 20
    while list(pathlib.Path("/dev/shm").glob(pattern)) and time.time() < deadline:
        time.sleep(0.5)
    assert list(pathlib.Path("/dev/shm").glob(pattern)) == []
    node_log = (pathlib.Path(summary["host_run_dir"]) / "node.log").read_text()
    assert "dsfleet_node: removed 2 shared-memory segment(s) of finished DeepSpeed runs" in node_log, node_log[-2000:]


def _assert_no_process_left(python, host_run_dir):
    node = pathlib.Path.home() / ".dsfleet" / "code" / "dsfleet_node.py"
    out = subprocess.run([python, str(node), "ps", "--run-dir", host_run_dir], capture_output=True, text=True)
    assert json.loads(out.stdout)["pids"] == []


@pytest.mark.parametrize("extravars,message", [
    ({"model": "gpt7"}, "gpt7"),
    ({"model": "/no/such/model-dir"}, "/no/such/model-dir"),
    ({"dataset": "/no/such/corpus.txt"}, "/no/such/corpus.txt"),
    ({"max_steps": 0}, "max_steps=0 must be >= 1"),
    ({"accelerator": "tpu"}, "accelerator='tpu' is not one of"),
    ({"precision": "fp16"}, "fp16 is not supported by DeepSpeed on CPU"),
    ({"launcher": "mpi"}, "launcher='mpi' is not one of"),
    ({"dsfleet_venv": "/no/such/venv"}, "localhost has no dsfleet python environment at /no/such/venv; run "
                                        "`ansible-playbook setup.yml`"),
])
def test_bad_input_fails_before_training_with_the_fix(train_python, extravars, message):
    run_id = _run_id("bad")
    result = run_playbook("launch.yml", dict(extravars, run_id=run_id))
    assert result.rc != 0
    assert any(message in f for f in result.failures), result.failures
    assert not (RUNS / run_id / "logs").exists()  # nothing was started


def test_empty_dataset_is_refused(train_python, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = run_playbook("launch.yml", {"run_id": _run_id("empty"), "dataset": str(empty)})
    assert result.rc != 0
    assert any(str(empty) in f and "dsfleet-train: error" in f for f in result.failures), result.failures


def test_venv_path_that_is_not_a_venv_is_refused(setup_result, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_playbook("setup.yml", {"python_env_path": str(tmp_path)})
    assert result.rc != 0
    assert any("is not a Python virtual environment" in f for f in result.failures), result.failures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_taken_master_port_fails_fast(train_python):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        s.listen(1)
        port = s.getsockname()[1]
        if port < 1024:
            pytest.skip("ephemeral port below 1024")
        start = time.monotonic()
        result = run_playbook("launch.yml", {"run_id": _run_id("port"), "master_port": port})
    assert result.rc != 0
    assert any("port %d is already in use" % port in f and "master_port" in f for f in result.failures)
    assert time.monotonic() - start < 60


def _kill_a_rank_when_training(run_id, sig, found):
    """Wait for the first step of run_id, then send sig to one training rank (a real crash or stall)."""
    metrics = pathlib.Path.home() / ".dsfleet" / "runs" / run_id / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and '"event": "step"' in metrics.read_text():  # rank 0 writes json.dumps lines
            break
        time.sleep(0.5)
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = pathlib.Path("/proc/%d/cmdline" % pid).read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"train.py" in c for c in cmdline) and b"--local_rank=1" in cmdline and run_id.encode() in b" ".join(
                cmdline):
            os.kill(pid, sig)
            found.append(pid)
            return


@pytest.mark.parametrize("sig,reason", [
    (signal.SIGKILL, "training exited with code"),
    (signal.SIGSTOP, "no progress for"),
])
def test_a_failed_or_stalled_rank_stops_everything(train_python, sig, reason):
    run_id = _run_id("fail")
    found = []
    killer = threading.Thread(target=_kill_a_rank_when_training, args=(run_id, sig, found), daemon=True)
    killer.start()
    start = time.monotonic()
    result = run_playbook("launch.yml", {"run_id": run_id, "max_steps": 100000, "stall_timeout": 15,
                                         "poll_interval": 2})
    killer.join(timeout=5)
    assert found, "never saw rank 1 of the run"
    assert result.rc != 0
    assert any("training failed on localhost" in f and reason in f for f in result.failures), result.failures
    assert (RUNS / run_id / "logs" / "localhost.log").is_file()
    assert time.monotonic() - start < 240
    host_run_dir = str(pathlib.Path.home() / ".dsfleet" / "runs" / run_id)
    _assert_no_process_left(train_python, host_run_dir)
    for pid in found:
        assert not pathlib.Path("/proc/%d" % pid).exists() or "Z" in pathlib.Path(
            "/proc/%d/stat" % pid).read_text().rsplit(")", 1)[1].split()[0]
