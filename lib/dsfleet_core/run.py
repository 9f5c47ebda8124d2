"""Judging a run while it goes and after it ends: progress lines, failure blame, summary.json, tables.

Pure functions of the plan (lib/dsfleet_core/plan.py) and what the hosts' supervisors report
(roles/launch/files/dsfleet_node.py status), so failure handling is unit-tested.
"""

from __future__ import annotations

import math

from . import PlanError


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
    lines.append("accelerator %s, backend %s, precision %s, world size %d on %d host(s), master %s:%d (%s), "
                 "launcher %s, ZeRO %d" % (plan["accelerator"], plan["backend"], plan["precision"],
                                           plan["world_size"], plan["nodes"], plan["master"]["address"],
                                           plan["master"]["port"], plan["master"]["name"], plan["launcher"],
                                           plan["zero"]["stage"]))
    lines += ["warning: " + w for w in plan["warnings"]]
    return lines


def progress(plan, statuses, now=None):
    """Judge the watched nodes: {"state": running|done|failed, "line", "host", "reason", "log_tail"}.

    ``statuses`` maps host name -> the JSON printed by ``train/node.py status``; ``now`` is the controller's epoch
    time, used only where a status carries no ``now`` of its host (host clocks may differ from the controller's).
    Pure, so failure handling is unit-tested.
    """
    watch = plan["watch"]
    master = plan["master"]["name"]
    watched = [h["name"] for h in plan["hosts"] if h["watched"]]
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


def summary_table(summary):
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
