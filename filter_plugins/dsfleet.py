# -*- coding: utf-8 -*-
"""dsfleet filters: the cluster plan and what is derived from it.

Data flows one way: facts -> plan -> files -> processes -> results.

``dsfleet_plan(hosts, knobs)`` is the only place where decisions are made: which hosts take part and with how many
ranks, which accelerator, backend, precision, master address and port, network interfaces, batch sizes and the
training arguments.  Every template and command renders from the dict it returns.  It is a pure function (no I/O,
no clock), so it is tested with tables of clusters in tests/unit/test_plan.py.

A host record (built per host by playbooks/plan.yml from facts) looks like::

    {"name": "gpu1", "address": "10.0.0.11", "local": false, "reachable": true,
     "gpu": <ansible_facts.dsfleet_gpu from the gpu_facts module>,
     "interfaces": [{"name": "eth0", "ipv4": ["10.0.0.11/24"]}],
     "slots": null, "ifname": null, "python": "/root/.dsfleet/venv/bin/python", "home": "/root/.dsfleet"}
"""

from __future__ import annotations

import ipaddress
import json
import math

try:  # Ansible is only needed when loaded as a plugin; unit tests import this file directly too.
    from ansible.errors import AnsibleFilterError
except ImportError:  # pragma: no cover - exercised only without ansible-core installed
    class AnsibleFilterError(Exception):
        """Stand-in when ansible-core is not importable."""


PLAN_VERSION = 1
VENDORS = ("nvidia", "amd", "intel")
ACCELERATORS = ("auto",) + VENDORS + ("cpu",)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
LAUNCHERS = ("ansible", "pdsh")
# vendor -> (torch.distributed backend, DS_ACCELERATOR, the socket-ifname variable its library reads)
BACKENDS = {
    "nvidia": ("nccl", "cuda", "NCCL_SOCKET_IFNAME"),
    "amd": ("nccl", "cuda", "NCCL_SOCKET_IFNAME"),  # RCCL answers to the nccl backend on ROCm builds of torch
    "intel": ("xccl", "xpu", "CCL_SOCKET_IFNAME"),
    "cpu": ("gloo", "cpu", "GLOO_SOCKET_IFNAME"),
}
VISIBLE_DEVICES_VAR = {"nvidia": "CUDA_VISIBLE_DEVICES", "amd": "HIP_VISIBLE_DEVICES", "intel": "ZE_AFFINITY_MASK"}

# Every knob a user may set (-e name=value or inventory group_vars), its type and default.
# The README's knob table and inventory/example/group_vars/all/dsfleet.yml list the same names.
KNOBS = {
    "model": (str, "tiny"),
    "dataset": (str, "bundled"),
    "text_field": (str, "text"),
    "max_steps": (int, 50),
    "epochs": (int, 0),
    "block_size": (int, 128),
    "micro_batch": (int, 4),
    "grad_accum": (int, 1),
    "lr": (float, 3e-4),
    "warmup_steps": (int, 0),
    "seed": (int, 1234),
    "zero_stage": (int, 2),
    "offload": (str, "none"),
    "precision": (str, "auto"),
    "accelerator": (str, "auto"),
    "cpu_ranks": (int, 2),
    "exclude": (list, []),
    "master": (str, ""),
    "master_port": (int, 29500),
    "launcher": (str, "ansible"),
    "run_id": (str, ""),
    "require_all_hosts": (bool, True),
    "extra_env": (dict, {}),
    "log_every": (int, 1),
    "save_every": (int, 0),
    "poll_interval": (int, 5),
    "stall_timeout": (int, 300),
    "startup_timeout": (int, 600),
}
CHOICES = {
    "precision": PRECISIONS,
    "accelerator": ACCELERATORS,
    "launcher": LAUNCHERS,
    "offload": ("none", "cpu"),
    "zero_stage": (0, 1, 2, 3),
}
MINIMUM = {"max_steps": 1, "block_size": 8, "micro_batch": 1, "grad_accum": 1, "cpu_ranks": 1, "log_every": 1,
           "poll_interval": 1, "stall_timeout": 10, "startup_timeout": 10, "epochs": 0, "save_every": 0,
           "warmup_steps": 0, "master_port": 1024}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", list: "a list (or a,b,c)",
              dict: "a mapping", str: "a string"}


def _fail(msg):
    raise AnsibleFilterError("dsfleet plan: " + msg)


def _coerce(name, kind, value):
    """Extra vars arrive as strings (-e max_steps=10); turn them into the knob's type or fail naming the knob."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is list:
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    elif kind is dict:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                return _coerce(name, dict, json.loads(value))
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    _fail("knob %s=%r must be %s; fix the value passed with -e %s=... or in group_vars"
          % (name, value, TYPE_NAMES[kind], name))


def normalize_knobs(knobs):
    """Validate the user's knobs against KNOBS: unknown names and wrong types are errors, never silent defaults."""
    knobs = dict(knobs or {})
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        _fail("unknown knob(s) %s; known knobs are: %s" % (", ".join(unknown), ", ".join(sorted(KNOBS))))
    out = {}
    for name, (kind, default) in KNOBS.items():
        value = knobs.get(name)
        out[name] = default if value is None else _coerce(name, kind, value)
    for name, allowed in CHOICES.items():
        if out[name] not in allowed:
            _fail("%s=%r is not one of %s; pass one of them, e.g. -e %s=%s"
                  % (name, out[name], ", ".join(map(str, allowed)), name, allowed[0]))
    for name, low in MINIMUM.items():
        if out[name] < low:
            _fail("%s=%s must be >= %s; pass a larger value (-e %s=...)" % (name, out[name], low, name))
    if out["lr"] <= 0:
        _fail("lr=%s must be > 0" % out["lr"])
    if out["master_port"] > 65535:
        _fail("master_port=%s is not a TCP port; pass 1024..65535" % out["master_port"])
    if not out["model"].strip():
        _fail("model is empty; pass -e model=tiny, a local directory or a hub id")
    return out


def _networks(host):
    """Every IPv4 interface network of a host as (ifname, IPv4Interface)."""
    nets = []
    for iface in host.get("interfaces") or []:
        for cidr in iface.get("ipv4") or []:
            try:
                nets.append((iface["name"], ipaddress.IPv4Interface(cidr)))
            except (ValueError, KeyError):
                continue
    return nets


def _as_ip(value):
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        return None


def _is_local_only(hosts):
    return len(hosts) == 1 and (hosts[0].get("local") or str(hosts[0].get("address")) in LOOPBACK_NAMES)


def choose_master_address(master, others):
    """An address of ``master`` that the ``others`` reach, and the master's interface carrying it.

    Prefer the master's interface whose network holds most of the other hosts' addresses; else the master's
    own inventory address if it is one of its interface addresses.  Never ``ansible_default_ipv4`` blindly.
    """
    nets = [(n, i) for n, i in _networks(master) if not i.ip.is_loopback]
    other_ips = [ip for ip in (_as_ip(h.get("address")) for h in others) if ip is not None]
    best, best_count = None, 0
    for name, iface in nets:
        count = sum(1 for ip in other_ips if ip in iface.network)
        if count > best_count:
            best, best_count = (name, iface), count
    if best is not None:
        return str(best[1].ip), best[0]
    own = _as_ip(master.get("address"))
    for name, iface in nets:
        if own is not None and iface.ip == own:
            return str(own), name
    _fail("cannot find an address of master host %s that the other hosts (%s) reach: none of its interfaces "
          "(%s) shares a network with their addresses; set ansible_host of every host to an IP address on the "
          "cluster network, or pick another master with -e master=HOST"
          % (master["name"], ", ".join(h["name"] for h in others),
             ", ".join("%s %s" % (n, i.with_prefixlen) for n, i in nets) or "none"))


def host_ifname(host, master_ip):
    """The interface of ``host`` whose network routes to the master address (an ifname host var wins)."""
    if host.get("ifname"):
        return str(host["ifname"])
    ip = ipaddress.IPv4Address(master_ip)
    for name, iface in _networks(host):
        if ip in iface.network:
            return name
    _fail("host %s has no interface on the network of master address %s (its interfaces: %s); connect it to "
          "that network, set `ifname` in its host vars, or exclude it with -e exclude=%s"
          % (host["name"], master_ip, ", ".join("%s %s" % (n, i.with_prefixlen) for n, i in _networks(host))
             or "none", host["name"]))


def _group_of(host):
    gpu = host.get("gpu") or {}
    acc = gpu.get("accelerator") or "cpu"
    return acc if (acc in VENDORS and gpu.get("gpus")) else "cpu"


def _devices(host, accelerator, cpu_ranks):
    """(slots, device indices or None, device memory MiB per rank, bf16 ok, label) for a host in the plan."""
    gpu = host.get("gpu") or {}
    if accelerator == "cpu":
        cpu = gpu.get("cpu") or {}
        slots = int(host.get("slots") or cpu_ranks)
        memory = int(cpu.get("memory_mib") or 0) // max(slots, 1)
        return slots, None, memory, bool(cpu.get("bf16")), cpu.get("model") or "cpu"
    gpus = sorted(gpu.get("gpus") or [], key=lambda g: int(g["index"]))
    limit = host.get("slots")
    if limit:
        if int(limit) > len(gpus):
            _fail("host %s sets slots=%s but has only %d %s device(s); lower `slots` in its host vars"
                  % (host["name"], limit, len(gpus), accelerator))
        gpus = gpus[: int(limit)]
    names = sorted(set(g.get("name") or "?" for g in gpus))
    return (len(gpus), [int(g["index"]) for g in gpus], min(int(g.get("memory_mib") or 0) for g in gpus),
            all(bool(g.get("bf16")) for g in gpus), ", ".join(names))


def _precision(k, accelerator, chosen):
    all_bf16 = all(h["bf16"] for h in chosen)
    if k["precision"] == "auto":
        if all_bf16:
            return "bf16"
        return "fp32" if accelerator == "cpu" else "fp16"
    if k["precision"] == "bf16" and not all_bf16:
        bad = [h["name"] for h in chosen if not h["bf16"]]
        _fail("precision=bf16 but %s cannot run bf16 (%s); use -e precision=%s or exclude those hosts"
              % (", ".join(bad), "no avx512_bf16/amx on the CPU" if accelerator == "cpu"
                 else "compute capability < 8.0 or an older arch", "fp32" if accelerator == "cpu" else "fp16"))
    if k["precision"] == "fp16" and accelerator == "cpu":
        _fail("precision=fp16 is not supported by DeepSpeed on CPU; use -e precision=bf16 or fp32")
    return k["precision"]


def dsfleet_plan(hosts, knobs=None):
    """Compute the one cluster plan from host records and the user's knobs (see module docstring)."""
    k = normalize_knobs(knobs)
    if not hosts:
        _fail("the inventory has no host in group dsfleet; add hosts to inventory (see inventory/example)")
    names = [h["name"] for h in hosts]
    for name in k["exclude"]:
        if name not in names:
            _fail("exclude names %s, which is not in the inventory (hosts: %s); fix -e exclude=..."
                  % (name, ", ".join(names)))

    excluded, candidates = [], []
    for host in hosts:
        if host["name"] in k["exclude"]:
            excluded.append({"name": host["name"], "reason": "excluded by the user (exclude=)"})
        elif not host.get("reachable", True) or not host.get("gpu"):
            if k["require_all_hosts"]:
                _fail("host %s is unreachable or returned no facts; check that it is up and that `ssh %s` works "
                      "(run setup.yml), or leave it out with -e exclude=%s (or -e require_all_hosts=false)"
                      % (host["name"], host.get("address") or host["name"], host["name"]))
            excluded.append({"name": host["name"], "reason": "unreachable (no facts gathered)"})
        else:
            candidates.append(host)
    if not candidates:
        _fail("every host is excluded or unreachable (%s); nothing to train on — remove hosts from exclude="
              % ", ".join("%s: %s" % (e["name"], e["reason"]) for e in excluded))

    # Choose the accelerator: the vendor group with the most total accelerator memory, unless the user chose.
    groups = {}
    for host in candidates:
        groups.setdefault(_group_of(host), []).append(host)
    memory = {v: sum(int(g.get("memory_mib") or 0) for h in groups.get(v, []) for g in h["gpu"]["gpus"])
              for v in VENDORS}
    if k["accelerator"] == "auto":
        gpu_vendors = [v for v in VENDORS if groups.get(v)]
        accelerator = max(gpu_vendors, key=lambda v: (memory[v], -VENDORS.index(v))) if gpu_vendors else "cpu"
    else:
        accelerator = k["accelerator"]
        if accelerator != "cpu" and not groups.get(accelerator):
            _fail("accelerator=%s but no reachable, non-excluded host has a %s device (found: %s); pick another "
                  "with -e accelerator=..., or auto" % (accelerator, accelerator, ", ".join(
                      "%s: %s" % (h["name"], _group_of(h)) for h in candidates)))
    if accelerator == "cpu":
        members = list(candidates)
    else:
        members = groups[accelerator]
        for host in candidates:
            if host not in members:
                group = _group_of(host)
                excluded.append({"name": host["name"], "reason": (
                    "no accelerator (CPU only); the plan uses %s" % accelerator if group == "cpu" else
                    "%s devices; the plan uses %s (one job cannot mix vendors' collectives)" % (group, accelerator))})

    # Order: the chosen master first (rank 0 lives there), then inventory order.
    if k["master"]:
        if k["master"] not in [h["name"] for h in members]:
            _fail("master=%s is not one of the hosts taking part (%s)"
                  % (k["master"], ", ".join(h["name"] for h in members)))
        members = [h for h in members if h["name"] == k["master"]] + [h for h in members if h["name"] != k["master"]]

    seen = {}
    for host in members:
        addr = str(host.get("address") or host["name"])
        if addr in seen and len(members) > 1:
            _fail("hosts %s and %s resolve to the same address %s; give each its own ansible_host, or exclude one"
                  % (seen[addr], host["name"], addr))
        seen[addr] = host["name"]

    if k["launcher"] == "pdsh" and len(set(str(h.get("python")) for h in members)) > 1:
        _fail("launcher=pdsh runs the same command line on every host, but the venv paths differ (%s); set the "
              "same dsfleet_home for all hosts in group_vars, or use -e launcher=ansible"
              % ", ".join("%s: %s" % (h["name"], h.get("python")) for h in members))
    backend, ds_accelerator, ifname_var = BACKENDS[accelerator]
    if _is_local_only(members):
        master_addr, local = "127.0.0.1", True
    else:
        master_addr, _ = choose_master_address(members[0], members[1:])
        local = False

    plan_hosts, rank = [], 0
    for node_rank, host in enumerate(members):
        slots, devices, mem, bf16, label = _devices(host, accelerator, k["cpu_ranks"])
        ifname = "lo" if local and not host.get("ifname") else host_ifname(host, master_addr)
        cpu = (host.get("gpu") or {}).get("cpu") or {}
        env = {ifname_var: ifname}
        if host.get("ld_library_path"):
            env["LD_LIBRARY_PATH"] = str(host["ld_library_path"])
        if accelerator == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, int(cpu.get("cores") or 1) // slots))
        if accelerator == "nvidia" and ifname_var != "GLOO_SOCKET_IFNAME":
            env["GLOO_SOCKET_IFNAME"] = ifname  # torch also opens gloo groups (e.g. for CPU barriers)
        env.update(k["extra_env"])
        plan_hosts.append({
            "name": host["name"],
            "address": "localhost" if local else str(host.get("address") or host["name"]),
            "node_rank": node_rank,
            "slots": slots,
            "first_rank": rank,
            "devices": devices,
            "device_name": label,
            "memory_mib": mem,
            "bf16": bf16,
            "ifname": ifname,
            "env": env,
            "python": host.get("python"),
            "home": host.get("home"),
        })
        rank += slots
    if rank == 0:
        _fail("the chosen hosts offer no ranks; check `slots`/`gpus` host vars")
    precision = _precision(k, accelerator, plan_hosts)

    # DeepSpeed's --include keeps the exact device indices when a host's devices are not 0..n-1.
    include = None
    if accelerator != "cpu" and any(h["devices"] != list(range(h["slots"])) for h in plan_hosts):
        include = "@".join("%s:%s" % (h["address"], ",".join(map(str, h["devices"]))) for h in plan_hosts)

    ifnames = sorted(set(h["ifname"] for h in plan_hosts))
    warnings = []
    if len(ifnames) > 1:
        warnings.append("hosts use different interfaces (%s); the pdsh launcher's shared .deepspeed_env lists them "
                        "all, the ansible launcher sets each host's own" % ", ".join(ifnames))
    common_env = {ifname_var: ",".join(ifnames)}
    if members[0].get("ld_library_path"):
        common_env["LD_LIBRARY_PATH"] = str(members[0]["ld_library_path"])
    if accelerator == "cpu":
        common_env["OMP_NUM_THREADS"] = str(min(int(h["env"]["OMP_NUM_THREADS"]) for h in plan_hosts))
    if "GLOO_SOCKET_IFNAME" in plan_hosts[0]["env"]:
        common_env["GLOO_SOCKET_IFNAME"] = ",".join(ifnames)
    common_env.update(k["extra_env"])

    world = rank
    batch = {"micro": k["micro_batch"], "grad_accum": k["grad_accum"],
             "global": k["micro_batch"] * k["grad_accum"] * world}
    return {
        "version": PLAN_VERSION,
        "run_id": k["run_id"],
        "accelerator": accelerator,
        "ds_accelerator": ds_accelerator,
        "backend": backend,
        "precision": precision,
        "world_size": world,
        "nodes": len(plan_hosts),
        "uneven": len(set(h["slots"] for h in plan_hosts)) > 1,
        "master": {"name": plan_hosts[0]["name"], "address": master_addr, "port": k["master_port"]},
        "hosts": plan_hosts,
        "excluded": excluded,
        "min_device_memory_mib": min(h["memory_mib"] for h in plan_hosts),
        "include": include,
        "env": common_env,
        "launcher": k["launcher"],
        "zero": {"stage": k["zero_stage"], "offload": k["offload"]},
        "batch": batch,
        "training": {
            "model": k["model"], "dataset": k["dataset"], "text_field": k["text_field"],
            "max_steps": k["max_steps"], "epochs": k["epochs"], "block_size": k["block_size"], "lr": k["lr"],
            "warmup_steps": k["warmup_steps"], "seed": k["seed"], "log_every": k["log_every"],
            "save_every": k["save_every"],
        },
        "watch": {"poll_interval": k["poll_interval"], "stall_timeout": k["stall_timeout"],
                  "startup_timeout": k["startup_timeout"]},
        "warnings": warnings,
    }


def dsfleet_train_args(plan):
    """The training module's arguments, in order, from the plan."""
    t = plan["training"]
    args = ["--model", t["model"], "--dataset", t["dataset"], "--text_field", t["text_field"],
            "--max_steps", str(t["max_steps"]), "--block_size", str(t["block_size"]), "--lr", repr(t["lr"]),
            "--warmup_steps", str(t["warmup_steps"]), "--seed", str(t["seed"]), "--log_every", str(t["log_every"]),
            "--save_every", str(t["save_every"])]
    if t["epochs"]:
        args += ["--epochs", str(t["epochs"])]
    return args


def dsfleet_launch_args(plan, node_rank=None, hostfile="hostfile"):
    """DeepSpeed launcher arguments: per node (--no_ssh --node_rank) when node_rank is given, else the pdsh runner."""
    args = ["--hostfile", hostfile, "--master_addr", plan["master"]["address"],
            "--master_port", str(plan["master"]["port"])]
    if plan["include"]:
        args += ["--include", plan["include"]]
    if node_rank is None:
        args += ["--launcher", "pdsh"]
    else:
        args += ["--no_ssh", "--node_rank", str(node_rank)]
    return args


def dsfleet_plan_table(plan):
    """Lines a person reads: one per host, then the left-out hosts and the global choices."""
    rows = [("host", "address", "devices", "memory/rank", "slots", "ranks", "ifname")]
    for h in plan["hosts"]:
        rows.append((h["name"], h["address"], h["device_name"], "%d MiB" % h["memory_mib"], str(h["slots"]),
                     "%d-%d" % (h["first_rank"], h["first_rank"] + h["slots"] - 1), h["ifname"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for e in plan["excluded"]:
        lines.append("left out: %s — %s" % (e["name"], e["reason"]))
    lines.append("accelerator %s, backend %s, precision %s, world size %d on %d host(s), master %s:%d (%s), "
                 "launcher %s, ZeRO %d" % (plan["accelerator"], plan["backend"], plan["precision"],
                                           plan["world_size"], plan["nodes"], plan["master"]["address"],
                                           plan["master"]["port"], plan["master"]["name"], plan["launcher"],
                                           plan["zero"]["stage"]))
    lines += ["warning: " + w for w in plan["warnings"]]
    return lines


def dsfleet_progress(plan, statuses, now=None):
    """Judge the watched nodes: {"state": running|done|failed, "line", "host", "reason", "log_tail"}.

    ``statuses`` maps host name -> the JSON printed by ``train/node.py status``; ``now`` is the controller's epoch
    time, used only where a status carries no ``now`` of its host (host clocks may differ from the controller's).
    Pure, so failure handling is unit-tested.
    """
    watch = plan["watch"]
    master = plan["master"]["name"]
    watched = [h["name"] for h in plan["hosts"]] if plan["launcher"] == "ansible" else [master]
    metric = (statuses.get(master) or {}).get("last_metric") or {}
    # When one rank dies the others follow within seconds: blame the host whose processes ended first.
    crashed = sorted((float(statuses[n].get("ended_at") or 0), i, n) for i, n in enumerate(watched)
                     if statuses.get(n) and statuses[n].get("state") == "exited" and statuses[n].get("rc") != 0)
    if crashed:
        st = statuses[crashed[0][2]]
        return {"state": "failed", "host": crashed[0][2], "reason": "training exited with code %s" % st.get("rc"),
                "line": "", "log_tail": st.get("log_tail", "")}
    for name in watched:
        st = statuses.get(name)
        if st is None:
            return {"state": "failed", "host": name, "reason": "no status from host (unreachable?)",
                    "line": "", "log_tail": ""}
        if st.get("state") == "missing":
            return {"state": "failed", "host": name, "reason": "no training process was started on this host",
                    "line": "", "log_tail": st.get("log_tail", "")}
    if all((statuses.get(n) or {}).get("state") == "exited" for n in watched):
        if metric.get("event") != "end":
            return {"state": "failed", "host": master, "reason": "training exited 0 without finishing its steps",
                    "line": "", "log_tail": (statuses.get(master) or {}).get("log_tail", "")}
        return {"state": "done", "host": master, "reason": "", "log_tail": "",
                "line": "done: %s steps, final loss %.4f, %.0f tokens/s" % (
                    metric.get("steps"), metric.get("final_loss", float("nan")), metric.get("tokens_per_s", 0))}
    st = statuses.get(master) or {}
    now = float(st.get("now") or now or 0)
    started = float(st.get("started_at") or now)
    progress_at = st.get("progress_at")
    if progress_at is None and now - started > watch["startup_timeout"]:
        return {"state": "failed", "host": master, "reason": "no training step within startup_timeout=%ss"
                % watch["startup_timeout"], "line": "", "log_tail": st.get("log_tail", "")}
    if progress_at is not None and now - float(progress_at) > watch["stall_timeout"]:
        return {"state": "failed", "host": master, "reason": "no progress for %ds (stall_timeout=%ss): a rank "
                "is stuck" % (now - float(progress_at), watch["stall_timeout"]), "line": "",
                "log_tail": st.get("log_tail", "")}
    if metric.get("event") == "step":
        total = plan["training"]["max_steps"]
        line = "step %s/%s  loss %.4f  %.0f tokens/s  %.0fs" % (
            metric.get("step"), total, metric.get("loss", float("nan")), metric.get("tokens_per_s", 0),
            metric.get("elapsed_s", 0))
    else:
        # the newest log line that says something (DeepSpeed's INFO lines repeat the whole command)
        last = [ln.strip() for ln in (st.get("log_tail") or "").splitlines()
                if ln.strip() and "[INFO]" not in ln][-1:]
        line = "starting: %d rank(s) on %d host(s), %ds%s" % (
            plan["world_size"], plan["nodes"], now - started, ("  | " + last[0][:100]) if last else "")
    return {"state": "running", "host": "", "reason": "", "line": line, "log_tail": ""}


def dsfleet_summary(plan, metrics, extra=None):
    """summary.json from the plan and the rank-0 metrics lines (list of dicts)."""
    end = next((m for m in reversed(metrics) if m.get("event") == "end"), None)
    steps = [m for m in metrics if m.get("event") == "step"]
    if end is None:
        raise AnsibleFilterError("dsfleet summary: the metrics have no end record; training did not finish")
    summary = {
        "run_id": plan["run_id"],
        "world_size": plan["world_size"],
        "hosts": [{"name": h["name"], "slots": h["slots"], "node_rank": h["node_rank"]} for h in plan["hosts"]],
        "accelerator": plan["accelerator"],
        "precision": plan["precision"],
        "launcher": plan["launcher"],
        "zero_stage": plan["zero"]["stage"],
        "model": plan["training"]["model"],
        "dataset": plan["training"]["dataset"],
        "steps": end.get("steps", len(steps)),
        "first_loss": end.get("first_loss"),
        "final_loss": end.get("final_loss"),
        "tokens_per_s": end.get("tokens_per_s"),
        "train_seconds": end.get("elapsed_s"),
        "checkpoint_host": plan["master"]["name"],
        "checkpoint_dir": end.get("checkpoint_dir"),
        "export_dir": end.get("export_dir"),
    }
    summary.update(extra or {})
    return summary


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def dsfleet_summary_table(summary):
    """Lines for the end-of-run table."""
    loss = ("%.4f -> %.4f" % (summary["first_loss"], summary["final_loss"])
            if _finite(summary.get("first_loss")) and _finite(summary.get("final_loss")) else "n/a")
    rows = [("run", summary["run_id"]),
            ("hosts", ", ".join("%s x%d" % (h["name"], h["slots"]) for h in summary["hosts"])),
            ("world size", str(summary["world_size"])),
            ("accelerator", "%s, %s, ZeRO %s, launcher %s" % (summary["accelerator"], summary["precision"],
                                                            summary["zero_stage"], summary["launcher"])),
            ("steps", str(summary["steps"])), ("loss", loss),
            ("tokens/s", "%.0f" % (summary.get("tokens_per_s") or 0)),
            ("checkpoint", "%s:%s" % (summary["checkpoint_host"], summary["checkpoint_dir"])),
            ("export", "%s:%s" % (summary["checkpoint_host"], summary["export_dir"]))]
    width = max(len(r[0]) for r in rows)
    return ["%s  %s" % (a.ljust(width), b) for a, b in rows]


def dsfleet_knob_regex(_=None):
    """A regex matching every knob name, for lookup('ansible.builtin.varnames', ...)."""
    return "^(%s)$" % "|".join(sorted(KNOBS))


def dsfleet_interfaces(facts):
    """[{name, ipv4: [cidr, ...]}] from a host's gathered network facts (ansible_facts)."""
    out = []
    for name in sorted(facts.get("interfaces") or []):
        data = facts.get(name.replace("-", "_")) or facts.get(name) or {}
        cidrs = []
        for item in [data.get("ipv4")] + list(data.get("ipv4_secondaries") or []):
            if isinstance(item, dict) and item.get("address") and item.get("netmask"):
                cidrs.append(str(ipaddress.IPv4Interface("%s/%s" % (item["address"], item["netmask"]))))
        out.append({"name": name, "ipv4": cidrs})
    return out


def dsfleet_records(names, hostvars):
    """Host records for the planner from hostvars; a host without a record (unreachable) gets reachable=false."""
    records = []
    for name in names:
        record = dict(hostvars[name].get("dsfleet_host_record") or {})
        if not record:
            record = {"name": name, "address": hostvars[name].get("ansible_host", name), "reachable": False}
        records.append(record)
    return records


class FilterModule(object):
    """dsfleet plan filters."""

    def filters(self):
        return {
            "dsfleet_plan": dsfleet_plan,
            "dsfleet_plan_table": dsfleet_plan_table,
            "dsfleet_train_args": dsfleet_train_args,
            "dsfleet_launch_args": dsfleet_launch_args,
            "dsfleet_progress": dsfleet_progress,
            "dsfleet_summary": dsfleet_summary,
            "dsfleet_summary_table": dsfleet_summary_table,
            "dsfleet_knob_regex": dsfleet_knob_regex,
            "dsfleet_interfaces": dsfleet_interfaces,
            "dsfleet_records": dsfleet_records,
        }
