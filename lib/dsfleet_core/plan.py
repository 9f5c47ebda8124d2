"""The cluster plan: every decision of a run, and every process it starts, computed once from facts and knobs.

Data flows one way: facts -> plan -> files -> processes -> results.

``make_plan(hosts, knobs)`` decides which hosts take part and with how many ranks, the accelerator, backend,
precision, master address and port, network interfaces, batch sizes and training arguments, the DeepSpeed config
(``plan["ds_config"]``, the whole policy: optimizer, clipping, ZeRO settings) and, per host, the exact processes
(``hosts[i]["process"]``: argv, environment, working directory of the rank-starting command; and
``hosts[i]["commands"]``: preflight, start, status, stop, ps, port check). Templates and tasks only render or run
these; no command line or environment is assembled anywhere else. It is a pure function (no I/O, no clock),
tested with tables of clusters in tests/unit/test_plan.py.

A host record (built per host by roles/plan from facts) looks like::

    {"name": "gpu1", "address": "10.0.0.11", "local": false, "reachable": true,
     "gpu": <ansible_facts.dsfleet_gpu from the gpu_facts module>,
     "interfaces": [{"name": "eth0", "ipv4": ["10.0.0.11/24"]}],
     "slots": null, "ifname": null, "home": "/root/.dsfleet", "venv": "/root/.dsfleet/venv",
     "path": "/usr/local/bin:/usr/bin:/bin", "ld_library_path": ""}
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import itertools
import json
import math
import re

from . import PlanError
from . import knobs as K
from . import sizing as SZ

PLAN_VERSION = 2
VENDORS = ("nvidia", "amd", "intel")
# vendor -> (torch.distributed backend, DS_ACCELERATOR, the socket-ifname variable its library reads)
BACKENDS = {
    "nvidia": ("nccl", "cuda", "NCCL_SOCKET_IFNAME"),
    "amd": ("nccl", "cuda", "NCCL_SOCKET_IFNAME"),  # RCCL answers to the nccl backend on ROCm builds of torch
    "intel": ("xccl", "xpu", "CCL_SOCKET_IFNAME"),
    "cpu": ("gloo", "cpu", "GLOO_SOCKET_IFNAME"),
}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The optimizer, the same whether or not its states are offloaded: AdamW with these settings, weight decay on
# matrices only (train.py puts norms and biases in a group with weight_decay 0). Without offload torch's AdamW
# steps it (no op to compile: DeepSpeed's FusedAdam would need nvcc on every GPU host); with offload=cpu
# DeepSpeed's CPU Adam does, in AdamW mode, with the same hyperparameters.
OPTIMIZER = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
GRADIENT_CLIPPING = 1.0


def _fail(msg):
    raise PlanError("dsfleet plan: " + msg)


normalize_knobs = K.normalize


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


def _host_gpus(host, accelerator):
    """The host's devices that may take part, by index: the first ``slots`` of them when the host sets slots."""
    gpus = sorted((host.get("gpu") or {}).get("gpus") or [], key=lambda g: int(g["index"]))
    limit = host.get("slots")
    if limit:
        if int(limit) > len(gpus):
            _fail("host %s sets slots=%s but has only %d %s device(s); lower `slots` in its host vars"
                  % (host["name"], limit, len(gpus), accelerator))
        gpus = gpus[: int(limit)]
    return gpus


def _devices(host, accelerator, cpu_ranks):
    """(slots, device indices or None, device memory MiB per rank, bf16 ok, label) for a host in the plan."""
    gpu = host.get("gpu") or {}
    if accelerator == "cpu":
        cpu = gpu.get("cpu") or {}
        slots = int(host.get("slots") or cpu_ranks)
        memory = int(cpu.get("memory_mib") or 0) // max(slots, 1)
        return slots, None, memory, bool(cpu.get("bf16")), cpu.get("model") or "cpu"
    gpus = _host_gpus(host, accelerator)
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


AUTO_KNOBS = ("zero_stage", "offload", "micro_batch", "activation_checkpointing")


def _batch_plan(k, given, world):
    """(micro batches to try, largest first; a function micro -> grad_accum) from micro_batch, grad_accum and
    global_batch as the user gave them."""
    if not k["global_batch"]:
        micros = [k["micro_batch"]] if "micro_batch" in given else \
            sorted({k["micro_batch"], max(1, k["micro_batch"] // 2), 1}, reverse=True)
        return micros, lambda micro: k["grad_accum"]
    if "grad_accum" in given:
        _fail("global_batch=%d and grad_accum=%d were both passed; pass one: the plan derives the accumulation "
              "from global_batch" % (k["global_batch"], k["grad_accum"]))
    if k["global_batch"] % world:
        _fail("global_batch=%d does not divide over the plan's %d ranks; pass a multiple of %d (e.g. -e "
              "global_batch=%d)" % (k["global_batch"], world, world, max(world, k["global_batch"] // world * world)))
    per_rank = k["global_batch"] // world
    if "micro_batch" in given:
        if per_rank % k["micro_batch"]:
            _fail("global_batch=%d is %d sequences per rank over %d ranks, which micro_batch=%d does not divide; pass "
                  "a micro_batch among %s, or drop it" % (k["global_batch"], per_rank, world, k["micro_batch"],
                                                         ", ".join(map(str, SZ.divisors_desc(per_rank)))))
        micros = [k["micro_batch"]]
    else:
        micros = SZ.divisors_desc(per_rank)
    return micros, lambda micro: per_rank // micro


def _options(k, given, kind):
    """(stage, offload) and activation-checkpointing choices to try, in order, honouring what the user set."""
    order = list(SZ.CPU_ORDER if kind == "cpu" else SZ.ORDER)
    if "zero_stage" in given:
        order = [(k["zero_stage"], o) for o in ("none", "cpu") if kind != "cpu" or o == "none"]
        order = [c for c in order if not (c[0] == 0 and c[1] == "cpu")]
    if "offload" in given:
        order = [(st, k["offload"]) for st in dict.fromkeys(st for st, _ in order)]
    ckpts = [k["activation_checkpointing"]] if "activation_checkpointing" in given else [False, True]
    return order, ckpts


def _sizing(k, given, config, plan_hosts, records, precision, accelerator):
    """(plan["sizing"], choice): the model's shape, what each configuration considered needs per device and per
    host against the smallest device, and the one chosen: the least sharded that fits, then the largest micro batch,
    then activation checkpointing only when nothing fits without it. What the user set is kept and checked; when
    that cannot fit the plan stops naming the nearest configuration that does."""
    from . import shape as SH
    world = sum(h["slots"] for h in plan_hosts)
    micros, accum_of = _batch_plan(k, given, world)
    unsized = {"zero_stage": k["zero_stage"], "offload": k["offload"], "micro_batch": micros[0],
               "grad_accum": accum_of(micros[0]), "activation_checkpointing": k["activation_checkpointing"]}
    if k["global_batch"] and "micro_batch" not in given:  # not sized: the largest micro batch up to today's 4
        unsized["micro_batch"] = next(m for m in micros if m <= k["micro_batch"])
        unsized["grad_accum"] = accum_of(unsized["micro_batch"])
    if config is None:
        return None, unsized
    if "_dsfleet_note" in config:  # the controller has no config.json for the model
        return {"known": False, "note": "not sized: %s" % config["_dsfleet_note"]}, unsized
    try:
        shape = SH.model_shape(config)
    except (SH.ShapeError, KeyError, TypeError, ValueError) as exc:
        return {"known": False, "note": "not sized: %s" % exc}, unsized
    kind = "cpu" if accelerator == "cpu" else "gpu"
    if k["strategy"] != "deepspeed":
        return _torch_sizing(k, given, shape, plan_hosts, records, precision, kind, micros, accum_of)
    per_host = max(h["slots"] for h in plan_hosts)
    nodes = len(plan_hosts)
    smallest = min(plan_hosts, key=lambda h: h["memory_mib"])
    room = int(smallest["memory_mib"] * SZ.DEVICE_USE)
    ram = {r["name"]: int(((r.get("gpu") or {}).get("cpu") or {}).get("memory_mib") or 0) for r in records}
    load_bytes = 2 if precision in ("bf16", "fp16") else 4  # the training module loads in the training precision

    def verdict(stage, offload, micro, ckpt):
        n = SZ.need(shape, stage, offload, micro, k["block_size"], precision, world, per_host, nodes, kind,
                    checkpointing=ckpt, zero_init=stage == 3, load_bytes=load_bytes)
        short = [h["name"] for h in plan_hosts if ram.get(h["name"]) and SZ.mib(n["host"]) > ram[h["name"]] * SZ.DEVICE_USE]
        why = None
        if SZ.mib(n["device"]) > room:
            why = "needs %d MiB per device, over the %d MiB a plan may use of the smallest" % (SZ.mib(n["device"]), room)
        elif short:
            why = "needs %d MiB of host memory on %s" % (SZ.mib(n["host"]), ", ".join(short))
        return n, why, short

    def search(order, ckpts, micro_list):
        considered = []
        for stage, offload in order:
            for ckpt in ckpts:
                for micro in micro_list:
                    n, why, short = verdict(stage, offload, micro, ckpt)
                    row = {"zero_stage": stage, "offload": offload, "micro_batch": micro,
                           "activation_checkpointing": ckpt, "device_mib": SZ.mib(n["device"]),
                           "host_mib": SZ.mib(n["host"]), "rejected": why}
                    if why is None:
                        considered.append(row)
                        return row, n, short, considered
                considered.append(row)  # its smallest micro batch: why this configuration was passed over
        return None, None, None, considered

    order, ckpts = _options(k, given, kind)
    chosen, n, _, considered = search(order, ckpts, micros)
    what_given = [name for name in AUTO_KNOBS if name in given]
    if chosen is None:
        first = {"zero_stage": order[0][0], "offload": order[0][1], "micro_batch": micros[0],
                 "activation_checkpointing": ckpts[0]} if order else None
        if first is None:
            _fail("zero_stage=%d with offload=%s is not a configuration DeepSpeed runs; pass zero_stage 1-3 with "
                  "offload=cpu" % (k["zero_stage"], k["offload"]))
        forced = "%s parameters (%s), %s, %s, micro batch %d x %d tokens" % (
            "{:,}".format(shape["params"]), shape["family"],
            "ZeRO-%d%s" % (first["zero_stage"], " + offload" if first["offload"] == "cpu" else ""),
            precision, first["micro_batch"], k["block_size"])
        n0, _, short0 = verdict(first["zero_stage"], first["offload"], first["micro_batch"],
                                   first["activation_checkpointing"])
        why = ("needs %d MiB per device (model states %d, activations %d, buffers %d, runtime %d); the smallest, %s "
               "on %s, has %d MiB" % (SZ.mib(n0["device"]), SZ.mib(n0["model_states"]), SZ.mib(n0["activations"]),
                                      SZ.mib(n0["buffers"]), SZ.mib(n0["runtime"]), smallest["device_name"],
                                      smallest["name"], smallest["memory_mib"])
               if not short0 or SZ.mib(n0["device"]) > room else
               "needs %d MiB of host memory on %s to load it and hold what is offloaded" % (SZ.mib(n0["host"]),
                                                                                           ", ".join(short0)))
        if what_given:
            # the nearest: the user's stage kept if anything fits with it, else the plan's own first choice
            free_micros = micros if "micro_batch" not in given else \
                sorted({k["micro_batch"], max(1, k["micro_batch"] // 2), 1}, reverse=True)
            alt = None
            for keep in ([{"zero_stage"}] if "zero_stage" in given else []) + [set()]:
                free_order, free_ckpts = _options(k, keep, kind)
                alt = search(free_order, free_ckpts, free_micros)[0]
                if alt is not None:
                    break
            if alt is not None:
                _fail("the model does not fit: %s %s. The nearest configuration that fits: -e zero_stage=%d -e "
                      "offload=%s -e micro_batch=%d%s (%d MiB per device)"
                      % (forced, why, alt["zero_stage"], alt["offload"], alt["micro_batch"],
                         " -e activation_checkpointing=true" if alt["activation_checkpointing"] else "",
                         alt["device_mib"]))
        _fail("the model does not fit: %s %s, and neither does any ZeRO stage with or without offload at micro batch "
              "1. Add devices or hosts with more memory, shorten block_size, or exclude the smallest devices"
              % (forced, why))
    choice = {"zero_stage": chosen["zero_stage"], "offload": chosen["offload"], "micro_batch": chosen["micro_batch"],
              "grad_accum": accum_of(chosen["micro_batch"]),
              "activation_checkpointing": chosen["activation_checkpointing"]}
    out = {"known": True, "family": shape["family"], "params": shape["params"], "params_active": shape["params_active"],
           "largest_layer": shape["largest_layer"], "hidden": shape["hidden"],
           "buckets": SZ.buckets(shape, choice["zero_stage"], kind), "zero_stage": choice["zero_stage"], "offload": choice["offload"],
           "micro_batch": choice["micro_batch"], "grad_accum": choice["grad_accum"],
           "activation_checkpointing": choice["activation_checkpointing"], "block_size": k["block_size"],
           "precision": precision, "zero_init": choice["zero_stage"] == 3, "load_bytes": load_bytes,
           "model_states_mib": SZ.mib(n["model_states"]), "activations_mib": SZ.mib(n["activations"]),
           "buffers_mib": SZ.mib(n["buffers"]), "runtime_mib": SZ.mib(n["runtime"]), "device_mib": SZ.mib(n["device"]), "host_mib": SZ.mib(n["host"]),
           "smallest_device": {"host": smallest["name"], "name": smallest["device_name"],
                               "memory_mib": smallest["memory_mib"]},
           "fits": True, "chosen_by_plan": [name for name in AUTO_KNOBS if name not in given],
           "considered": considered}
    return out, choice


def fsdp_shardings(k, plan_hosts):
    """The FSDP shardings to try, least traffic between hosts first: hybrid (within a host) only on several hosts
    with the same ranks each, more than one (one rank a host would shard nothing)."""
    uniform = len(plan_hosts) > 1 and len(set(h["slots"] for h in plan_hosts)) == 1 and plan_hosts[0]["slots"] > 1
    if k["fsdp_sharding"] == "hybrid" and not uniform:
        _fail("fsdp_sharding=hybrid shards within each host and replicates across hosts, which needs several hosts "
              "with the same number of ranks, more than one each (here: %s); use -e fsdp_sharding=full, or set `slots` alike"
              % ", ".join("%s x%d" % (h["name"], h["slots"]) for h in plan_hosts))
    if k["fsdp_sharding"] != "auto":
        return [k["fsdp_sharding"]]
    return ["hybrid", "full"] if uniform else ["full"]


def _torch_sizing(k, given, shape, plan_hosts, records, precision, kind, micros, accum_of):
    """_sizing for strategy=fsdp/ddp (sizing.torch_states): the sharding (fsdp), the micro batch and activation
    checkpointing that fit the smallest device; ddp that does not fit stops the plan with the reason."""
    world = sum(h["slots"] for h in plan_hosts)
    per_host = max(h["slots"] for h in plan_hosts)
    smallest = min(plan_hosts, key=lambda h: h["memory_mib"])
    room = int(smallest["memory_mib"] * SZ.DEVICE_USE)
    ram = {r["name"]: int(((r.get("gpu") or {}).get("cpu") or {}).get("memory_mib") or 0) for r in records}
    shardings = fsdp_shardings(k, plan_hosts) if k["strategy"] == "fsdp" else [None]
    ckpts = [k["activation_checkpointing"]] if "activation_checkpointing" in given else [False, True]
    considered, chosen = [], None
    for sharding in shardings:
        shard = per_host if sharding == "hybrid" else world
        for ckpt in ckpts:
            for micro in micros:
                n = SZ.need(shape, 0, "none", micro, k["block_size"], precision, world, per_host, len(plan_hosts),
                            kind, checkpointing=ckpt, strategy=k["strategy"], shard=shard)
                short = [h["name"] for h in plan_hosts
                         if ram.get(h["name"]) and SZ.mib(n["host"]) > ram[h["name"]] * SZ.DEVICE_USE]
                why = ("needs %d MiB per device, over the %d MiB a plan may use of the smallest" % (SZ.mib(n["device"]), room)
                       if SZ.mib(n["device"]) > room else
                       "needs %d MiB of host memory on %s" % (SZ.mib(n["host"]), ", ".join(short)) if short else None)
                row = {"strategy": k["strategy"], "fsdp_sharding": sharding, "zero_stage": 0, "offload": "none",
                       "micro_batch": micro, "activation_checkpointing": ckpt, "device_mib": SZ.mib(n["device"]),
                       "host_mib": SZ.mib(n["host"]), "rejected": why}
                considered.append(row)
                if why is None:
                    chosen = (row, n)
                    break
            if chosen:
                break
        if chosen:
            break
    what = "%s parameters (%s), %s%s, %s" % ("{:,}".format(shape["params"]), shape["family"], k["strategy"].upper(),
                                              " (%s sharding)" % shardings[-1] if shardings[-1] else "", precision)
    if chosen is None:
        last = considered[-1]
        fix = ("-e strategy=fsdp (sharded over the ranks) or -e strategy=deepspeed (ZeRO, offload)"
               if k["strategy"] == "ddp" else "-e strategy=deepspeed (ZeRO-3 with CPU offload), more devices")
        _fail("the model does not fit: %s, micro batch %d x %d tokens %s%s: DDP keeps the whole model, its gradients "
              "and AdamW's states (16 bytes a parameter) on every device. Use %s" % (
                  what, last["micro_batch"], k["block_size"], last["rejected"],
                  " even with activation checkpointing" if last["activation_checkpointing"] else "", fix)
              if k["strategy"] == "ddp" else
              "the model does not fit: %s, micro batch %d x %d tokens %s. Use %s, or a shorter block_size"
              % (what, last["micro_batch"], k["block_size"], last["rejected"], fix))
    row, n = chosen
    choice = {"zero_stage": 0, "offload": "none", "micro_batch": row["micro_batch"],
              "grad_accum": accum_of(row["micro_batch"]), "activation_checkpointing": row["activation_checkpointing"],
              "fsdp_sharding": row["fsdp_sharding"]}
    out = {"known": True, "family": shape["family"], "params": shape["params"], "params_active": shape["params_active"],
           "largest_layer": shape["largest_layer"], "hidden": shape["hidden"], "strategy": k["strategy"],
           "fsdp_sharding": row["fsdp_sharding"], "zero_stage": 0, "offload": "none",
           "micro_batch": choice["micro_batch"], "grad_accum": choice["grad_accum"],
           "activation_checkpointing": choice["activation_checkpointing"], "block_size": k["block_size"],
           "precision": precision, "model_states_mib": SZ.mib(n["model_states"]),
           "activations_mib": SZ.mib(n["activations"]), "buffers_mib": 0, "runtime_mib": SZ.mib(n["runtime"]),
           "device_mib": SZ.mib(n["device"]), "host_mib": SZ.mib(n["host"]),
           "smallest_device": {"host": smallest["name"], "name": smallest["device_name"],
                               "memory_mib": smallest["memory_mib"]},
           "fits": True, "chosen_by_plan": [name for name in ("fsdp_sharding", "micro_batch", "activation_checkpointing")
                                            if name not in given and (name != "fsdp_sharding" or row["fsdp_sharding"])],
           "considered": considered}
    return out, choice


def _link_gbps(members):
    """(Gbit/s, assumed) of the slowest link between these hosts: each host's fastest non-loopback interface speed
    from its facts; a host whose facts give none counts as ASSUMED_NETWORK_GBPS (10 GbE). (None, True) when no
    host's facts give one."""
    from . import speed as SP
    known, unknown = [], False
    for host in members:
        own = [int(i.get("speed_mbps") or 0) for i in host.get("interfaces") or [] if i.get("ipv4")
               and i.get("name") != "lo"]
        if own and max(own) > 0:
            known.append(max(own) / 1000.0)
        else:
            unknown = True
    if not known:
        return None, True
    return min(known + ([SP.ASSUMED_NETWORK_GBPS] if unknown else [])), unknown


def _kind(g):
    return (g.get("name") or "?", int(g.get("memory_mib") or 0), bool(g.get("bf16")))


def _leave_out(k, given, config, members, accelerator):
    """(members to plan with, [left out: {name, devices, device_name, whole_host, reason}], speed summary or None).

    Every rank gets the same micro batch and every step waits for the slowest rank, so a slow or small device can
    cost the cluster more than it adds. The candidates are the sets of device kinds (name, memory, bf16) that leave
    out only kinds slower or smaller than every kind kept (never a fast card to keep a slow one) and keep the
    user's master. For each the plan sizes the model (sizing.py) and estimates the step time (speed.py, over that
    set's own slowest link); it leaves out the kinds with which the model does not fit, or whose inclusion lowers
    the estimated tokens/s by more than LEAVE_OUT_MARGIN, and names them and why. Only a model that does not fit
    counts against a set: any other error of the whole cluster (a global_batch that does not divide, precision=bf16
    on devices without it) is the user's to fix and surfaces as before. ``use_all_devices`` keeps every device."""
    from . import shape as SH
    from . import speed as SP
    try:
        shape = SH.model_shape(config)
    except (SH.ShapeError, KeyError, TypeError, ValueError):
        return members, [], None
    per_host = [(host, _host_gpus(host, accelerator)) for host in members]
    kinds = sorted({_kind(g) for _, gpus in per_host for g in gpus})

    def peak(kind, precision):
        found = SP.device_peak(kind[0], precision)
        return found[0] if found else None

    def evaluate(keep):
        subset = []
        for host, gpus in per_host:
            mine = [g for g in gpus if _kind(g) in keep]
            if mine:
                subset.append(dict(host, slots=None, gpu=dict(host["gpu"], gpus=mine)))
        if not subset or (k["master"] and subset[0]["name"] != k["master"]):
            return None
        lite = []
        for host in subset:
            slots, _, mem, bf16, label = _devices(host, accelerator, k["cpu_ranks"])
            lite.append({"name": host["name"], "slots": slots, "memory_mib": mem, "bf16": bf16,
                         "device_name": label, "device_names": [g.get("name") or "?" for g in host["gpu"]["gpus"]]})
        link, assumed = _link_gbps(subset)
        row = {"keep": sorted(keep), "hosts": subset, "world": sum(h["slots"] for h in lite), "link": link,
               "link_assumed": assumed}
        try:
            precision = _precision(k, accelerator, lite)
            _, choice = _sizing(k, given, config, lite, subset, precision, accelerator)
        except PlanError as exc:
            if not str(exc).startswith("dsfleet plan: the model does not fit"):
                return dict(row, fits=None, why=str(exc))  # not a matter of memory: not a candidate
            return dict(row, fits=False, why=str(exc).replace("dsfleet plan: ", ""))
        # FSDP moves what ZeRO-3 moves (an all-gather more than DDP's all-reduce)
        est = SP.step_time(shape, 3 if k["strategy"] == "fsdp" else choice["zero_stage"], choice["offload"], choice["micro_batch"], choice["grad_accum"],
                           k["block_size"], precision, choice["activation_checkpointing"], lite, link)
        return dict(row, fits=True, precision=precision, choice=choice, estimate=est,
                    tokens_per_s=(est["tokens"] / est["step"]) if est else None)

    def below(gone, kept, precision):
        """Every kind left out is slower (by its datasheet peak) or smaller than every kind kept."""
        for d in gone:
            for kk in kept:
                pd, pk = peak(d, precision), peak(kk, precision)
                slower = pd is not None and pk is not None and pd < pk
                if not (slower or d[1] < kk[1]):
                    return False
        return True

    everything = set(kinds)
    full = evaluate(everything)
    if full is None or full["fits"] is None:
        return members, [], None  # the whole cluster fails for another reason: the main path says which
    if len(kinds) < 2:
        return members, [], _speed_summary(full)
    precision_hint = full.get("precision") or ("bf16" if all(kd[2] for kd in kinds) else "fp16")
    subsets = [set(c) for n in range(len(kinds) - 1, 0, -1) for c in itertools.combinations(kinds, n)
               if below(everything - set(c), set(c), precision_hint)]
    rows = [r for r in (evaluate(s) for s in subsets) if r is not None and r["fits"]]
    best = None
    if rows and all(r["tokens_per_s"] is not None for r in rows):
        best = max(rows, key=lambda r: (r["tokens_per_s"], r["world"]))
    elif rows and not full["fits"]:
        best = max(rows, key=lambda r: r["world"])  # speeds unknown: the most devices with which it fits
    keep_full = best is None or (full["fits"] and (
        full["tokens_per_s"] is None or best["tokens_per_s"] is None
        or best["tokens_per_s"] <= full["tokens_per_s"] * (1 + LEAVE_OUT_MARGIN)))
    if keep_full or k["use_all_devices"]:
        summary = _speed_summary(full) if full["fits"] else None
        if summary and best is not None and not keep_full and summary.get("tokens_per_s"):
            summary["note"] = "; ".join(filter(None, [
                "use_all_devices=true keeps every device; without %s the estimate is %d tokens/s"
                % (_kinds_text(everything - set(best["keep"])), best["tokens_per_s"]), summary["note"]]))
        return members, [], summary
    gone = everything - set(best["keep"])
    if full["fits"]:
        causes = []
        if any((peak(d, full["precision"]) or 0) < min(peak(kk, full["precision"]) or 0 for kk in best["keep"])
               for d in gone):
            causes.append("every step waits for the slowest device")
        if min(d[1] for d in gone) < min(kk[1] for kk in best["keep"]) and (
                full["choice"]["zero_stage"], full["choice"]["offload"], full["choice"]["micro_batch"]) != (
                best["choice"]["zero_stage"], best["choice"]["offload"], best["choice"]["micro_batch"]):
            causes.append("the smallest device forces a more sharded configuration or a smaller micro batch")
        if len(best["hosts"]) < len(full["hosts"]) and full["estimate"]["communication"] > \
                best["estimate"]["communication"]:
            causes.append("their host adds communication over the network")
        why = ("with them %s: estimated %d tokens/s on %d devices (%s, %s) against %d tokens/s on %d without them "
               "(%s, %s)" % ("; ".join(causes) or "the cluster is slower",
                             full["tokens_per_s"], full["world"], full["precision"], _choice_text(full["choice"]),
                             best["tokens_per_s"], best["world"], best["precision"], _choice_text(best["choice"])))
    else:
        why = "with them: %s" % full["why"]
    kept = {h["name"]: h for h in best["hosts"]}
    left = []
    for host, gpus in per_host:
        dropped = [g for g in gpus if _kind(g) in gone]
        if dropped:
            left.append({"name": host["name"], "devices": [int(g["index"]) for g in dropped],
                         "device_name": ", ".join(sorted(set(g.get("name") or "?" for g in dropped))),
                         "whole_host": host["name"] not in kept,
                         "reason": why + "; -e use_all_devices=true keeps them"})
    return [kept[h["name"]] for h in members if h["name"] in kept], left, _speed_summary(best)


LEAVE_OUT_MARGIN = 0.05  # leave devices out only for an estimated gain above 5%: the estimate is coarse


def _kinds_text(kinds):
    return ", ".join("%s (%d MiB)" % (name, mem) for name, mem, _ in sorted(kinds))


def _choice_text(choice):
    return "ZeRO-%d%s, micro batch %d" % (choice["zero_stage"], " + offload" if choice["offload"] == "cpu" else "",
                                         choice["micro_batch"])


def _speed_summary(row):
    """plan["speed"]: the step-time estimate of the devices planned with, or None when it cannot be made."""
    from . import speed as SP
    if not row or not row.get("fits"):
        return None
    est = row["estimate"]
    if not est:
        names = sorted({n for h in row["hosts"] for n in [g.get("name") or "?" for g in h["gpu"]["gpus"]]
                        if SP.device_peak(n, row["precision"]) is None})
        return {"tokens_per_s": None, "note": "no step-time estimate: no datasheet figure for %s in "
                "lib/dsfleet_core/speed.py; devices are left out only when the model does not fit with them"
                % ", ".join(names)}
    note = ""
    if est["communication"] > est["compute"]:
        # communication happens once per optimizer step, compute once per micro batch: accumulate more
        accum = row["choice"]["grad_accum"] * math.ceil(est["communication"] / est["compute"])
        note = ("communication outweighs compute: accumulating more micro batches per step spreads it over more "
                "tokens (e.g. -e global_batch=%d, %d micro batches of %d per rank)"
                % (row["choice"]["micro_batch"] * accum * row["world"], accum, row["choice"]["micro_batch"]))
    return {"tokens_per_s": round(row["tokens_per_s"], 1), "step_s": round(est["step"], 3),
            "compute_s": round(est["compute"], 3), "communication_s": round(est["communication"], 3),
            "offload_s": round(est["offload"], 3), "slowest_device": est["slowest"],
            "network_gbps": (row["link"] or SP.ASSUMED_NETWORK_GBPS) if len(row["hosts"]) > 1 else None,
            "network_assumed": bool(row["link_assumed"]) and len(row["hosts"]) > 1,
            "model_flops_utilization": SP.MODEL_FLOPS_UTILIZATION, "note": note}


def take_part(hosts, k, fail):
    """(excluded, candidates): the hosts the user left out or that gave no facts, and the others; an unknown name
    in ``exclude`` or an unreachable host under ``require_all_hosts`` fails through ``fail``."""
    names = [h["name"] for h in hosts]
    for name in k["exclude"]:
        if name not in names:
            fail("exclude names %s, which is not in the inventory (hosts: %s); fix -e exclude=..."
                 % (name, ", ".join(names)))

    excluded, candidates = [], []
    for host in hosts:
        if host["name"] in k["exclude"]:
            excluded.append({"name": host["name"], "reason": "excluded by the user (exclude=)"})
        elif not host.get("reachable", True) or not host.get("gpu"):
            if k["require_all_hosts"]:
                fail("host %s is unreachable or returned no facts; check that it is up and that `ssh %s` works "
                     "(run setup.yml), or leave it out with -e exclude=%s (or -e require_all_hosts=false)"
                     % (host["name"], host.get("address") or host["name"], host["name"]))
            excluded.append({"name": host["name"], "reason": "unreachable (no facts gathered)"})
        elif undriven_text(host) and not (host["gpu"].get("gpus") or []):
            # GPUs on the PCI bus that no driver answers for: never a silent CPU host
            if k["require_all_hosts"]:
                fail("host %s: %s; install the driver (ansible-playbook setup.yml with drivers_install: true for "
                     "that host), or leave it out with -e exclude=%s (or -e require_all_hosts=false)"
                     % (host["name"], undriven_text(host), host["name"]))
            excluded.append({"name": host["name"], "reason": undriven_text(host) + " (setup.yml with "
                             "drivers_install: true installs it)"})
        else:
            candidates.append(host)
    return excluded, candidates


VENDOR_NAMES = {"nvidia": "NVIDIA", "amd": "AMD", "intel": "Intel"}


def undriven_text(host):
    """'2 NVIDIA GPUs present (lspci: A100 x2), no driver: nvidia-smi not found' for each vendor whose GPUs are on
    the host's PCI bus while its tools list none (gpu_facts' ``undriven``), joined; '' when there is none."""
    parts = []
    for item in (host.get("gpu") or {}).get("undriven") or []:
        names = {}
        for name in item.get("names") or []:
            names[name] = names.get(name, 0) + 1
        parts.append("%d %s GPU%s present (lspci: %s), no driver: %s" % (
            int(item.get("count") or 0), VENDOR_NAMES.get(item.get("vendor"), item.get("vendor")),
            "" if int(item.get("count") or 0) == 1 else "s",
            ", ".join(n if c == 1 else "%s x%d" % (n, c) for n, c in names.items()) or "unnamed",
            item.get("reason") or "no tool answered"))
    return "; ".join(parts)


def make_plan(hosts, knobs=None, previous=None, model=None, inputs=None):
    """Compute the one cluster plan from host records and the user's knobs (see module docstring).

    ``previous``: on resume, the layout of the plan that last started ranks for that run (its ``layout``, kept
    in runs/<id>/started.json): with another world the global batch is kept when it divides, and the plan
    says that the checkpoint is converted to a universal one. ``model``: the model's config.json (sizing).
    ``inputs``: {"model", "dataset", "eval_dataset": {"path", "dir"} or None}, those that lie on the controller: copied to
    every host under its dsfleet home (there is no shared filesystem), unless the plan is this machine alone."""
    k = normalize_knobs(knobs)
    given = {name for name, value in (knobs or {}).items() if value is not None}
    if k["resume"] and k["global_batch"]:
        given.discard("grad_accum")  # the resumed run's stored accumulation was derived from its global_batch
    if k["resume"]:
        k["run_id"] = k["resume"]
    if k["eval_fraction"] and k["eval_dataset"]:
        _fail("eval_fraction=%s and eval_dataset=%s were both passed; pass one: a held-out fraction of the dataset "
              "or a dataset to eval on" % (k["eval_fraction"], k["eval_dataset"]))
    if not k["run_id"]:
        _fail("run_id is empty; the plan role names the run before planning (pass -e run_id=NAME by hand)")
    if not hosts:
        _fail("the inventory has no host in group dsfleet; add hosts to inventory (see inventory/example)")
    excluded, candidates = take_part(hosts, k, _fail)
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

    left_out, speed = [], None
    if accelerator != "cpu" and model and "_dsfleet_note" not in model:
        members, left_out, speed = _leave_out(k, given, model, members, accelerator)
        excluded += [{"name": e["name"], "reason": "its %s: %s" % (e["device_name"], e["reason"])}
                     for e in left_out if e["whole_host"]]

    seen = {}
    for host in members:
        addr = str(host.get("address") or host["name"])
        if addr in seen and len(members) > 1:
            _fail("hosts %s and %s resolve to the same address %s; give each its own ansible_host, or exclude one"
                  % (seen[addr], host["name"], addr))
        seen[addr] = host["name"]

    if k["strategy"] != "deepspeed":
        _check_torch_strategy(k, given)
    if k["launcher"] in ("pdsh", "slurm") and len(set((h.get("home"), h.get("venv")) for h in members)) > 1:
        _fail("launcher=%s runs %s on every host, but the dsfleet paths differ (%s); set the same dsfleet_home for "
              "all hosts in group_vars, or use -e launcher=ansible"
              % (k["launcher"], "the same command line" if k["launcher"] == "pdsh" else "one batch script",
                 ", ".join("%s: %s" % (h["name"], h.get("venv")) for h in members)))
    if k["launcher"] == "slurm":
        _check_slurm(k, members)
    else:
        stray = [n for n in ("slurm_submit", "slurm_partition", "slurm_account", "slurm_time", "slurm_options")
                 if k[n] != K.KNOBS[n].default]
        if stray:
            _fail("%s appl%s to launcher=slurm (this run's launcher is %s): add -e launcher=slurm, or drop %s"
                  % (", ".join(stray), "ies" if len(stray) == 1 else "y", k["launcher"], " and ".join(stray)))
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
            "device_names": [] if accelerator == "cpu" else [g.get("name") or "?" for g in _host_gpus(host, accelerator)],
            "memory_mib": mem,
            "bf16": bf16,
            "ifname": ifname,
            "env": env,
        })
        if k["launcher"] == "slurm":
            plan_hosts[-1]["slurm_node"] = slurm_node(host)
        rank += slots
    if rank == 0:
        _fail("the chosen hosts offer no ranks; check `slots`/`gpus` host vars")
    precision = _precision(k, accelerator, plan_hosts)
    # the model's config.json, when the controller has it (the plan role reads it): memory checked before launch,
    # and the ZeRO stage, offload, micro batch and accumulation the user left unset chosen to fit
    sizing, choice = _sizing(k, given, model or None, plan_hosts, members, precision, accelerator)
    k.update(choice)
    if k["strategy"] != "deepspeed":
        k["zero_stage"], k["offload"] = 0, "none"
        if k["strategy"] == "fsdp" and k["fsdp_sharding"] == "auto":  # not sized: full sharding holds the least
            k["fsdp_sharding"] = fsdp_shardings(k, plan_hosts)[-1]
        elif k["strategy"] == "ddp":
            k["fsdp_sharding"] = None

    # DeepSpeed's --include keeps the exact device indices when a host's devices are not 0..n-1.
    include = None
    if accelerator != "cpu" and any(h["devices"] != list(range(h["slots"])) for h in plan_hosts):
        include = "@".join("%s:%s" % (h["address"], ",".join(map(str, h["devices"]))) for h in plan_hosts)

    ifnames = sorted(set(h["ifname"] for h in plan_hosts))
    warnings = [SZ.ZERO3_ON_CPU_WARNING] if accelerator == "cpu" and k["zero_stage"] == 3 else []
    warnings += ["%s: %s; those GPUs are not used (setup.yml with drivers_install: true installs the driver)"
                 % (h["name"], undriven_text(h)) for h in candidates if undriven_text(h)]
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
    layout_hosts = [{"name": h["name"], "ranks": list(range(h["first_rank"], h["first_rank"] + h["slots"]))}
                    for h in plan_hosts]
    resume = None
    if k["resume"]:
        resume = _resume(k, previous, world, layout_hosts)
        if resume["grad_accum"] != k["grad_accum"]:
            k["grad_accum"] = resume["grad_accum"]
    batch = {"micro": k["micro_batch"], "grad_accum": k["grad_accum"],
             "global": k["micro_batch"] * k["grad_accum"] * world}
    plan = {
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
        "strategy": k["strategy"],
        "fsdp_sharding": k["fsdp_sharding"] if k["strategy"] == "fsdp" else None,
        "zero": {"stage": k["zero_stage"], "offload": k["offload"]},
        "batch": batch,
        "training": {
            "model": k["model"], "dataset": k["dataset"], "text_field": k["text_field"],
            "data_format": k["data_format"], "prompt_field": k["prompt_field"], "response_field": k["response_field"],
            "messages_field": k["messages_field"], "eval_fraction": k["eval_fraction"],
            "eval_dataset": k["eval_dataset"], "eval_every": k["eval_every"],
            "max_steps": k["max_steps"], "epochs": k["epochs"], "block_size": k["block_size"], "lr": k["lr"],
            "warmup_steps": k["warmup_steps"], "seed": k["seed"], "log_every": k["log_every"],
            "plot_every_s": k["plot_every_s"], "save_every": k["save_every"], "save_every_minutes": k["save_every_minutes"],
            "keep_checkpoints": k["keep_checkpoints"], "resume": k["resume"],
            "activation_checkpointing": k["activation_checkpointing"],
        },
        "watch": {"poll_interval": k["poll_interval"], "stall_timeout": k["stall_timeout"],
                  "startup_timeout": k["startup_timeout"], "stop_grace": k["stop_grace"],
                  "checkpoint_grace": k["checkpoint_grace"], "follow": k["follow"]},
        # launcher=slurm with slurm_submit=false: render job.sbatch, submit nothing
        "dry_run": k["dry_run"] or (k["launcher"] == "slurm" and not k["slurm_submit"]),
        "slurm": slurm_request(k, plan_hosts, accelerator) if k["launcher"] == "slurm" else None,
        "layout": {"world_size": world, "global_batch": batch["global"], "zero_stage": k["zero_stage"],
                   "strategy": k["strategy"], "fsdp_sharding": k["fsdp_sharding"] if k["strategy"] == "fsdp" else None,
                   "hosts": layout_hosts},
        "resume": resume,
        "knobs": dict(k),  # what the plan was computed from; a resumed run starts from these
        "warnings": warnings,
        "sizing": sizing,
        "left_out_devices": [e for e in left_out if not e["whole_host"]],
        "speed": speed,
        # inputs that lie on the controller; copied to every host, read there from the staged copy
        # (a hub model: downloaded once on the master, shipped to the others; on this machine alone too)
        "inputs": {n: dict(v) for n, v in (inputs or {}).items() if v and (v.get("hub") or not local)},
    }
    plan["ds_config"] = ds_config(plan)
    return add_processes(plan, members)




SLURM_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SLURM_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+|UNLIMITED|INFINITE", re.I)
# what dsfleet itself sets in job.sbatch: slurm_options may not set these
SLURM_OWN = ("nodes", "nodelist", "ntasks", "ntasks-per-node", "job-name", "output", "error", "chdir", "gres",
             "exclusive", "partition", "account", "time", "signal", "hetjob")


def slurm_node(host):
    """A host's SLURM node name: its slurm_node host var, else its hostname (what slurmd registers by default)."""
    return str(host.get("slurm_node") or host.get("hostname") or host["name"])


def _check_slurm(k, members):
    """What launcher=slurm cannot take, named before anything is rendered."""
    names = {}
    for host in members:
        node = slurm_node(host)
        if not SLURM_NODE.fullmatch(node):
            _fail("host %s: %r is not a SLURM node name; set slurm_node in its host vars" % (host["name"], node))
        if node in names:
            _fail("hosts %s and %s are both SLURM node %s; set slurm_node in their host vars to the names "
                  "`sinfo -N` shows" % (names[node], host["name"], node))
        names[node] = host["name"]
    if k["slurm_time"] and not SLURM_TIME.fullmatch(k["slurm_time"]):
        _fail("slurm_time=%s is not a SLURM time limit; use MM, HH:MM:SS or D-HH:MM:SS (e.g. -e slurm_time=1-00:00:00)"
              % k["slurm_time"])
    for name in ("slurm_partition", "slurm_account"):
        if k[name] and not re.fullmatch(r"[A-Za-z0-9._,-]+", k[name]):
            _fail("%s=%s: letters, digits, `.`, `_`, `-` and `,` only" % (name, k[name]))
    for option in k["slurm_options"]:
        text = str(option)
        match = re.fullmatch(r"--([a-z][a-z0-9-]*)(=[^\s'\"\\;&|`$]+)?", text)
        if not match:
            _fail("slurm_options: %r is not one `--name` or `--name=value` sbatch option (no spaces or quotes), "
                  "e.g. -e '{\"slurm_options\": [\"--qos=high\"]}'" % text)
        if match.group(1) in SLURM_OWN:
            _fail("slurm_options: %s is dsfleet's to set from the plan%s" % (
                "--" + match.group(1), {"partition": "; use -e slurm_partition=...", "account": "; use -e "
                                        "slurm_account=...", "time": "; use -e slurm_time=..."}.get(match.group(1), "")))


def slurm_request(k, plan_hosts, accelerator):
    """The allocation job.sbatch asks SLURM for: every planned node, whole (the plan sized their devices), its
    slots as tasks and its devices as GRES. Tasks per node and GRES are one value per job component, so nodes that
    differ in either are a heterogeneous job, one component per kind of node (in plan order). Each node's one step
    task is its launcher, which starts its ranks."""
    kinds = {}  # (tasks per node, GRES) -> its nodes, in plan order
    for h in plan_hosts:
        kinds.setdefault((h["slots"], ("gpu:%d" % h["slots"]) if accelerator != "cpu" else None),
                         []).append(h["slurm_node"])
    options = []
    for name in ("partition", "account", "time"):
        if k["slurm_" + name]:
            options.append("--%s=%s" % (name, k["slurm_" + name]))
    if k["slurm_time"]:  # before the time limit: SIGTERM, so the ranks checkpoint before SLURM kills them
        options.append("--signal=TERM@%d" % max(60, int(k["checkpoint_grace"])))
    options += [str(o) for o in k["slurm_options"]]
    return {"job_name": "dsfleet-" + k["run_id"], "submit": k["slurm_submit"],
            "nodes": [h["slurm_node"] for h in plan_hosts],
            "components": [{"nodes": nodes, "tasks_per_node": slots, "gres": gres}
                           for (slots, gres), nodes in kinds.items()],
            "options": options}


def _check_torch_strategy(k, given):
    """What strategy=fsdp/ddp cannot take: ZeRO and offload are DeepSpeed's, and so is the pdsh runner."""
    if k["launcher"] == "pdsh":
        _fail("launcher=pdsh is DeepSpeed's own runner; strategy=%s starts torchrun on every host: use -e "
              "launcher=ansible (the default), or -e strategy=deepspeed" % k["strategy"])
    for name, neutral in (("zero_stage", 0), ("offload", "none")):
        if name in given and k[name] != neutral:  # a resumed run's stored knobs hold the neutral values
            _fail("%s=%s applies to strategy=deepspeed; strategy=%s %s: drop %s, or use -e strategy=deepspeed"
                  % (name, k[name], k["strategy"], "shards by fsdp_sharding" if k["strategy"] == "fsdp"
                     else "keeps the whole model on every device", name))
    if k["strategy"] == "ddp" and "fsdp_sharding" in given and k["fsdp_sharding"] != "auto":
        _fail("fsdp_sharding=%s applies to strategy=fsdp; drop it, or use -e strategy=fsdp" % k["fsdp_sharding"])


def _resume(k, previous, world, layout_hosts):
    """What resuming means for this plan: the same layout (exact continuation) or another world (a universal
    checkpoint; the global batch kept through gradient accumulation when it divides)."""
    prev = previous if isinstance(previous, dict) and previous.get("world_size") else None
    same = prev is not None and prev["world_size"] == world and prev.get("hosts") == layout_hosts
    if prev is not None and prev.get("strategy", "deepspeed") != k["strategy"]:
        _fail("run %s was trained with strategy=%s; its checkpoints load only into that strategy: resume with -e "
              "strategy=%s" % (k["resume"], prev.get("strategy", "deepspeed"), prev.get("strategy", "deepspeed")))
    if prev is not None and k["strategy"] != "deepspeed" and not same:
        _fail("run %s was written by %d rank(s) on %s; strategy=%s resumes only on that same layout (each rank loads "
              "its own shard; the universal conversion is DeepSpeed's): resume with those hosts and slots "
              "(require_all_hosts=true), or start a new run" % (
                  k["resume"], prev["world_size"], ", ".join("%s x%d" % (h["name"], len(h["ranks"]))
                                                           for h in prev["hosts"]), k["strategy"]))
    grad_accum, note = k["grad_accum"], ""
    if prev is not None and not same and prev.get("global_batch"):
        per_step = k["micro_batch"] * world
        if prev["global_batch"] % per_step == 0:
            grad_accum = prev["global_batch"] // per_step
            note = "global batch %d kept (gradient accumulation %d)" % (prev["global_batch"], grad_accum)
        else:
            note = ("global batch %d does not divide into %d ranks x micro batch %d: it becomes %d"
                    % (prev["global_batch"], world, k["micro_batch"], per_step * grad_accum))
    return {"run": k["resume"], "previous": prev, "same_layout": same, "grad_accum": grad_accum, "note": note}


# -----------------------------------------------------------------------------------------------------------
# host records from facts

def interfaces(facts):
    """[{name, ipv4: [cidr, ...], speed_mbps (when the facts give the link speed)}] from a host's gathered network
    facts (ansible_facts; ``speed`` is the kernel's /sys/class/net/<if>/speed, Mbit/s, -1 or absent when unknown)."""
    out = []
    for name in sorted(facts.get("interfaces") or []):
        data = facts.get(name.replace("-", "_")) or facts.get(name) or {}
        cidrs = []
        for item in [data.get("ipv4")] + list(data.get("ipv4_secondaries") or []):
            if isinstance(item, dict) and item.get("address") and item.get("netmask"):
                cidrs.append(str(ipaddress.IPv4Interface("%s/%s" % (item["address"], item["netmask"]))))
        record = {"name": name, "ipv4": cidrs}
        if isinstance(data.get("speed"), int) and data["speed"] > 0:
            record["speed_mbps"] = data["speed"]
        out.append(record)
    return out


def records(names, hostvars):
    """Host records for the planner from hostvars; a host without a record (unreachable) gets reachable=false."""
    records = []
    for name in names:
        record = dict(hostvars[name].get("dsfleet_host_record") or {})
        if not record:
            record = {"name": name, "address": hostvars[name].get("ansible_host", name), "reachable": False}
        records.append(record)
    return records


# -----------------------------------------------------------------------------------------------------------
# what the hosts run: the DeepSpeed config, paths, and every command line with its environment

def ds_config(plan):
    """The DeepSpeed config of the run: batch sizes, precision, ZeRO, optimizer. All policy lives here."""
    if plan.get("strategy", "deepspeed") != "deepspeed":
        # FSDP and DDP (train/dsfleet_torch.py) read the batch sizes, precision, clipping and AdamW from it
        return {
            "train_batch_size": plan["batch"]["global"],
            "train_micro_batch_size_per_gpu": plan["batch"]["micro"],
            "gradient_accumulation_steps": plan["batch"]["grad_accum"],
            "gradient_clipping": GRADIENT_CLIPPING,
            "bf16": {"enabled": plan["precision"] == "bf16"},
            "fp16": {"enabled": plan["precision"] == "fp16"},
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "AdamW", "params": dict(OPTIMIZER, lr=plan["training"]["lr"])},
        }
    zero = {"stage": plan["zero"]["stage"], "overlap_comm": False, "contiguous_gradients": True}
    offload = plan["zero"]["offload"] != "none"
    if offload:
        zero["offload_optimizer"] = {"device": plan["zero"]["offload"], "pin_memory": plan["accelerator"] != "cpu"}
    if plan["nodes"] > 1:
        # no shared filesystem: every host keeps its own ranks' shards and the model states, named by local rank
        checkpoint = {"use_node_local_storage": True}
    else:
        checkpoint = {}
    sizing = plan.get("sizing") or {}
    if sizing.get("known") and sizing.get("zero_stage") == plan["zero"]["stage"]:
        zero.update(sizing["buckets"])  # scaled to the model; DeepSpeed's defaults hold GBs of buffers per rank
    if plan["zero"]["stage"] == 3:
        # the end-of-run export gathers the full 16-bit weights from every rank's shard
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": plan["batch"]["global"],
        "train_micro_batch_size_per_gpu": plan["batch"]["micro"],
        "gradient_accumulation_steps": plan["batch"]["grad_accum"],
        "gradient_clipping": GRADIENT_CLIPPING,
        "steps_per_print": 1000000,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": plan["precision"] == "bf16"},
        "fp16": {"enabled": plan["precision"] == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": dict(OPTIMIZER, lr=plan["training"]["lr"], **(
            # torch's fused AdamW updates in place (the default paths hold the whole partition's sqrt once more);
            # offloaded, DeepSpeed's CPU Adam
            {} if offload else {"torch_adam": True, "fused": True}))},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    } | ({"checkpoint": checkpoint} if checkpoint else {})


def host_paths(home, venv, run_id):
    """Where everything of a run lives on a host (the same layout on every host)."""
    run_dir = "%s/runs/%s" % (home, run_id)
    return {
        "home": home, "venv": venv, "bin": venv + "/bin", "python": venv + "/bin/python",
        "deepspeed": venv + "/bin/deepspeed", "torchrun": venv + "/bin/torchrun", "code": home + "/code", "node": home + "/code/dsfleet_node.py",
        "train": home + "/code/train/train.py", "node_launch": home + "/code/train/node_launch.py", "run_dir": run_dir, "out": run_dir + "/out",
        "log": run_dir + "/node.log", "metrics": run_dir + "/out/metrics.jsonl", "plot": run_dir + "/out/plot.png",
        "tensorboard": run_dir + "/out/tensorboard",
        "hostfile": run_dir + "/hostfile", "ds_config": run_dir + "/ds_config.json",
        "replicas": run_dir + "/replicas.json", "token_cache": home + "/cache/tokens",
    }


def train_args(plan, paths):
    """The training module's arguments, from the plan."""
    t = plan["training"]
    staged = paths.get("inputs") or {}
    args = ["--deepspeed_config", paths["ds_config"], "--output_dir", paths["out"],
            "--model", staged.get("model", t["model"]), "--dataset", staged.get("dataset", t["dataset"]),
            "--text_field", t["text_field"], "--data_format", t["data_format"],
            "--prompt_field", t["prompt_field"], "--response_field", t["response_field"],
            "--messages_field", t["messages_field"], "--token_cache", paths["token_cache"],
            "--max_steps", str(t["max_steps"]), "--block_size", str(t["block_size"]), "--lr", repr(t["lr"]),
            "--warmup_steps", str(t["warmup_steps"]), "--seed", str(t["seed"]), "--log_every", str(t["log_every"]),
            "--plot_every_s", repr(t["plot_every_s"]), "--save_every", str(t["save_every"]), "--save_every_minutes", repr(t["save_every_minutes"]),
            "--keep_checkpoints", str(t["keep_checkpoints"])]
    if t["epochs"]:
        args += ["--epochs", str(t["epochs"])]
    if t["eval_dataset"]:
        args += ["--eval_dataset", staged.get("eval_dataset", t["eval_dataset"])]
    elif t["eval_fraction"]:
        args += ["--eval_fraction", repr(t["eval_fraction"])]
    if t["eval_every"]:
        args += ["--eval_every", str(t["eval_every"])]
    if t.get("activation_checkpointing"):
        args += ["--activation_checkpointing"]
    if t["resume"]:
        args += ["--resume"]
    if plan.get("strategy", "deepspeed") != "deepspeed":
        args += ["--strategy", plan["strategy"]]
        if plan["strategy"] == "fsdp":
            args += ["--fsdp_sharding", plan["fsdp_sharding"]]
    if plan["nodes"] > 1:
        args += ["--replicas", paths["replicas"]]
    return args


def pdsh_args(plan, paths):
    """DeepSpeed's multi-node runner on the master (launcher=pdsh): it ssh's to every host of the hostfile."""
    args = ["--hostfile", paths["hostfile"], "--master_addr", plan["master"]["address"],
            "--master_port", str(plan["master"]["port"])]
    if plan["include"]:
        args += ["--include", plan["include"]]
    return args + ["--launcher", "pdsh"]


def world_info(plan):
    """DeepSpeed's --world_info: every host (hostfile order, as the launcher names it) with the device indices its
    ranks use, JSON in urlsafe base64 -- what `deepspeed --hostfile --include` computes and hands launch.py."""
    return encode_world_info({h["address"]: (h["devices"] if plan["include"] else list(range(h["slots"])))
                              for h in plan["hosts"]})


def encode_world_info(info):
    """{host: [device indices]} (node-rank order) as --world_info: JSON in urlsafe base64, as DeepSpeed's runner."""
    return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()


def node_launch_args(plan, host, paths):
    """One node's ranks: code/train/node_launch.py, DeepSpeed's node launcher (`python -m deepspeed.launcher.launch`)
    without its imports of deepspeed and torch (4-6 s of CPU per host before any rank starts, measured on the rig),
    with the arguments `deepspeed --no_ssh --node_rank N` would pass launch.py. The ranks it starts get what launch.py
    gives them, variable for variable (tests/e2e/test_launcher_args.py runs both)."""
    return [paths["python"], "-u", paths["node_launch"], "--world_info=" + world_info(plan),
            "--master_addr=" + plan["master"]["address"], "--master_port=%d" % plan["master"]["port"],
            "--node_rank=%d" % host["node_rank"]]


def torchrun_args(plan, host):
    """torchrun on one node: static rendezvous at the master (torchrun's default backend with --master_addr), this
    host's ranks after those of the hosts before it (torch elastic sums the ranks per node in node-rank order, so
    hosts may have different slots)."""
    return ["--nnodes", str(plan["nodes"]), "--node_rank", str(host["node_rank"]),
            "--nproc_per_node", str(host["slots"]), "--master_addr", plan["master"]["address"],
            "--master_port", str(plan["master"]["port"]), "--max_restarts", "0"]


# what selects a host's devices for torchrun (DeepSpeed's launcher sets it from --include itself)
VISIBLE_DEVICES = {"nvidia": "CUDA_VISIBLE_DEVICES", "amd": "CUDA_VISIBLE_DEVICES", "intel": "ZE_AFFINITY_MASK"}


def _process_env(plan, host, paths, common=False):
    """The environment of a rank-starting command on ``host`` (``common``: the one the pdsh runner exports)."""
    env = {"PATH": paths["bin"] + ":" + (host.get("path") or SYSTEM_PATH),
           "DS_ACCELERATOR": plan["ds_accelerator"], "PYTHONUNBUFFERED": "1"}
    env.update(plan["env"] if common else host["env"])
    return env


def _device_spec(plan, host):
    """Which devices status.yml reads on a host, for dsfleet_node.py status --devices."""
    if plan["accelerator"] == "cpu":
        return "cpu"
    return "%s:%s" % (plan["accelerator"], ",".join(map(str, host["devices"])))


# Staging is one command per host: the bundle (code/, runs/<id>/; base64 on stdin) is unpacked into the dsfleet
# home, then the supervisor's `stage` verb checks the model, the data, the master port and the checkpoints.
UNPACK = ("import base64, io, subprocess, sys, tarfile\n"
          "data = io.BytesIO(base64.b64decode(sys.stdin.buffer.read()))\n"
          "with tarfile.open(fileobj=data) as tar:\n"
          "    tar.extractall(sys.argv[1], **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))\n"
          "sys.exit(subprocess.call(sys.argv[2:]))\n")


def hub_folder(repo, revision):
    """The folder name a hub model's download lives in under <home>/inputs/hub (one per repository and revision)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", revision)[:40]
    return "%s--%s" % (repo.replace("/", "--"), safe if safe == revision else "%s-%s" % (
        safe, hashlib.sha1(revision.encode()).hexdigest()[:8]))


def hub_command(plan):
    """On the master, for a hub model: download it once into its folder, then send it to every other host that
    does not hold the same commit (dsfleet_node.py hub; the bundle on stdin carries the node code)."""
    master = plan["hosts"][0]
    item = next((i for i in master["inputs"] if i.get("hub")), None)
    if item is None:
        return None
    targets = [{"name": h["name"], "address": h["address"],
                "dest": next(i["dest"] for i in h["inputs"] if i["name"] == item["name"])} for h in plan["hosts"][1:]]
    paths = master["paths"]
    return {"argv": [paths["python"], "-c", UNPACK, paths["home"]]
            + _node(paths, "hub", "--repo", item["hub"], "--revision", item["revision"], "--dest", item["dest"],
                    "--targets", json.dumps(targets))}


def _node(paths, verb, *args):
    return [paths["python"], paths["node"], verb, "--run-dir", paths["run_dir"]] + list(args)


def add_processes(plan, records):
    """Per host: paths, the rank-starting process, and the supervisor commands that start, watch and stop it."""
    by_name = {r["name"]: r for r in records}
    pdsh = plan["launcher"] == "pdsh"
    slurm = plan["launcher"] == "slurm"
    job = ["--slurm-job", plan["slurm"]["job_name"]] if slurm else []
    for host in plan["hosts"]:
        record = by_name[host["name"]]
        paths = host_paths(record["home"], record.get("venv") or record["home"] + "/venv", plan["run_id"])
        # the inputs only the controller has: where each host keeps its copy (unchanged files are not sent again)
        host["inputs"] = []
        for name, src in sorted((plan.get("inputs") or {}).items()):
            if src.get("hub"):
                # the same folder on every host: the master downloads into it, the others receive it
                folder = "%s/inputs/hub/%s" % (record["home"], hub_folder(src["hub"], src["revision"]))
                host["inputs"].append({"name": name, "src": None, "hub": src["hub"], "revision": src["revision"],
                                       "dir": True, "folder": folder, "dest": folder})
                continue
            base = src["path"].rstrip("/").split("/")[-1] or name
            folder = "%s/inputs/%s-%s" % (record["home"], base, hashlib.sha1(src["path"].encode()).hexdigest()[:8])
            dest = folder if src["dir"] else folder + "/" + base
            host["inputs"].append({"name": name, "src": src["path"], "hub": None, "dir": src["dir"],
                                   "folder": folder, "dest": dest})
        paths["inputs"] = {i["name"]: i["dest"] for i in host["inputs"]}
        host["paths"] = paths
        host["path"] = record.get("path") or SYSTEM_PATH
        is_master = host["node_rank"] == 0
        # pdsh: the runner on the master starts every rank and holds every host's output; the ansible launcher
        # starts and watches each host's own launcher
        host["watched"] = is_master or not pdsh
        env = _process_env(plan, host, paths)
        # what the ansible launcher starts on this host (one DeepSpeed launcher per node); also what
        # runs/<id>/nodes/<host>.sh starts by hand, whichever launcher the plan uses
        if plan.get("strategy", "deepspeed") == "deepspeed":
            host["node_process"] = {"argv": node_launch_args(plan, host, paths) + [paths["train"]] + train_args(plan, paths), "env": dict(env),
                                    "cwd": paths["run_dir"]}
        else:  # FSDP, DDP: one torchrun per node
            if plan["accelerator"] in VISIBLE_DEVICES:
                env[VISIBLE_DEVICES[plan["accelerator"]]] = ",".join(map(str, host["devices"]))
            host["node_process"] = {"argv": [paths["torchrun"]] + torchrun_args(plan, host) + [paths["train"]]
                                    + train_args(plan, paths), "env": dict(env), "cwd": paths["run_dir"]}
        process = None
        watch = plan["watch"]
        supervise = _node(paths, "start", "--stall-timeout", str(watch["stall_timeout"]), "--startup-timeout",
                          str(watch["startup_timeout"]), "--grace", str(watch["stop_grace"]))
        if pdsh and is_master:
            env["PDSH_RCMD_TYPE"] = "ssh"
            process = {"argv": [paths["deepspeed"]] + pdsh_args(plan, paths) + [paths["train"]]
                       + train_args(plan, paths), "env": env, "cwd": paths["run_dir"]}
        elif slurm:
            # SLURM starts it: this node's step of job.sbatch runs the node's launcher under the supervisor, in the
            # foreground (the step lasts as long as the ranks)
            host["slurm_step"] = {"argv": supervise + ["--foreground", "--"] + host["node_process"]["argv"],
                                  "env": dict(env), "cwd": paths["run_dir"]}
        elif not pdsh:
            process = dict(host["node_process"], env=env)
        host["process"] = process
        preflight = {"argv": [paths["python"], paths["train"], "--preflight"] + train_args(plan, paths),
                     "env": dict(env), "cwd": paths["run_dir"]}
        host["commands"] = {
            "preflight": preflight,
            "stage": {"argv": [paths["python"], "-c", UNPACK, paths["home"]]
                      + _node(paths, "stage", "--preflight", json.dumps(preflight))
                      + (["--port", str(plan["master"]["port"])] if is_master else [])
                      + (["--checkpoints"] if plan["training"]["resume"] else [])},
            # the supervisor outlives the controller and enforces the timeouts itself
            "start": None if process is None else {
                "argv": supervise + ["--"] + process["argv"], "env": process["env"], "cwd": process["cwd"]},
            # launcher=slurm: the master submits job.sbatch (copied beside the run there) and cancels it
            "submit": {"argv": ["sbatch", "--parsable", paths["run_dir"] + "/job.sbatch"], "cwd": paths["home"],
                       "script": paths["run_dir"] + "/job.sbatch"} if slurm and is_master else None,
            "cancel": {"argv": ["scancel", "--me", "--name", plan["slurm"]["job_name"]]}
            if slurm and is_master else None,
            "status": {"argv": _node(paths, "status", "--wait", str(watch["poll_interval"]))
                       + (["--report"] if is_master else []) + job},
            "status_now": {"argv": _node(paths, "status", "--devices", _device_spec(plan, host))
                           + (["--report"] if is_master else []) + job},
            "stop": {"argv": _node(paths, "stop", "--grace", str(watch["stop_grace"]))},
            # SIGTERM: every rank writes a checkpoint at its next step, then exits (train.py)
            "stop_checkpoint": {"argv": _node(paths, "stop", "--grace", str(watch["checkpoint_grace"]))},
            "checkpoints": {"argv": _node(paths, "checkpoints")},
            # the resume gather (dsfleet_core.run.resume_source adds what and where)
            "pack": {"argv": _node(paths, "pack")},
            "receive": {"argv": _node(paths, "receive")},
            "universal": {"argv": _node(paths, "universal")} if is_master else None,
            # playbooks/export.yml (dsfleet_core.run.export_source adds the step and the sources)
            "export": {"argv": _node(paths, "export", "--model",
                                     paths["inputs"].get("model", plan["training"]["model"]), "--script",
                                     paths["code"] + "/train/export_hf.py")} if is_master else None,
            "ps": {"argv": _node(paths, "ps")},
        }
    master = plan["hosts"][0]
    for host in plan["hosts"]:
        host["commands"]["hub"] = hub_command(plan) if host is master else None
    plan["deepspeed_env"] = _process_env(plan, master, master["paths"], common=True)
    plan["replicas"] = replicas(plan)
    return plan


def replicas(plan):
    """After each checkpoint a host copies its shards to the next host of the plan (a ring): a dead host's shards
    live on. [{ranks, argv}] for train.py --replicas (argv + --tag TAG); empty on one host."""
    hosts = plan["hosts"]
    if len(hosts) < 2:
        return []
    entries = []
    for i, host in enumerate(hosts):
        nxt = hosts[(i + 1) % len(hosts)]
        entries.append({
            "ranks": list(range(host["first_rank"], host["first_rank"] + host["slots"])),
            "to": nxt["name"],
            "argv": _node(host["paths"], "replicate", "--from", host["name"], "--to", str(nxt["address"]),
                          "--keep", str(plan["training"]["keep_checkpoints"]),
                          "--remote", json.dumps(nxt["commands"]["receive"]["argv"]))})
    return entries
