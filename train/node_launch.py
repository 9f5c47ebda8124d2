#!/usr/bin/env python3
"""One host's DeepSpeed ranks, started the way DeepSpeed's node launcher (`python -m deepspeed.launcher.launch`)
starts them, without importing deepspeed and torch first.

    node_launch.py --world_info=B64 --master_addr=A --master_port=P --node_rank=N train.py [args...]

launch.py imports deepspeed (and with it torch: 4-6 s of CPU per host, measured on the rig) only to set a few
environment variables and spawn the ranks, which import both again themselves. This does the same from the
standard library, argument for argument and variable for variable (tests/e2e/test_launcher_args.py runs both and
compares what each rank receives):
  - --world_info: {host address: [device indices]} in urlsafe base64, hosts in node-rank order;
  - each rank gets MASTER_ADDR, MASTER_PORT, WORLD_SIZE, CROSS_RANK (the node rank), CROSS_SIZE (the nodes),
    LOCAL_SIZE, RANK and LOCAL_RANK, the accelerator's visible-devices variable set to this host's device indices
    (DeepSpeed's accelerator for DS_ACCELERATOR: cuda and cpu set CUDA_VISIBLE_DEVICES, xpu ZE_AFFINITY_MASK) and
    the command `python -u SCRIPT --local_rank=L ARGS...`;
  - a rank that exits non-zero stops the others (SIGTERM, SIGKILL after 30 s) and its code is the launcher's.
One deliberate difference: on SIGTERM or SIGINT (stop.yml, a scheduler, a shutdown) launch.py kills a rank that
has not exited 30 s later, before it may have finished the checkpoint train.py writes on SIGTERM; this passes the
signal on and waits, and the dsfleet supervisor, which started this launcher, enforces the run's grace.
"""
import base64
import json
import os
import signal
import subprocess
import sys
import time

# DeepSpeed's accelerators' visible_devices_envs() (deepspeed/accelerator/*_accelerator.py), for the DS_ACCELERATOR
# values the plan sets (ROCm runs under cuda)
VISIBLE_DEVICES = {"cuda": "CUDA_VISIBLE_DEVICES", "cpu": "CUDA_VISIBLE_DEVICES", "xpu": "ZE_AFFINITY_MASK"}
KILL_AFTER = 30.0


def log(msg):
    print("[node_launch] %s" % msg, flush=True)


def parse(argv):
    opts, rest = {}, list(argv)
    while rest and rest[0].startswith("--"):
        key, sep, value = rest.pop(0)[2:].partition("=")
        if not sep:
            if not rest:
                sys.exit("node_launch: --%s needs a value" % key)
            value = rest.pop(0)
        opts[key] = value
    missing = [k for k in ("world_info", "master_addr", "master_port", "node_rank") if k not in opts]
    unknown = sorted(set(opts) - {"world_info", "master_addr", "master_port", "node_rank"})
    if missing or unknown or not rest:
        sys.exit("node_launch: usage: --world_info=B64 --master_addr=A --master_port=P --node_rank=N SCRIPT "
                 "[ARGS...] (%s)" % ("missing --" + ", --".join(missing) if missing else
                                     "unknown --" + ", --".join(unknown) if unknown else "no script"))
    return opts, rest[0], rest[1:]


def rank_commands(opts, script, args, environ):
    """[(argv, env)] for each of this host's ranks: what launch.py spawns."""
    world = json.loads(base64.urlsafe_b64decode(opts["world_info"]))
    nodes = list(world)
    node_rank = int(opts["node_rank"])
    devices = world[nodes[node_rank]]
    first = sum(len(world[n]) for n in nodes[:node_rank])
    env = dict(environ)
    # `import deepspeed` sets this in launch.py's environment (deepspeed/__init__.py), which the ranks inherit:
    # torch then asks NVML, not the CUDA runtime, whether CUDA is there (no CUDA context in the launcher)
    env.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    accelerator = environ.get("DS_ACCELERATOR", "cuda")
    if accelerator not in VISIBLE_DEVICES:
        sys.exit("node_launch: DS_ACCELERATOR=%s is not one the dsfleet plan sets (%s); start this host with "
                 "`python -m deepspeed.launcher.launch` and the same arguments instead"
                 % (accelerator, ", ".join(sorted(VISIBLE_DEVICES))))
    env[VISIBLE_DEVICES[accelerator]] = ",".join(map(str, devices))
    env.update({"MASTER_ADDR": opts["master_addr"], "MASTER_PORT": str(int(opts["master_port"])),
                "WORLD_SIZE": str(sum(len(world[n]) for n in nodes)), "CROSS_RANK": str(node_rank),
                "CROSS_SIZE": str(len(nodes)), "LOCAL_SIZE": str(len(devices))})
    out = []
    for local in range(len(devices)):
        rank = first + local
        # launch.py's own arithmetic (the rank modulo this host's count, the same as local here)
        local_rank = rank % len(devices)
        out.append(([sys.executable, "-u", script, "--local_rank=%d" % local_rank] + list(args),
                    dict(env, RANK=str(rank), LOCAL_RANK=str(local_rank))))
    return out


def stop(procs, sig=signal.SIGTERM, kill_after=KILL_AFTER):
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    if kill_after is None:
        return
    deadline = time.time() + kill_after
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv):
    opts, script, args = parse(argv)
    procs = []
    for cmd, env in rank_commands(opts, script, args, os.environ):
        procs.append(subprocess.Popen(cmd, env=env))
        log("rank %s (local %s) pid %d: %s" % (env["RANK"], env["LOCAL_RANK"], procs[-1].pid, " ".join(cmd)))
    signalled = []

    def on_signal(signum, _frame):
        signalled.append(signum)
        log("got %s: passing it to the ranks" % signal.Signals(signum).name)
        stop(procs, signum, kill_after=None)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    alive = list(procs)
    while alive:
        for p in list(alive):
            rc = p.poll()
            if rc is None:
                continue
            alive.remove(p)
            if rc != 0 and not signalled:
                log("rank pid %d exited with code %d: stopping the others" % (p.pid, rc))
                stop(alive)
                return _code(rc)
        time.sleep(0.2)
    # after a signal: the first rank's code that is not 0 (a rank killed by signal S: 128 + S)
    return next((_code(p.returncode) for p in procs if p.returncode), 0)


def _code(rc):
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
