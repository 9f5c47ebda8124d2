"""The inference plan: which hosts answer which prompts, with what tensor-parallel degree and dtype (pure).

``make_infer_plan(hosts, knobs, model, prompts)`` takes the same host records as the training plan (facts), the
knobs, what ``train/dsfleet_modelinfo.py`` read of the model (config, exact parameter count) and the prompts
(their count and longest length), and decides per host:

- the dtype (``precision``: bf16 where every device of the host has it, else fp16 on GPUs / fp32 on CPUs);
- the smallest tensor-parallel degree ``tp`` whose shard fits one device (AutoTP shards attention and MLP; the
  embedding stays whole on every rank; the KV cache of a batch at the longest prompt + ``max_new_tokens`` and a
  runtime reserve are counted), among the powers of two up to the host's devices that divide the model's
  attention and KV heads; a family AutoTP does not support (GPT-2 and a few encoder models) gets tp=1 only;
- how many replicas (tp-sized groups) the host runs: every device used, as long as host memory holds each rank's
  full copy while it loads (the model is read whole into host memory, then sharded);
- its slice of the prompts, in order, in proportion to its replicas.

Each replica is its own DeepSpeed world (``deepspeed`` on 127.0.0.1, its own port and devices): no traffic between
hosts or replicas, so hosts of different vendors and sizes serve one prompts file together. A host the model does not fit is left out
and says why; a forced ``tp`` a host cannot take is an error before anything starts.
"""

from __future__ import annotations

import hashlib
import json
import math

from . import PlanError
from . import knobs as K
from . import plan as P

INFER_VERSION = 1
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# model_type values whose modules DeepSpeed's AutoTP refuses (deepspeed/module_inject/auto_tp.py: supported())
AUTOTP_UNSUPPORTED = frozenset({"gpt2", "deberta", "deberta-v2", "flaubert", "fsmt", "led", "longformer", "xlm",
                                "xlnet"})
RESERVE_MIB = {"gpu": 1024, "cpu": 512}  # CUDA/ROCm context and allocator slack; torch + transformers on a CPU rank
DEVICE_USE = 0.90                         # of a device's (or the host's) memory the plan lets a rank (or the host) use
CHARS_PER_TOKEN = 2                       # a conservative prompt length estimate before tokenizing (real text: ~4)


def _fail(msg):
    raise PlanError("dsfleet infer: " + msg)


def split(count, weights):
    """Contiguous [start, end) slices of ``count`` items in proportion to ``weights`` (largest remainder)."""
    total = sum(weights)
    if total <= 0:
        return [[0, 0] for _ in weights]
    exact = [count * w / total for w in weights]
    sizes = [int(math.floor(e)) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - sizes[i]), i))[: count - sum(sizes)]:
        sizes[i] += 1
    out, start = [], 0
    for size in sizes:
        out.append([start, start + size])
        start += size
    return out


def _mib(value):
    return int(math.ceil(value / 2 ** 20))


def sizing(model, dtype, tp, batch, context):
    """Memory of one rank (MiB) with the model sharded ``tp`` ways: {weights, kv, activations, shard, full}."""
    cfg = model.get("config") or {}
    bpe = BYTES[dtype]
    params = model.get("params")
    if params is None:  # a .bin checkpoint: sized by its files, at the bytes its files hold
        params = int(model.get("bytes") or 0) // BYTES.get({"F32": "fp32"}.get(model.get("dtype"), "fp16"), 2)
    hidden = int(cfg.get("hidden_size") or 0)
    vocab = int(cfg.get("vocab_size") or 0)
    layers = int(cfg.get("num_hidden_layers") or 0)
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (hidden // heads if heads else 0))
    embed = min(params, vocab * hidden)  # AutoTP leaves the input embedding whole on every rank
    shard = embed + (params - embed) / tp
    kv = 2 * layers * kv_heads * head_dim * context * batch * bpe / tp
    act = batch * context * hidden * bpe * 8 + batch * vocab * 4 * 2
    return {"weights": _mib(params * bpe), "shard": _mib(shard * bpe), "kv": _mib(kv), "activations": _mib(act)}


def _tp_choices(model, slots):
    cfg = model.get("config") or {}
    heads = int(cfg.get("num_attention_heads") or 1)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    out, t = [], 1
    while t <= slots:
        if heads % t == 0 and kv_heads % t == 0:
            out.append(t)
        t *= 2
    return out


def _host_precision(k, kind, bf16, name):
    if k["precision"] == "auto":
        return "bf16" if bf16 else ("fp32" if kind == "cpu" else "fp16")
    if k["precision"] == "bf16" and not bf16:
        _fail("precision=bf16 but host %s cannot run bf16 (%s); pass -e precision=%s or exclude it"
              % (name, "no avx512_bf16/amx on its CPU" if kind == "cpu" else "its devices are older than bf16",
                 "fp32" if kind == "cpu" else "fp16"))
    if k["precision"] == "fp16" and kind == "cpu":
        _fail("precision=fp16 is not supported by DeepSpeed on CPU (host %s); pass -e precision=bf16 or fp32" % name)
    return k["precision"]


def model_key(source):
    """Where a model shipped from the controller lies under a host's dsfleet home: models/<name>-<hash>."""
    base = source.rstrip("/").split("/")[-1] or "model"
    return "%s-%s" % (base, hashlib.sha1(source.encode()).hexdigest()[:8])


def make_infer_plan(hosts, knobs, model, prompts):
    """The inference plan (see the module docstring). ``model``: {"source": {"kind": "controller"|"host", "path",
    "label"}, "info": dsfleet_modelinfo.model_info(...)}; ``prompts``: {"count", "max_chars", "chat"}."""
    k = K.normalize(knobs)
    if not k["run_id"]:
        _fail("run_id is empty; the infer play names the run before planning")
    info, source = model.get("info") or {}, model.get("source") or {}
    if not info.get("found"):
        _fail(info.get("error") or "the model was not found")
    count = int(prompts.get("count") or 0)
    if count < 1:
        _fail("there is no prompt; pass -e prompt=\"...\" or -e prompts=FILE.jsonl")
    cfg = info.get("config") or {}
    autotp = str(cfg.get("model_type") or "").lower() not in AUTOTP_UNSUPPORTED
    context = int(math.ceil(int(prompts.get("max_chars") or 0) / CHARS_PER_TOKEN)) + k["max_new_tokens"]
    if cfg.get("max_position_embeddings"):
        context = min(context, int(cfg["max_position_embeddings"]))
    excluded, candidates = P.take_part(hosts, k, _fail)
    # Every host is its own world, so vendors mix; CPU-only hosts serve only when no host has an accelerator
    # (or accelerator=cpu): a CPU rank would hold every GPU host's share of the prompts back.
    kinds = {h["name"]: P._group_of(h) for h in candidates}
    if k["accelerator"] == "auto":
        wanted = set(kinds.values()) - {"cpu"} or {"cpu"}
    else:
        wanted = {k["accelerator"]}
    members = []
    for host in candidates:
        if kinds[host["name"]] in wanted:
            members.append(host)
        else:
            excluded.append({"name": host["name"], "reason": "%s; the plan uses %s" % (
                "CPU only" if kinds[host["name"]] == "cpu" else kinds[host["name"]] + " devices",
                ", ".join(sorted(wanted)))})
    if not members:
        _fail("no host can serve (%s); change -e accelerator= or -e exclude="
              % "; ".join("%s: %s" % (e["name"], e["reason"]) for e in excluded))

    plan_hosts = []
    for host in members:
        acc = kinds[host["name"]]
        kind = "cpu" if acc == "cpu" else "gpu"
        slots, devices, device_mib, bf16, label = P._devices(host, acc, k["cpu_ranks"])
        dtype = _host_precision(k, kind, bf16, host["name"])
        host_mib = int(((host.get("gpu") or {}).get("cpu") or {}).get("memory_mib") or 0)
        choices = _tp_choices(info, slots) if autotp else [1]
        if k["tp"]:
            if k["tp"] > slots:
                _fail("tp=%d but host %s has %d %s (%s); pass a smaller tp, 0 for the plan's choice, or exclude it"
                      % (k["tp"], host["name"], slots, "CPU ranks (cpu_ranks)" if kind == "cpu" else
                         "device(s)", label))
            if k["tp"] > 1 and not autotp:
                _fail("tp=%d but DeepSpeed's automatic tensor parallelism does not support model type %s; pass "
                      "-e tp=1 (every device then holds the whole model)" % (k["tp"], cfg.get("model_type")))
            if k["tp"] not in _tp_choices(info, k["tp"]):
                _fail("tp=%d does not divide the model's %s attention heads / %s KV heads (and must be a power of "
                      "two); pass one of %s" % (k["tp"], cfg.get("num_attention_heads"),
                                                cfg.get("num_key_value_heads"), _tp_choices(info, 64)))
            choices = [k["tp"]]
        fit = None
        tried = []
        for tp in choices:
            size = sizing(info, dtype, tp, k["infer_batch"], context)
            need = size["shard"] + size["kv"] + size["activations"] + RESERVE_MIB[kind]
            if kind == "cpu":  # a CPU rank holds the whole model while it loads
                need = max(need, size["weights"] + RESERVE_MIB[kind])
            tried.append("tp=%d needs %d MiB" % (tp, need))
            if need <= device_mib * DEVICE_USE:
                fit = (tp, size, need)
                break
        reason = None
        if fit is None:
            reason = "the model does not fit: %s per %s, which has %d MiB%s" % (
                ", ".join(tried), "rank" if kind == "cpu" else "device", device_mib,
                "" if autotp or kind == "cpu" else " (AutoTP does not support %s: tp=1 only)" % cfg.get("model_type"))
        else:
            tp, size, need = fit
            # every rank first loads the whole model into host memory
            load = size["weights"] + RESERVE_MIB["cpu"]
            replicas = slots // tp
            if kind == "gpu" and host_mib:
                replicas = min(replicas, int(host_mib * DEVICE_USE // (load * tp)))
            if replicas < 1:
                reason = ("host memory %d MiB cannot hold %d rank(s) loading the %d MiB model at once"
                          % (host_mib, tp, size["weights"]))
        if reason:
            if k["tp"]:
                _fail("tp=%d on host %s: %s; pass another tp (0: the plan picks), or exclude it"
                      % (k["tp"], host["name"], reason))
            excluded.append({"name": host["name"], "reason": reason})
            continue
        cpu = (host.get("gpu") or {}).get("cpu") or {}
        ranks = replicas * tp
        env = {"GLOO_SOCKET_IFNAME": "lo"}
        if kind == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, int(cpu.get("cores") or 1) // ranks))  # set again below
        elif acc in ("nvidia", "amd"):
            env["NCCL_SOCKET_IFNAME"] = "lo"
        else:
            env["CCL_SOCKET_IFNAME"] = "lo"
        if host.get("ld_library_path"):
            env["LD_LIBRARY_PATH"] = str(host["ld_library_path"])
        env.update(k["extra_env"])
        plan_hosts.append({
            "name": host["name"], "accelerator": acc, "ds_accelerator": P.BACKENDS[acc][1], "device_name": label,
            "devices": None if devices is None else devices[:ranks], "memory_mib": device_mib, "host_memory_mib": host_mib,
            "dtype": dtype, "tp": tp, "replicas": replicas, "ranks": ranks, "need_mib": need, "sizing": size,
            "env": env, "record": host, "cores": int(cpu.get("cores") or 1),
        })
    if not plan_hosts:
        _fail("the model fits no host: %s. Add hosts with more memory, lower the precision (fp32 -> bf16/fp16), "
              "lower infer_batch/max_new_tokens, or use a smaller model"
              % "; ".join("%s: %s" % (e["name"], e["reason"]) for e in excluded))

    # prompts in order, in proportion to the replicas; a host left without one is not started
    for host, (start, end) in zip(plan_hosts, split(count, [h["replicas"] for h in plan_hosts])):
        host["prompts"] = [start, end]
        # a replica without a prompt would only load the model
        host["replicas"] = max(1, min(host["replicas"], end - start))
        host["ranks"] = host["replicas"] * host["tp"]
        if host["devices"] is not None:
            host["devices"] = host["devices"][:host["ranks"]]
        if host["accelerator"] == "cpu":
            host["env"]["OMP_NUM_THREADS"] = str(max(1, host.pop("cores") // host["ranks"]))
        else:
            host.pop("cores")
    for host in [h for h in plan_hosts if h["prompts"][0] == h["prompts"][1]]:
        excluded.append({"name": host["name"], "reason": "no prompt left for it (%d prompt(s))" % count})
    plan_hosts = [h for h in plan_hosts if h["prompts"][0] < h["prompts"][1]]

    plan = {
        "kind": "infer", "version": INFER_VERSION, "run_id": k["run_id"],
        "model": {"label": source.get("label") or info.get("model"), "source": source.get("kind"),
                  "path": source.get("path"), "model_type": cfg.get("model_type"), "params": info.get("params"),
                  "autotp": autotp, "chat_template": bool(info.get("chat_template"))},
        "generation": {"max_new_tokens": k["max_new_tokens"], "temperature": k["temperature"], "top_p": k["top_p"],
                       "seed": k["seed"], "batch": k["infer_batch"], "chat": k["chat"],
                       "greedy": k["temperature"] == 0, "context": context},
        "prompts": count, "master_port": k["master_port"], "timeout": k["infer_timeout"],
        "hosts": plan_hosts, "excluded": excluded, "knobs": dict(k),
    }
    for host in plan_hosts:
        _processes(plan, host)
    return plan


def ds_inference_config(host):
    """DeepSpeed's inference config for one host (deepspeed.init_inference(model, config=...))."""
    # AutoTP shards the Hugging Face module as it is; kernel injection (replace_with_kernel_inject) has no CPU
    # implementation and lags behind transformers' model code
    return {"dtype": host["dtype"], "tensor_parallel": {"tp_size": host["tp"]}, "replace_with_kernel_inject": False}


def _processes(plan, host):
    record = host.pop("record")
    home = record["home"]
    venv = record.get("venv") or home + "/venv"
    paths = P.host_paths(home, venv, plan["run_id"])
    mine = "%s/hosts/%s" % (paths["run_dir"], host["name"])
    paths.update(infer=paths["code"] + "/train/infer.py", ds_inference_config=mine + "/ds_inference_config.json",
                 prompts=mine + "/prompts.jsonl")
    if plan["model"]["source"] == "controller" and record.get("local"):
        paths["model"] = plan["model"]["path"]  # the controller itself: read it where it is
    elif plan["model"]["source"] == "controller":
        paths["model"] = "%s/models/%s" % (home, model_key(plan["model"]["path"]))
    else:
        paths["model"] = plan["model"]["path"]
    host["paths"] = paths
    host["ship_model"] = plan["model"]["source"] == "controller" and not record.get("local")
    g = plan["generation"]
    args = ["--model", paths["model"], "--ds_config", paths["ds_inference_config"], "--prompts", paths["prompts"],
            "--output_dir", paths["out"], "--max_new_tokens", str(g["max_new_tokens"]), "--temperature",
            repr(g["temperature"]), "--top_p", repr(g["top_p"]), "--seed", str(g["seed"]), "--batch",
            str(g["batch"]), "--chat", g["chat"]]
    env = {"PATH": paths["bin"] + ":" + (record.get("path") or P.SYSTEM_PATH), "DS_ACCELERATOR": host["ds_accelerator"],
           "PYTHONUNBUFFERED": "1"}
    env.update(host["env"])
    # one DeepSpeed world per replica: tp ranks on their own devices and port (see train/infer.py for why)
    worlds, ports = [], []
    for r in range(host["replicas"]):
        port = plan["master_port"] + r
        # what `deepspeed --include localhost:<devices>` (--num_gpus <tp> on CPU) starts, without the runner and
        # launch.py importing deepspeed and torch twice before the ranks do (plan.node_launch_args)
        devices = (host["devices"][r * host["tp"]:(r + 1) * host["tp"]] if host["devices"] is not None
                   else list(range(host["tp"])))
        launcher = [paths["python"], "-u", paths["node_launch"],
                    "--world_info=" + P.encode_world_info({"localhost": devices}), "--master_addr=127.0.0.1",
                    "--master_port=%d" % port, "--node_rank=0"]
        worlds.append(launcher + [paths["infer"]] + args + ["--replica", str(r), "--replicas", str(host["replicas"])])
        ports.append(port)
    host["ports"] = ports
    preflight = {"argv": [paths["python"], paths["infer"], "--preflight"] + args, "env": dict(env),
                 "cwd": paths["run_dir"]}
    host["commands"] = {
        "stage": {"argv": [paths["python"], "-c", P.UNPACK, home]
                  + P._node(paths, "stage", "--preflight", json.dumps(preflight), "--ports", ",".join(map(str, ports)))},
        # bounded: a replica that hangs is stopped (TERM, then KILL 30 s later) and the host reports it
        "infer": {"argv": ["timeout", "-k", "30", str(plan["timeout"])] + P._node(paths, "together", "--specs",
                                                                                    json.dumps(worlds)),
                  "env": env, "cwd": paths["run_dir"]},
        "worlds": worlds,
    }
    host["ds_inference_config"] = ds_inference_config(host)


def host_files(plan, prompts):
    """{relative path: text} of what each host reads: hosts/<name>/ds_inference_config.json and its prompts."""
    out = {"infer-plan.json": json.dumps(plan, indent=2, sort_keys=True) + "\n"}
    for host in plan["hosts"]:
        start, end = host["prompts"]
        out["hosts/%s/ds_inference_config.json" % host["name"]] = json.dumps(
            host["ds_inference_config"], indent=2, sort_keys=True) + "\n"
        out["hosts/%s/prompts.jsonl" % host["name"]] = "".join(json.dumps(p) + "\n" for p in prompts[start:end])
    return out


def table(plan):
    """What the plan decided, for a person: one line per host, the left-out hosts and why."""
    m, g = plan["model"], plan["generation"]
    lines = ["model %s (%s%s, %s parameters); %d prompt(s), %s, max_new_tokens %d%s"
             % (m["label"], m["model_type"], "" if m["autotp"] else ", no AutoTP",
                "{:,}".format(m["params"]) if m["params"] else "?", plan["prompts"],
                "greedy" if g["greedy"] else "temperature %s top_p %s seed %s" % (g["temperature"], g["top_p"], g["seed"]),
                g["max_new_tokens"], ", chat template" if m["chat_template"] and g["chat"] != "off" else "")]
    for h in plan["hosts"]:
        lines.append("%-12s %-6s %-24s %s tp=%d x %d replica(s) = %d rank(s); %d MiB per %s of %d; prompts %d-%d"
                     % (h["name"], h["accelerator"], (h["device_name"] or "")[:24], h["dtype"], h["tp"], h["replicas"],
                        h["ranks"], h["need_mib"], "rank" if h["accelerator"] == "cpu" else "device", h["memory_mib"],
                        h["prompts"][0], h["prompts"][1] - 1))
    for e in plan["excluded"]:
        lines.append("%-12s left out: %s" % (e["name"], e["reason"]))
    return lines


def summary_lines(summary, first, dest):
    """What infer.yml prints at the end: totals, each host's throughput, the first generations."""
    lines = ["%d of %d prompt(s) answered, %d token(s) in %.1f s (%s tokens/s over the fleet) -> %s/generations.jsonl"
             % (summary["answered"], summary["prompts"], summary["tokens"], summary["seconds"],
                summary["tokens_per_s"] if summary["tokens_per_s"] is not None else "?", dest)]
    for h in summary["hosts"]:
        lines.append("%-12s %d prompt(s), %d token(s), %s tokens/s (tp=%d x %d, %s; model loaded in %.1f s)"
                     % (h["name"], h["prompts"], h["tokens"], h["tokens_per_s"] if h["tokens_per_s"] else "?",
                        h["tp"], h["replicas"], h["dtype"], h["load_seconds"]))
    for row in first:
        prompt = row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"])
        text = "".join(c if c.isprintable() else " " for c in row["output"][:120])
        lines.append("[%d] %s -> %s" % (row["index"], prompt[:60], text))
    return lines
