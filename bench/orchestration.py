#!/usr/bin/env python3
"""How much time does dsfleet's orchestration cost? Measured on network-namespace hosts (root needed).

    .venv/bin/python bench/orchestration.py --hosts 3            # setup twice, launch vs raw DeepSpeed
    .venv/bin/python bench/orchestration.py --hosts 8 --setup-only

For N hosts built by tests/rig/rig.py (own sshd each, CPU, one rank per host):
  setup_first_s     setup.yml on fresh hosts (wheelhouse already built on the controller)
  setup_noop_s      setup.yml again: nothing to change (pipelining, ControlPersist, one pin check per host)
  launch_first_step launch.yml started -> first training step recorded by rank 0 (facts, plan, staging,
                    preflight, start); the op cache is warm
  raw_first_step    `deepspeed --hostfile --launcher pdsh` started by hand over ssh on h1 with the same
                    hostfile, ds_config and .deepspeed_env -> first training step
Each launch measurement is repeated (--repeat) and the median is printed. Results go to bench/results/.
"""

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "rig"))
import rig as rigmod  # noqa: E402

WORK = ROOT / "tests" / ".work"


def playbook(inventory, name, extra, env=None):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(extra, f)
    cmd = [str(pathlib.Path(sys.executable).with_name("ansible-playbook")), "-i", inventory, name, "-e", "@" + f.name]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), **(env or {})))
    os.unlink(f.name)
    if proc.returncode != 0:
        sys.exit("%s failed:\n%s" % (name, proc.stdout[-4000:]))
    return time.time() - start, proc.stdout


def first_step_time(metrics, deadline):
    while time.time() < deadline:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                record = json.loads(line)
                if record.get("event") == "step":
                    return record["time"]
        time.sleep(0.1)
    raise SystemExit("no training step in %s" % metrics)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--setup-only", action="store_true")
    args = parser.parse_args()
    # a SIGTERM still tears the hosts down (the finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))

    base = {"python_env_python": "/usr/bin/python3", "python_env_wheelhouse": str(WORK / "wheelhouse"),
            "python_env_wheelhouse_build": True, "python_env_wheelhouse_python": "/usr/bin/python3",
            # the default poll_interval (5 s), what users run: at 1 s the follower's polls (an SSH exec per host per
            # second) took ~6 s from the ranks' start here, where every host shares the controller's 2 cores
            "cpu_ranks": 1, "max_steps": 20,
            "extra_env": {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": "/var/tmp/dsfleet-test-torch-extensions"}}
    state = tempfile.mkdtemp(prefix="dsfleet-bench-")
    rig = rigmod.create(state, hosts=args.hosts, prefix="dsfbn", subnet="10.177.62.0/24")
    results = {"hosts": args.hosts, "machine": "%d cores" % os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    try:
        results["setup_first_s"], _ = playbook(rig.inventory, "setup.yml", base)
        results["setup_noop_s"], out = playbook(rig.inventory, "setup.yml", base)
        assert "changed=0" in out and "changed=1" not in out, out[-3000:]
        if not args.setup_only:
            # one launch to warm the op cache and the page cache, not counted (its own id: a finished run's id,
            # as a fixed "bench-warm" was from the bench before, ends the play at once and warms nothing)
            playbook(rig.inventory, "launch.yml", dict(base, run_id="bench-warm-%d" % os.getpid()))
            launch, raw = [], []
            h1_runs = pathlib.Path(rig.host_dir("h1", "root")) / ".dsfleet" / "runs"
            for i in range(args.repeat):
                run_id = "bench-%d-%d" % (os.getpid(), i)
                start = time.time()
                playbook(rig.inventory, "launch.yml", dict(base, run_id=run_id))
                launch.append(first_step_time(h1_runs / run_id / "out" / "metrics.jsonl", time.time() + 10) - start)

                # the same job by hand: DeepSpeed's pdsh runner on h1 with the files dsfleet rendered
                # (pdsh runs `cd <cwd>` on every worker: the directory must exist on each host)
                raw_id = "raw-%d-%d" % (os.getpid(), i)
                for host in rig.names:
                    hd = pathlib.Path(rig.host_dir(host, "root")) / ".dsfleet" / "runs" / raw_id
                    (hd / "out").mkdir(parents=True)
                    for name in ("hostfile", "ds_config.json", ".deepspeed_env"):
                        (hd / name).write_text((ROOT / "runs" / run_id / name).read_text())
                rd = h1_runs / raw_id
                plan = json.loads((ROOT / "runs" / run_id / "plan.json").read_text())
                home = "/root/.dsfleet"
                cmd = ("cd %s/runs/%s && %s/venv/bin/deepspeed --hostfile hostfile --launcher pdsh --master_addr %s "
                       "--master_port %d %s/code/train/train.py --deepspeed_config ds_config.json --output_dir out "
                       "--max_steps 20" % (home, raw_id, home, plan["master"]["address"], plan["master"]["port"],
                                           home))
                start = time.time()
                proc = subprocess.Popen(rig.ssh_cmd("h1", cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                raw.append(first_step_time(rd / "out" / "metrics.jsonl", time.time() + 300) - start)
                proc.wait(timeout=300)
            results["launch_first_step_s"] = round(statistics.median(launch), 1)
            results["raw_first_step_s"] = round(statistics.median(raw), 1)
            results["launch_samples"] = [round(x, 1) for x in launch]
            results["raw_samples"] = [round(x, 1) for x in raw]
    finally:
        rigmod.destroy(state)
    results = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in results.items()}
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / ("orchestration-%dhosts.json" % args.hosts)).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
