"""The files a run's hosts read, rendered from the one plan (pure; the dsfleet_render action writes them).

    files(plan) -> {"plan.json", "hostfile", "ds_config.json", ".deepspeed_env", "replicas.json": text}
"""
from __future__ import annotations

import json

FILES = ("plan.json", "hostfile", "ds_config.json", ".deepspeed_env", "replicas.json")


def _json(value):
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def hostfile(plan):
    """DeepSpeed's hostfile: one `address slots=N` line per host, rank 0's host first."""
    lines = ["# DeepSpeed hostfile for dsfleet run %s: %d rank(s) on %d host(s), %s"
             % (plan["run_id"], plan["world_size"], plan["nodes"], plan["accelerator"]),
             "# Rank 0 lives on the first host (%s); hosts are named as the launcher reaches them."
             % plan["master"]["name"]]
    lines += ["%s slots=%d" % (h["address"], h["slots"]) for h in plan["hosts"]]
    return "\n".join(lines) + "\n"


def deepspeed_env(plan):
    """What DeepSpeed's pdsh runner exports on every worker. One KEY=VALUE a line, no comments or blank lines: the
    runner splits each line once at "=" and would break on anything else."""
    for key, value in plan["deepspeed_env"].items():
        if "\n" in str(value) or "=" in key:
            raise ValueError("deepspeed_env %s cannot be written as one KEY=VALUE line" % key)
    return "".join("%s=%s\n" % (k, v) for k, v in sorted(plan["deepspeed_env"].items()))


def files(plan):
    return {"plan.json": _json(plan), "hostfile": hostfile(plan), "ds_config.json": _json(plan["ds_config"]),
            ".deepspeed_env": deepspeed_env(plan), "replicas.json": _json(plan["replicas"])}


def started(plan):
    """started.json: the layout whose ranks started; a later resume on another layout converts the checkpoint."""
    return _json(plan["layout"])
