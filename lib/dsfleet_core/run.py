"""Judging a run while it goes and after it ends: progress lines, failure blame, summary.json, tables.

Pure functions of the plan (lib/dsfleet_core/plan.py) and what the hosts' supervisors report
(roles/launch/files/dsfleet_node.py status), so failure handling is unit-tested.
"""

from __future__ import annotations

import json
import math

from . import PlanError
from . import speed as SP


def layout_kind(plan):
    """How the run's checkpoints are laid out, as train.py names it in each tag's marker: deepspeed, fsdp-full,
    fsdp-hybrid, ddp."""
    strategy = plan.get("strategy") or "deepspeed"
    return strategy + ("-" + plan["fsdp_sharding"] if strategy == "fsdp" else "")


def strategy_text(plan_or_row):
    """ZeRO-2 (+ offload), FSDP (hybrid sharding), DDP."""
    strategy = plan_or_row.get("strategy") or "deepspeed"
    if strategy == "fsdp":
        return "FSDP (%s sharding)" % plan_or_row.get("fsdp_sharding")
    if strategy == "ddp":
        return "DDP"
    zero = plan_or_row.get("zero") or plan_or_row
    return "ZeRO-%d%s" % (zero.get("zero_stage", zero.get("stage")), " + offload" if zero.get("offload") == "cpu" else "")


def plan_table(plan):
    """Lines a person reads: one per host, then the left-out hosts and the global choices."""
    rows = [("host", "address", "devices", "memory/rank", "slots", "ranks", "ifname")]
    for h in plan["hosts"]:
        rows.append((h["name"], h["address"], h["device_name"], "%d MiB" % h["memory_mib"], str(h["slots"]),
                     "%d-%d" % (h["first_rank"], h["first_rank"] + h["slots"] - 1), h["ifname"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for e in plan["excluded"]:
        lines.append("left out: %s — %s" % (e["name"], e["reason"]))
    for e in plan.get("left_out_devices") or []:
        lines.append("left out: %s's %s (device %s) — %s" % (e["name"], e["device_name"],
                                                            ",".join(map(str, e["devices"])), e["reason"]))
    lines.append("accelerator %s, backend %s, precision %s, world size %d on %d host(s), master %s:%d (%s), "
                 "launcher %s, %s" % (plan["accelerator"], plan["backend"], plan["precision"],
                                      plan["world_size"], plan["nodes"], plan["master"]["address"],
                                      plan["master"]["port"], plan["master"]["name"], plan["launcher"]
                                      + (" (torchrun on every host)" if plan.get("strategy", "deepspeed") != "deepspeed"
                                         else ""), strategy_text(plan)))
    slurm = plan.get("slurm")
    if slurm:
        comps = slurm["components"]
        def tasks(c):
            return "%d task(s) a node%s" % (c["tasks_per_node"], ", --gres=%s" % c["gres"] if c["gres"] else "")
        lines.append("slurm: job %s on node(s) %s, whole nodes, %s%s; each node's launcher is its one step task; %s" % (
            slurm["job_name"], ",".join(slurm["nodes"]), tasks(comps[0]) if len(comps) == 1 else
            "a heterogeneous job (%s)" % "; ".join("%s: %s" % (",".join(c["nodes"]), tasks(c)) for c in comps),
            (", " + " ".join(slurm["options"])) if slurm["options"] else "",
            "submitted on %s" % plan["master"]["name"] if slurm["submit"]
            else "not submitted (slurm_submit=false): sbatch job.sbatch on a SLURM host"))
    resume = plan.get("resume")
    if resume:
        prev = resume.get("previous")
        if prev is None:
            lines.append("resume: run %s (no record of the layout that wrote its checkpoints; the hosts' markers "
                         "decide: exact, or a universal checkpoint)" % resume["run"])
        elif resume["same_layout"]:
            lines.append("resume: run %s on the same layout (%d rank(s)): exact continuation from each host's own "
                         "shards" % (resume["run"], prev["world_size"]))
        else:
            lines.append("resume: run %s was written by %d rank(s) on %s; now %d rank(s): its shards are gathered on "
                         "%s and converted to a universal checkpoint (ds_to_universal)%s"
                         % (resume["run"], prev["world_size"], ", ".join(h["name"] for h in prev["hosts"]),
                            plan["world_size"], plan["master"]["name"],
                            "; " + resume["note"] if resume["note"] else ""))
    for name, src in sorted((plan.get("inputs") or {}).items()):
        if src.get("hub"):
            others = [h["name"] for h in plan["hosts"][1:]]
            lines.append("%s %s@%s: from the hub, downloaded once on the master %s into %s%s (HF_TOKEN and "
                         "HF_ENDPOINT from the controller's environment)"
                         % (name, src["hub"], src["revision"], plan["master"]["name"],
                            plan["hosts"][0]["paths"]["inputs"][name],
                            "; shipped to %s over the ssh mesh (a host holding the same commit is skipped)"
                            % ", ".join(others) if others else ""))
            continue
        lines.append("%s %s: on the controller only; copied to every host (%s), unchanged files are not sent again"
                     % (name, src["path"], plan["hosts"][0]["paths"]["inputs"][name]))
    sizing = plan.get("sizing")
    if sizing and sizing.get("known"):
        lines.append("memory: %s parameters (%s%s); %s %s, micro batch %d x %d tokens: %d MiB per device "
                     "(model states %d, activations %d, buffers %d, runtime %d) of %d on the smallest (%s, %s)"
                     % ("{:,}".format(sizing["params"]), sizing["family"],
                        ", %s active" % "{:,}".format(sizing["params_active"])
                        if sizing["params_active"] != sizing["params"] else "", strategy_text(sizing),
                        sizing["precision"], sizing["micro_batch"],
                        sizing["block_size"], sizing["device_mib"], sizing["model_states_mib"],
                        sizing["activations_mib"], sizing.get("buffers_mib", 0),
                        sizing["runtime_mib"], sizing["smallest_device"]["memory_mib"],
                        sizing["smallest_device"]["host"], sizing["smallest_device"]["name"]))
        if sizing.get("chosen_by_plan"):
            lines.append("chosen by the plan (%s): %s" % (", ".join(sizing["chosen_by_plan"]), _why_chosen(sizing)))
    elif sizing:
        lines.append("memory: " + sizing["note"])
    speed = plan.get("speed")
    if speed and speed.get("tokens_per_s"):
        lines.append("speed (estimate from datasheet peaks at %d%% utilization): %.0f tokens/s, %.2f s per step "
                     "(compute %.2f on the slowest, %s; communication %.2f over %s%s; offload %.2f)%s"
                     % (speed["model_flops_utilization"] * 100, speed["tokens_per_s"], speed["step_s"],
                        speed["compute_s"], speed["slowest_device"], speed["communication_s"],
                        "%g Gbit/s" % speed["network_gbps"] if speed["network_gbps"] else
                        "PCIe (assumed %d Gbit/s; NVLink is not in the facts)" % SP.ASSUMED_PCIE_GBPS,
                        " (assumed where the facts give no link speed)" if speed["network_assumed"] else "",
                        speed["offload_s"], "; " + speed["note"] if speed["note"] else ""))
    elif speed:
        lines.append("speed: " + speed["note"])
    lines += ["warning: " + w for w in plan["warnings"]]
    return lines


def _config_name(row):
    return strategy_text(row)


def _why_chosen(sizing):
    """What the plan passed over and what it took, from sizing["considered"] (in the order it tried them)."""
    last = {}
    for row in sizing.get("considered") or []:
        if row["rejected"]:
            last[_config_name(row)] = row  # the smallest micro batch tried, with checkpointing when it was tried
    passed = ["%s %s even at micro batch %d%s" % (name, row["rejected"].split(", over")[0], row["micro_batch"],
                                                  " with activation checkpointing"
                                                  if row["activation_checkpointing"] else "")
              for name, row in last.items()]
    took = "%s, micro batch %d x %d accumulated%s" % (
        _config_name(sizing), sizing["micro_batch"], sizing["grad_accum"],
        ", activation checkpointing" if sizing["activation_checkpointing"] else "")
    return "; ".join(passed + ["so " + took if passed else took + " (the least sharded that fits)"])


def status_json(text):
    """The supervisor's status object from a command's output (the last JSON line; a login shell may print other
    lines first), or None when there is none (the host did not answer)."""
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def _duration(seconds):
    seconds = int(max(0, seconds or 0))
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(seconds, 60)
    hours, rest = divmod(seconds, 3600)
    return "%dh%02dm" % (hours, rest // 60)


def follow_line(status):
    """One progress line from the reporting host's status: step/total, loss, tokens/s, elapsed, ETA."""
    st = status or {}
    p = st.get("progress") or {}
    now = float(st.get("now") or 0)
    if p.get("event") in ("step", "end", "stopped") and p.get("step") is not None:
        step, total, start = int(p["step"]), int(p.get("total") or 0), int(p.get("start_step") or 0)
        elapsed = float(p.get("elapsed_s") or 0) + max(0.0, now - float(p.get("time") or now))
        rate = (step - start) / elapsed if elapsed > 0 and step > start else 0
        eta = (total - step) / rate if rate > 0 else None
        loss = p.get("loss")
        return "step %d/%d  loss %s  %s tokens/s  elapsed %s  ETA %s" % (
            step, total, "%.4f" % loss if _finite(loss) else "n/a", "%.0f" % (p.get("tokens_per_s") or 0),
            _duration(elapsed), _duration(eta) if eta is not None else "n/a")
    job = st.get("slurm") or {}
    if st.get("state") == "queued" and job.get("id"):
        if job.get("state") == "RUNNING":
            return "starting: SLURM job %s is running; this host's step is starting" % job["id"]
        reason = job.get("reason") if job.get("reason") not in (None, "", "None", "(null)") else ""
        return "queued: SLURM job %s %s%s" % (job["id"], job.get("state", "?"), " (%s)" % reason if reason else "")
    started = float(st.get("started_at") or now)
    # the newest log line that says something (DeepSpeed's INFO lines repeat the whole command)
    last = [ln.strip() for ln in (st.get("log_tail") or "").splitlines() if ln.strip() and "[INFO]" not in ln][-1:]
    return "starting: %s%s" % (_duration(now - started), ("  | " + last[0][:100]) if last else "")


def progress(plan, statuses, now=None):
    """Judge the watched hosts' statuses: {"state": running|done|failed, "line", "host", "reason", "log_tail"}.

    ``statuses`` maps host name -> the JSON printed by ``dsfleet_node.py status`` (None: the host did not answer).
    Each host's supervisor enforces stall_timeout and startup_timeout itself (and says so in ``reason``), so this
    only reads what the hosts report. Pure, so failure handling is unit-tested.
    """
    master = plan["master"]["name"]
    watched = [h["name"] for h in plan["hosts"] if h["watched"]]
    for name in watched:
        if statuses.get(name) is None:
            return {"state": "failed", "host": name, "reason": "no status from host (unreachable: the host or its "
                    "network went down?)", "line": "", "log_tail": ""}
    # When one rank dies the others follow within seconds: blame the host whose processes ended first.
    crashed = sorted((float(statuses[n].get("ended_at") or 0), i, n) for i, n in enumerate(watched)
                     if statuses[n].get("state") == "exited" and statuses[n].get("rc") != 0)
    if crashed:
        st = statuses[crashed[0][2]]
        reason = st.get("reason") or "training exited with code %s" % st.get("rc")
        return {"state": "failed", "host": crashed[0][2], "reason": reason, "line": "",
                "log_tail": st.get("log_tail", "")}
    for name in watched:
        if statuses[name].get("state") == "missing":
            return {"state": "failed", "host": name, "reason": "no training process was started on this host",
                    "line": "", "log_tail": statuses[name].get("log_tail", "")}
    st = statuses.get(master) or {}
    if all(statuses[n].get("state") == "exited" for n in watched):
        metric = st.get("last_metric") or {}
        if metric.get("event") != "end":
            return {"state": "failed", "host": master, "reason": "training exited 0 without finishing its steps",
                    "line": "", "log_tail": st.get("log_tail", "")}
        return {"state": "done", "host": master, "reason": "", "log_tail": "",
                "line": "done: %s steps, final loss %.4f, %.0f tokens/s" % (
                    metric.get("steps"), metric.get("final_loss", float("nan")), metric.get("tokens_per_s", 0))}
    return {"state": "running", "host": "", "reason": "", "line": follow_line(dict(st, now=st.get("now") or now)),
            "log_tail": ""}


def status_table(plan, statuses):
    """status.yml's lines: one per host (ranks alive, last step, loss, tokens/s, devices), then the run's state."""
    rows = [("host", "state", "ranks", "step", "loss", "tokens/s", "devices")]
    for h in plan["hosts"]:
        st = statuses.get(h["name"])
        if st is None:
            rows.append((h["name"], "unreachable", "-", "-", "-", "-", "-"))
            continue
        p = st.get("progress") or {}
        state = st["state"] + ("" if st.get("rc") in (None, 0) else " (rc %s)" % st.get("rc"))
        rows.append((h["name"], state, "%d/%d" % (st.get("ranks_alive") or 0, h["slots"]) if h["watched"] or
                     st.get("ranks_alive") else "%d" % (st.get("ranks_alive") or 0),
                     "%s/%s" % (p["step"], p.get("total")) if p.get("step") is not None else "-",
                     "%.4f" % p["loss"] if _finite(p.get("loss")) else "-",
                     "%.0f" % p["tokens_per_s"] if _finite(p.get("tokens_per_s")) else "-",
                     devices_text(st.get("devices"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    judged = progress(plan, statuses)
    if judged["state"] == "failed":
        lines.append("run %s: failed on %s: %s" % (plan["run_id"], judged["host"], judged["reason"]))
    else:
        queued = all((statuses.get(h["name"]) or {}).get("state") == "queued" for h in plan["hosts"])
        lines.append("run %s: %s" % (plan["run_id"], judged["line"] if judged["state"] == "done" or queued else
                                     "running — " + judged["line"]))
    for h in plan["hosts"]:
        st = statuses.get(h["name"]) or {}
        if st.get("reason"):
            lines.append("%s: %s" % (h["name"], st["reason"]))
    return lines


def devices_text(devices):
    """'2x 71% 30.1/80.0 GiB' style summary of a host's device readings (from the vendor tool), or '-'."""
    if not devices:
        return "-"
    parts = []
    for d in devices:
        used, total = d.get("memory_used_mib"), d.get("memory_total_mib")
        util = d.get("utilization_pct")
        parts.append("%s%s" % ("%s%% " % util if util is not None else "",
                               "%.1f/%.1f GiB" % (used / 1024, total / 1024) if used is not None and total else ""))
    return ", ".join(p.strip() for p in parts)


def summary(plan, metrics, extra=None):
    """summary.json from the plan and the rank-0 metrics lines (list of dicts)."""
    end = next((m for m in reversed(metrics) if m.get("event") == "end"), None)
    steps = [m for m in metrics if m.get("event") == "step"]
    if end is None:
        raise PlanError("dsfleet summary: the metrics have no end record; training did not finish")
    summary = {
        "run_id": plan["run_id"],
        "world_size": plan["world_size"],
        "hosts": [{"name": h["name"], "slots": h["slots"], "node_rank": h["node_rank"]} for h in plan["hosts"]],
        "accelerator": plan["accelerator"],
        "precision": plan["precision"],
        "launcher": plan["launcher"],
        "zero_stage": plan["zero"]["stage"],
        "strategy": plan.get("strategy") or "deepspeed",
        "fsdp_sharding": plan.get("fsdp_sharding"),
        "model": plan["training"]["model"],
        "dataset": plan["training"]["dataset"],
        "steps": end.get("steps", len(steps)),
        "first_loss": end.get("first_loss"),
        "final_loss": end.get("final_loss"),
        "tokens_per_s": end.get("tokens_per_s"),
        "train_seconds": end.get("elapsed_s"),
        "eval_loss": end.get("eval_loss"),
        "perplexity": end.get("perplexity"),
        "evals": [{"step": m.get("step"), "eval_loss": m.get("eval_loss"), "perplexity": m.get("perplexity")}
                  for m in metrics if m.get("event") == "eval"],
        "checkpoint_host": plan["master"]["name"],
        "checkpoint_dir": end.get("checkpoint_dir"),
        "export_dir": end.get("export_dir"),
    }
    summary.update(_utilization(plan, end.get("tokens_per_s")))
    summary.update(extra or {})
    return summary


def _utilization(plan, tokens_per_s):
    """tokens/s per device and the model FLOPs utilization: 6 x active parameters x tokens/s (the training FLOPs per
    token without attention, Kaplan et al. 2020) over the sum of the devices' datasheet peaks (speed.py); None
    where a device's peak or the model's size is not known."""
    sizing = plan.get("sizing") or {}
    out = {"tokens_per_s_per_device": tokens_per_s / plan["world_size"] if _finite(tokens_per_s) else None,
           "mfu": None}
    names = [n for h in plan["hosts"] for n in h.get("device_names") or []]
    if not (_finite(tokens_per_s) and sizing.get("known") and names and len(names) == plan["world_size"]):
        return out
    peaks = [SP.device_peak(n, plan["precision"]) for n in names]
    if all(peaks):
        out["mfu"] = 6 * sizing["params_active"] * tokens_per_s / (sum(p[0] for p in peaks) * 1e12)
    return out


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def summary_table(summary):
    """Lines for the end-of-run table."""
    loss = ("%.4f -> %.4f" % (summary["first_loss"], summary["final_loss"])
            if _finite(summary.get("first_loss")) and _finite(summary.get("final_loss")) else "n/a")
    rows = [("run", summary["run_id"]),
            ("hosts", ", ".join("%s x%d" % (h["name"], h["slots"]) for h in summary["hosts"])),
            ("world size", str(summary["world_size"])),
            ("accelerator", "%s, %s, %s, launcher %s%s" % (summary["accelerator"], summary["precision"],
                                                         strategy_text(summary), summary["launcher"],
                                                         " (SLURM job %s)" % summary["slurm_job"]
                                                         if summary.get("slurm_job") else "")),
            ("steps", str(summary["steps"])), ("loss", loss)] + ([
            ("eval", "loss %.4f, perplexity %.2f (%d evals)" % (summary["eval_loss"], summary["perplexity"],
                                                                len(summary.get("evals") or [])))]
                if _finite(summary.get("eval_loss")) and _finite(summary.get("perplexity")) else []) + [
            ("tokens/s", "%.0f" % (summary.get("tokens_per_s") or 0) + (
                " (%.0f per device%s)" % (summary["tokens_per_s_per_device"],
                                          "; MFU %.1f%% of the devices' datasheet peak" % (100 * summary["mfu"])
                                          if _finite(summary.get("mfu")) else "")
                if _finite(summary.get("tokens_per_s_per_device")) and summary["world_size"] > 1 else "")),
            ("checkpoint", "%s:%s" % (summary["checkpoint_host"], summary["checkpoint_dir"])),
            ("export", "%s:%s" % (summary["checkpoint_host"], summary["export_dir"]))] + ([
            ("records", "%s/{metrics.jsonl,plot.png}; tensorboard --logdir %s/tensorboard" % (
                summary["run_dir"], summary["run_dir"]))] if summary.get("run_dir") else [])
    width = max(len(r[0]) for r in rows)
    return ["%s  %s" % (a.ljust(width), b) for a, b in rows]


def common_checkpoint(checkpoints):
    """The newest checkpoint step complete on every host ({host: [steps]}), or None."""
    lists = [set(v or []) for v in checkpoints.values()]
    common = set.intersection(*lists) if lists else set()
    return max(common) if common else None


def resume_source(listings, plan):
    """Where a resume continues from, given what each host of the new plan holds ({host: `dsfleet_node.py
    checkpoints` output}): the newest step that is

    - exact: every host has its own complete tag written by this very layout (same world, same ranks here, same
      ZeRO stage) -- the ranks load their own shards, bit-exact;
    - universal: every host already has <tag>_universal (converted at an earlier resume);
    - convertible: the hosts' own tags and the replicas they keep for their ring neighbours hold every rank of
      one world -- the new master gathers them, converts them (ds_to_universal) and ships the result.

    At the same step exact wins, then universal. Returns {"step", "mode": exact|universal|convert|none, "argv" (the
    master's `dsfleet_node.py universal` command for convert, else None), "text"}."""
    names = [h["name"] for h in plan["hosts"]]
    ranks_of = {h["name"]: h["ranks"] for h in plan["layout"]["hosts"]}
    world, stage = plan["world_size"], plan["zero"]["stage"]
    found = {n: listings.get(n) or {} for n in names}

    def own(name):
        return {int(k): v for k, v in (found[name].get("layouts") or {}).items()}

    def exact_ok(name, marker):
        if "world_size" not in marker:
            return True  # a marker from an older dsfleet: trust it, as train.py does
        return (marker["world_size"] == world and sorted(marker.get("ranks") or []) == ranks_of[name]
                and marker.get("zero_stage", stage) == stage and marker.get("strategy", "deepspeed") == kind)

    kind = layout_kind(plan)
    exact = set.intersection(*[{s for s, m in own(n).items() if exact_ok(n, m)} for n in names])
    # the universal conversion is DeepSpeed's; FSDP and DDP resume only as they were written
    universal = set.intersection(*[set(found[n].get("universal") or []) for n in names]) if kind == "deepspeed" else set()
    convertible = _whole_steps(found, names) if kind == "deepspeed" else {}
    best = max(exact | universal | set(convertible), default=None)
    master = plan["hosts"][0]
    if best is None:
        held = "; ".join("%s: %s" % (n, ", ".join(str(s) for s in sorted(own(n))) or "none") for n in names)
        return {"step": None, "mode": "none", "argv": None,
                "text": "no checkpoint that these hosts can resume from (complete checkpoints: %s)" % held}
    if best in exact:
        return {"step": best, "mode": "exact", "argv": None,
                "text": "resuming from step %d, complete on every host (the same layout: exact)" % best}
    if best in universal:
        return {"step": best, "mode": "universal", "argv": None,
                "text": "resuming from step %d, from its universal checkpoint on every host" % best}
    sources = _sources(convertible[best], plan, master)
    targets = [{"name": h["name"], "address": str(h["address"]), "receive": h["commands"]["receive"]["argv"]}
               for h in plan["hosts"][1:]]
    old_world = sources[0]["world_size"]
    argv = master["commands"]["universal"]["argv"] + ["--step", str(best), "--sources", json.dumps(sources),
                                                    "--targets", json.dumps(targets)]
    where = "; ".join("%s%s: ranks %s" % (s["name"], " (replica of %s)" % s["holder"] if s["holder"] else "",
                                          ",".join(map(str, s["ranks"]))) for s in sources)
    return {"step": best, "mode": "convert", "argv": argv,
            "text": "resuming from step %d, written by %d rank(s), now %d: gathering on %s (%s), converting to a "
                    "universal checkpoint" % (best, old_world, world, master["name"], where)}


def _whole_steps(found, names):
    """{step: {rank: [(host, holder or None, marker)]}} of the steps whose every rank (of the world that wrote
    them) has a copy on one of ``names``: its own tag, or the replica it keeps for a ring neighbour."""
    holders = {}
    for n in names:
        listing = found.get(n) or {}
        copies = [(None, listing.get("layouts") or {})] + list((listing.get("replicas") or {}).items())
        for holder, tags in copies:
            for step, marker in tags.items():
                for r in marker.get("ranks") or []:
                    holders.setdefault(int(step), {}).setdefault(r, []).append((n, holder, marker))
    whole = {}
    for step, by_rank in holders.items():
        worlds = {m.get("world_size") for copies in by_rank.values() for _, _, m in copies}
        if len(worlds) == 1 and None not in worlds and sorted(by_rank) == list(range(worlds.pop())):
            whole[step] = by_rank
    return whole


def _sources(by_rank, plan, gatherer):
    """Where the gatherer takes each rank's files from: itself first (no transfer), its own tags before replicas."""
    picks = {}
    for r, copies in sorted(by_rank.items()):
        host, holder, marker = sorted(copies, key=lambda c: (c[0] != gatherer["name"], c[1] is not None, c[0]))[0]
        picks.setdefault((host, holder), {"ranks": [], "world_size": marker["world_size"]})["ranks"].append(r)
    hosts = {h["name"]: h for h in plan["hosts"]}
    return [{"name": host, "holder": holder, "address": str(hosts[host]["address"]),
             "local": host == gatherer["name"], "ranks": v["ranks"], "world_size": v["world_size"],
             "pack": hosts[host]["commands"]["pack"]["argv"]}
            for (host, holder), v in sorted(picks.items(), key=lambda kv: (kv[0][0], kv[0][1] or ""))]


def export_source(listings, plan, step=0):
    """What playbooks/export.yml gathers on the master: the newest step (or ``step``) whose every rank has a copy
    on a host that answered ({host: `dsfleet_node.py checkpoints` output, None when unreachable}). Returns
    {"step", "argv" (the master's `dsfleet_node.py export` command), "dest", "text"}; step None with the reason."""
    master = plan["hosts"][0]
    names = [h["name"] for h in plan["hosts"] if listings.get(h["name"]) is not None]
    if master["name"] not in names:
        return {"step": None, "argv": None, "dest": None,
                "text": "the master %s did not answer; the export is gathered there" % master["name"]}
    whole = _whole_steps(listings, names)
    if step and step not in whole:
        return {"step": None, "argv": None, "dest": None,
                "text": "step %d is not a checkpoint whose every rank's files are on the hosts (complete: %s)"
                        % (step, ", ".join(map(str, sorted(whole))) or "none")}
    if not whole:
        held = "; ".join("%s: %s" % (n, ", ".join(sorted((listings[n].get("layouts") or {}), key=int)) or "none")
                         for n in names)
        return {"step": None, "argv": None, "dest": None,
                "text": "run %s has no checkpoint with every rank's files on the hosts (%s)" % (plan["run_id"], held)}
    chosen = step or max(whole)
    argv = master["commands"]["export"]["argv"] + ["--step", str(chosen), "--sources",
                                                   json.dumps(_sources(whole[chosen], plan, master))]
    return {"step": chosen, "argv": argv, "dest": "%s/export-global_step%d" % (master["paths"]["out"], chosen),
            "text": "exporting step %d on %s from %d rank(s)' files" % (
                chosen, master["name"], len(whole[chosen]))}


def stop_report(plan, stops, checkpoints):
    """stop.yml's lines: which hosts had something to stop, and where the run can continue."""
    stopped = [name for name, st in stops.items() if (st or {}).get("terminated")]
    lines = ["run %s: stopped on %s" % (plan["run_id"], ", ".join(stopped) if stopped else
                                         "no host (nothing of the run was running)")]
    if plan.get("slurm"):
        lines.append("the SLURM job %s is cancelled too, whether queued or running (scancel --me --name %s)"
                     % (plan["slurm"]["job_name"], plan["slurm"]["job_name"]))
    step = common_checkpoint(checkpoints)
    if step is None:
        lines.append("no checkpoint is complete on every host (%s): a resume would start from step 0" % ", ".join(
            "%s: %s" % (h, v or "none") for h, v in checkpoints.items()))
    else:
        lines.append("newest checkpoint complete on every host: step %d; continue with ./dsfleet launch.yml "
                     "-e resume=%s" % (step, plan["run_id"]))
    return lines
