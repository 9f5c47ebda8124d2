"""train/node_launch.py, the torch-free twin of DeepSpeed's launch.py that starts a host's ranks: a failed rank stops
the others and its code is the launcher's; SIGTERM reaches every rank, and the launcher waits for their checkpoint
instead of killing them; bad arguments fail naming the fix. (What each rank receives is compared with the real
launch.py in tests/e2e/test_launcher_args.py.)"""
import base64
import json
import os
import signal
import subprocess
import sys
import time

from helpers import ROOT

LAUNCH = str(ROOT / "train" / "node_launch.py")

# a rank: records its start; on SIGTERM waits TERM_S (a checkpoint) and exits 0; RANK_RC[rank] >= 0 exits at once
RANK = r"""
import os, signal, sys, time
out, rank = os.environ["OUT"], os.environ["RANK"]
def term(*_):
    time.sleep(float(os.environ.get("TERM_S", "0")))
    open(os.path.join(out, "term%s" % rank), "w").write("1")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
open(os.path.join(out, "up%s" % rank), "w").write(str(os.getpid()))
code = int(os.environ.get("RC%s" % rank, "-1"))
if code >= 0:
    time.sleep(0.5)
    sys.exit(code)
time.sleep(60)
"""


def world(**hosts):
    return base64.urlsafe_b64encode(json.dumps(hosts).encode()).decode()


def start(tmp_path, env=None, node_rank=1, info=None):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    info = info or world(**{"10.0.0.1": [0, 1], "10.0.0.2": [0, 1]})
    argv = [sys.executable, "-u", LAUNCH, "--world_info=" + info, "--master_addr=10.0.0.1", "--master_port=29500",
            "--node_rank=%d" % node_rank, str(script)]
    return subprocess.Popen(argv, env=dict(os.environ, OUT=str(tmp_path), **dict({"DS_ACCELERATOR": "cpu"}, **(env or {}))),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(paths, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(p.exists() for p in paths):
            return
        time.sleep(0.05)
    raise AssertionError("never appeared: %s" % [str(p) for p in paths if not p.exists()])


def test_a_failed_rank_stops_the_others_and_its_code_is_the_launchers(tmp_path):
    proc = start(tmp_path, env={"RC3": "3"})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    # node 1 of two 2-rank nodes holds ranks 2 and 3; rank 2 was stopped by SIGTERM
    assert (tmp_path / "up2").exists() and (tmp_path / "term2").exists(), out
    assert "rank pid %s exited with code 3: stopping the others" % (tmp_path / "up3").read_text() in out


def test_sigterm_reaches_every_rank_and_the_launcher_waits_for_their_checkpoint(tmp_path):
    proc = start(tmp_path, env={"TERM_S": "2"})
    wait_for([tmp_path / "up2", tmp_path / "up3"])
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    # both ranks finished their 2 s "checkpoint"; the launcher ended after them, not before
    assert (tmp_path / "term2").exists() and (tmp_path / "term3").exists(), out
    assert time.time() - sent >= 2.0
    assert "got SIGTERM: passing it to the ranks" in out


def test_bad_arguments_fail_naming_the_fix(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    missing = subprocess.run([sys.executable, LAUNCH, "--world_info=" + world(a=[0]), str(script)],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "missing --master_addr, --master_port, --node_rank" in missing.stderr
    proc = start(tmp_path, env={"DS_ACCELERATOR": "hpu"})
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "DS_ACCELERATOR=hpu is not one the dsfleet plan sets (cpu, cuda, xpu)" in out
    assert not (tmp_path / "up2").exists()
