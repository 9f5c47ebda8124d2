#!/usr/bin/env python3
"""Follow a real run for a long time and record the controller's memory: the follow loop must stay flat.

    .venv/bin/python bench/soak.py --minutes 32            # this machine, the tiny preset, 1 CPU rank

Starts a detached run on the embedded default inventory (launch.yml -e follow=false, a step count it cannot
finish), follows it with playbooks/follow.yml, samples the follower's RSS (the ansible-playbook process, by PID)
and the number of progress lines every --every seconds, then stops the run with playbooks/stop.yml (every rank
checkpoints). Results: bench/results/soak.json (samples, first/last/max RSS, polls).
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
DSFLEET = str(ROOT / "dsfleet")


def rss_kib(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every", type=float, default=30, help="seconds between samples")
    parser.add_argument("--poll-interval", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=1, help="CPU ranks (one thread each; 1 leaves a core free)")
    parser.add_argument("--nice", type=int, default=19,
                        help="niceness of the launch (the ranks inherit it): the soak yields the CPU to other work")
    args = parser.parse_args()
    run_id = "soak-%s" % uuid.uuid4().hex[:6]
    subprocess.run(["nice", "-n", str(args.nice), DSFLEET, "launch.yml", "-e", "run_id=" + run_id, "-e", "follow=false", "-e", "max_steps=100000000",
                    "-e", "save_every_minutes=10", "-e", "poll_interval=%d" % args.poll_interval,
                    "-e", "cpu_ranks=%d" % args.ranks, "-e", json.dumps({"extra_env": {"OMP_NUM_THREADS": "1"}})],
                   check=True,
                   stdout=subprocess.DEVNULL)
    log = open(ROOT / "bench" / "results" / ("%s.log" % run_id), "w")
    follower = subprocess.Popen([DSFLEET, "playbooks/follow.yml", "-e", "run_id=" + run_id], stdout=log,
                                stderr=subprocess.STDOUT)
    samples, start = [], time.time()
    try:
        while time.time() - start < args.minutes * 60 and follower.poll() is None:
            time.sleep(args.every)
            lines = (ROOT / "bench" / "results" / ("%s.log" % run_id)).read_text().count("] step ")
            samples.append({"t_s": round(time.time() - start), "rss_kib": rss_kib(follower.pid), "polls": lines})
            print(samples[-1], flush=True)
    finally:
        subprocess.run([DSFLEET, "playbooks/stop.yml", "-e", "run_id=" + run_id], stdout=subprocess.DEVNULL)
        follower.wait(timeout=600)
    rss = [s["rss_kib"] for s in samples if s["rss_kib"]]
    result = {"run_id": run_id, "minutes": args.minutes, "poll_interval_s": args.poll_interval, "ranks": args.ranks,
              "nice": args.nice,
              "polls": samples[-1]["polls"] if samples else 0, "rss_first_kib": rss[0] if rss else None,
              "rss_last_kib": rss[-1] if rss else None, "rss_max_kib": max(rss) if rss else None, "samples": samples}
    out = ROOT / "bench" / "results" / "soak.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    os.unlink(ROOT / "bench" / "results" / ("%s.log" % run_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
