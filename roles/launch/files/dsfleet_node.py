#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Per-host process supervisor for dsfleet runs (stdlib only; runs with the host's dsfleet venv python).

    dsfleet_node.py start  --run-dir D [--stall-timeout S] [--startup-timeout S] [--grace S] -- CMD ARGS...
                                    start CMD detached in its own process group, log to D/node.log, and watch it
    dsfleet_node.py start --foreground ...       the same, in the foreground (a SLURM step's task: SLURM holds
                                    the step until it ends); SIGTERM/SIGINT go to the ranks, the exit code is theirs
    dsfleet_node.py status --run-dir D [--wait S] [--report] [--slurm-job NAME]
                                    JSON: state running|exited|missing, rc, reason, progress, ranks alive, log tail;
                                    with NAME (launcher=slurm), the newest SLURM job of that name: `queued` while it
                                    has not started this host's step, and why it ended when it did not finish
    dsfleet_node.py stop   --run-dir D [--grace S]      SIGTERM the process group and every process naming D, then KILL
    dsfleet_node.py ps     --run-dir D                  JSON: PIDs of processes whose command line names D
    dsfleet_node.py checkpoints --run-dir D             JSON: the checkpoints this host holds (own, replicas, universal)
    dsfleet_node.py replicate --run-dir D --tag T --from NAME --to ADDR --remote JSON [--keep K]
                                    copy this host's files of tag T to ADDR (over the ssh mesh), which keeps them as
                                    the replica of NAME (REMOTE: its `dsfleet_node.py receive` argv)
    dsfleet_node.py receive --run-dir D --dest REL --name N [--keep K]
                                    unpack a tar from stdin into D/out/REL/N atomically; keep the newest K there
    dsfleet_node.py pack --run-dir D --step S [--holder H] --ranks 0,1
                                    tar to stdout: the files of ranks R in tag S (own, or the replica of H)
    dsfleet_node.py universal --run-dir D --step S --sources JSON --targets JSON
                                    on the new master: gather one copy of every rank's files of tag S, convert
                                    them with ds_to_universal into <tag>_universal and send that to every target
    dsfleet_node.py export --run-dir D --step S --sources JSON --model M --script export_hf.py
                                    gather every rank's files of tag S here, write D/out/export-<tag>/ from them
    dsfleet_node.py stage --run-dir D --preflight JSON [--port P] [--ports P,Q] [--checkpoints]
                                    JSON: the preflight's result (JSON: {argv, env, cwd}), whether port P is free
                                    (and each of --ports), the checkpoints held here: every check of a host's
                                    staging in one call
    dsfleet_node.py hub --run-dir D --repo R [--revision V] --dest F --targets JSON
                                    on the master: download hub model R@V once into F (snapshot_download; this
                                    host's hub cache when the hub is unreachable), then tar it over the ssh mesh to
                                    every target ([{name, address, dest}]) that does not hold the same commit
    dsfleet_node.py together --run-dir D --specs JSON
                                    run every argv of SPECS ([argv, ...]) at once, each logging to
                                    D/together-<i>.log; wait for all; JSON {rc, runs: [{rc, tail}]}; exit: the worst
                                    rc (infer.yml: one DeepSpeed world per replica)

Every verb that starts or stops ranks (stage, start, stop, together) first removes what killed or finished runs of
this user left behind and no process holds: DeepSpeed's CPU all-reduce segments in /dev/shm (never unlinked by
DeepSpeed: ~69 MB of RAM per rank per run) and torch op build locks a killed build left (later loads wait forever).

The run directory's path is the run's marker: every rank's command line contains it (its --output_dir), so `stop`
and `ps` find ranks started by DeepSpeed's pdsh runner too, by PID, never by process name.

No run is left unwatched: the supervisor outlives the controller (Ctrl-C, a dropped SSH session) and enforces the
timeouts itself. Every rank touches D/out/heartbeat/rank-<R> after each optimizer step; with no heartbeat for
--stall-timeout seconds (or none at all within --startup-timeout) it stops the whole process group, so the peer
ranks on the other hosts stop too, and records why in D/node.reason.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time


def _training_module_on_path():
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "train"), os.path.join(here, "..", "..", "..", "train")):
        if os.path.isfile(os.path.join(folder, "dsfleet_ckpt.py")) and folder not in sys.path:
            sys.path.insert(0, folder)


class _Ckpt:
    """The checkpoint bookkeeping shared with the training module: shipped beside this file (code/train/), or in
    the repository's train/ when run from the source tree. Imported on first use (start/status never need it)."""

    def __getattr__(self, name):
        _training_module_on_path()
        import dsfleet_ckpt
        return getattr(dsfleet_ckpt, name)


ckpt = _Ckpt()

STATE = "node.json"
RC = "node.rc"
REASON = "node.reason"
LOG = "node.log"
METRICS = os.path.join("out", "metrics.jsonl")
PROGRESS = os.path.join("out", "progress.json")
HEARTBEATS = os.path.join("out", "heartbeat")
START_MARK = "==== dsfleet_node: started"


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _netns(pid):
    try:
        return os.readlink("/proc/%s/ns/net" % pid)
    except OSError:
        return None


def marked_pids(marker):
    """PIDs (not ours) of this host whose command line contains ``marker``. Processes in another network namespace
    belong to another host (a container, or a test host sharing this kernel) and are left alone."""
    me = {os.getpid(), os.getppid()}
    here = _netns("self")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        if here is not None and _netns(entry) not in (here, None):
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if marker in cmdline and "dsfleet_node.py" not in cmdline and _alive(int(entry)):
            found.append(int(entry))
    return sorted(found)


def _tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    if START_MARK in data:
        data = data[data.rindex(START_MARK):].split("\n", 1)[-1]
    return "\n".join(data.splitlines()[-lines:])


def _last_metric(path):
    text = _tail(path, 5)
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def newest_heartbeat(run_dir):
    """mtime of the newest rank heartbeat, or None before the first optimizer step."""
    folder = os.path.join(run_dir, HEARTBEATS)
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    times = []
    for name in names:
        try:
            times.append(os.path.getmtime(os.path.join(folder, name)))
        except OSError:
            continue
    return max(times) if times else None


def _write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) creates one ~69 MB POSIX shared-memory segment per rank,
# named deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never unlinks it: every CPU run
# leaves its segments in /dev/shm (RAM) until reboot, and a later run on the same address and port reuses them.
SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"
# torch builds an op (cpu_adam, the shm comm op, ...) holding <build dir>/lock open; a build that is killed leaves the
# file behind and every later load of that op waits for it forever (torch.utils.file_baton).
LOCK_MIN_AGE_S = 30


def _files_in_use():
    """(st_dev, st_ino) of every file a process on this machine holds open or mapped (the ones /proc lets us read:
    our own user's, or all as root). By inode, so processes in other mount namespaces count right."""
    held = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = "/proc/%s/fd" % entry
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            fds = []
        for fd in fds:
            try:
                st = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            held.add((st.st_dev, st.st_ino))
        try:
            with open("/proc/%s/maps" % entry) as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[4] != "0":
                        major, minor = (int(x, 16) for x in parts[3].split(":"))
                        held.add((os.makedev(major, minor), int(parts[4])))
        except (OSError, ValueError):
            continue
    return held


def _extension_dirs(env):
    """Where torch builds its ops for this user: TORCH_EXTENSIONS_DIR (the run's or ours) and the default cache."""
    dirs = [value for value in (env.get("TORCH_EXTENSIONS_DIR"), os.environ.get("TORCH_EXTENSIONS_DIR")) if value]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = os.path.join(cache, "torch_extensions")
    try:
        dirs += [os.path.join(base, name) for name in sorted(os.listdir(base))]  # py311_cpu, py311_cu121, ...
    except OSError:
        pass
    return list(dict.fromkeys(dirs))


def tidy(env=None, shm_dir=SHM_DIR, extension_dirs=None, lock_min_age=LOCK_MIN_AGE_S):
    """Remove what killed or finished runs of this user left behind and nothing any process still holds: DeepSpeed's
    shared-memory segments, and torch's op build locks. Returns {"segments": [...], "freed_mib": n, "locks": [...]}."""
    uid = os.getuid()
    segments, locks = [], []
    try:
        names = sorted(n for n in os.listdir(shm_dir) if n.startswith("%s%d_" % (SHM_PREFIX, uid)))
    except OSError:
        names = []
    for name in names:
        try:
            st = os.stat(os.path.join(shm_dir, name))
        except OSError:
            continue
        if st.st_uid == uid:
            segments.append((os.path.join(shm_dir, name), st))
    dirs = _extension_dirs(env or {}) if extension_dirs is None else extension_dirs
    now = time.time()
    for folder in dirs:
        try:
            ops = sorted(os.listdir(folder))
        except OSError:
            continue
        for op in ops:
            path = os.path.join(folder, op, "lock")
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_uid == uid and now - st.st_mtime >= lock_min_age:
                locks.append((path, st))
    result = {"segments": [], "freed_mib": 0.0, "locks": []}
    if not segments and not locks:
        return result
    held = _files_in_use()  # listed after the candidates: a file created since is not a candidate
    for kind, items in (("segments", segments), ("locks", locks)):
        for path, st in items:
            if (st.st_dev, st.st_ino) in held:
                continue
            try:
                again = os.stat(path)
                if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                    continue  # replaced meanwhile: someone else's now
                os.unlink(path)
            except OSError:
                continue
            result[kind].append(path)
            if kind == "segments":
                result["freed_mib"] += st.st_size / 2**20
    result["freed_mib"] = round(result["freed_mib"], 1)
    return result


def _tidy_note(done):
    """One line for a log, or None when nothing was left behind."""
    parts = []
    if done["segments"]:
        parts.append("%d shared-memory segment(s) of finished DeepSpeed runs (%.0f MiB of RAM)"
                     % (len(done["segments"]), done["freed_mib"]))
    if done["locks"]:
        parts.append("stale op build lock(s) %s (left by a build that was killed; the op is rebuilt)"
                     % ", ".join(done["locks"]))
    return ("dsfleet_node: removed " + "; ".join(parts)) if parts else None


def terminate(run_dir, pgid, grace):
    """SIGTERM the process group and every process naming the run directory, wait ``grace`` s, then SIGKILL."""
    targets = set(marked_pids(run_dir))
    if pgid and _alive(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace
    while time.time() < deadline and (marked_pids(run_dir) or (pgid and _alive(pgid))):
        time.sleep(0.2)
    killed = []
    for pid in marked_pids(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return sorted(targets | ({pgid} if pgid else set())), killed


def watch(child, run_dir, started, stall_timeout, startup_timeout, grace):
    """Wait for the child; stop it when its ranks make no progress. Returns (rc, reason or None)."""
    while True:
        try:
            return child.wait(timeout=1.0), None
        except subprocess.TimeoutExpired:
            pass
        now, beat = time.time(), newest_heartbeat(run_dir)
        reason = None
        if beat is None and startup_timeout and now - started > startup_timeout:
            reason = "no training step within startup_timeout=%ss" % startup_timeout
        elif beat is not None and stall_timeout and now - beat > stall_timeout:
            reason = "no progress for %ds (stall_timeout=%ss): a rank is stuck" % (now - beat, stall_timeout)
        if reason:
            _write(os.path.join(run_dir, REASON), reason + "\n")
            with open(os.path.join(run_dir, LOG), "a") as log:
                log.write("dsfleet_node: %s; stopping every process of the run on this host\n" % reason)
            terminate(run_dir, child.pid, grace)
            return child.wait(), reason


def cmd_start(args):
    run_dir = os.path.abspath(args.run_dir)
    state = _read_json(os.path.join(run_dir, STATE))
    if state and _alive(state["pid"]) and not os.path.exists(os.path.join(run_dir, RC)):
        print(json.dumps(dict(state, already_running=True)))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("dsfleet_node: start needs a command after --")
    for name in (STATE, RC, REASON, PROGRESS):
        if os.path.exists(os.path.join(run_dir, name)):
            os.unlink(os.path.join(run_dir, name))
    beats = os.path.join(run_dir, HEARTBEATS)  # an earlier attempt's heartbeats would read as a stall
    if os.path.isdir(beats):
        for name in os.listdir(beats):
            os.unlink(os.path.join(beats, name))
    if args.foreground:
        return _start_foreground(args, run_dir, command)
    read_fd, write_fd = os.pipe()
    if os.fork():  # parent: wait for the supervisor to report the child's PID
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            report = r.read()
        if not report:
            sys.exit("dsfleet_node: the supervisor failed to start %s; see %s" % (command[0],
                                                                                 os.path.join(run_dir, LOG)))
        print(report)
        return 0
    # supervisor: detach from the ssh session so it outlives Ansible's connection
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # hold none of the caller's pipes: whoever ran `start` sees it end at once
        os.dup2(devnull, fd)
    log, env = _begin(args, run_dir)
    child, error = _spawn(command, run_dir, devnull, log, env)
    if child is None:
        os.write(write_fd, json.dumps({"pid": None, "error": error}).encode())
        os._exit(0)
    state = _record_state(run_dir, args, child, command)
    os.write(write_fd, json.dumps(state).encode())
    os.close(write_fd)
    _finish(run_dir, log, env, watch(child, run_dir, state["started_at"], args.stall_timeout, args.startup_timeout,
                                     args.grace)[0])
    os._exit(0)


def _begin(args, run_dir):
    """The run's log, opened for appending (a resumed run's status reads only what follows the newest marker), and
    the command's environment (--env added)."""
    log = open(os.path.join(run_dir, LOG), "ab", buffering=0)
    log.write(("%s %s\n" % (START_MARK, time.strftime("%Y-%m-%d %H:%M:%S"))).encode())
    env = dict(os.environ)
    for item in args.env or []:
        key, _, value = item.partition("=")
        env[key] = value
    _log_tidy(log, tidy(env))
    return log, env


def _spawn(command, run_dir, stdin, log, env):
    """(child in its own process group, None), or (None, why) with rc 127 recorded."""
    try:
        return subprocess.Popen(command, cwd=run_dir, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True), None
    except OSError as exc:
        log.write(("dsfleet_node: cannot start %s: %s\n" % (command[0], exc)).encode())
        _write(os.path.join(run_dir, RC), "127\n")
        return None, str(exc)


def _record_state(run_dir, args, child, command, **more):
    state = dict({"pid": child.pid, "pgid": child.pid, "supervisor": os.getpid(), "started_at": time.time(),
                  "command": command, "stall_timeout": args.stall_timeout, "startup_timeout": args.startup_timeout},
                 **more)
    with open(os.path.join(run_dir, STATE + ".tmp"), "w") as f:
        json.dump(state, f)
    os.replace(os.path.join(run_dir, STATE + ".tmp"), os.path.join(run_dir, STATE))
    return state


def _finish(run_dir, log, env, rc):
    # before rc: once rc exists the log is final (the controller fetches it, checksummed); the ranks have exited
    # (DeepSpeed's launcher waits for them; a stopped group was killed and waited for), so their maps are gone
    _log_tidy(log, tidy(env))
    with open(os.path.join(run_dir, RC + ".tmp"), "w") as f:
        f.write("%d\n" % rc)
    os.replace(os.path.join(run_dir, RC + ".tmp"), os.path.join(run_dir, RC))


def _start_foreground(args, run_dir, command):
    """``start --foreground``: supervise COMMAND as ``start`` does, without detaching (SLURM's step is this
    process). SIGTERM or SIGINT (scancel, the time limit's --signal, Ctrl-C) goes on to the ranks' process group,
    which checkpoint and exit (train.py); the exit code is the command's."""
    log, env = _begin(args, run_dir)
    child, error = _spawn(command, run_dir, os.open(os.devnull, os.O_RDONLY), log, env)
    if child is None:
        print("dsfleet_node: cannot start %s: %s" % (command[0], error), file=sys.stderr)
        return 127

    def forward(signum, _frame):
        if not os.path.exists(os.path.join(run_dir, REASON)):
            _write(os.path.join(run_dir, REASON), "the supervisor got %s (the job was cancelled, or reached its time "
                   "limit)\n" % signal.Signals(signum).name)
        log.write(("dsfleet_node: got %s; passing it to the ranks (they checkpoint, then exit)\n"
                   % signal.Signals(signum).name).encode())
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    state = _record_state(run_dir, args, child, command, foreground=True, slurm_job=os.environ.get("SLURM_JOB_ID"))
    print("dsfleet_node: %s: started %s (pid %d); its output: %s" % (
        os.uname().nodename, os.path.basename(command[0]), child.pid, os.path.join(run_dir, LOG)), flush=True)
    rc, _ = watch(child, run_dir, state["started_at"], args.stall_timeout, args.startup_timeout, args.grace)
    _finish(run_dir, log, env, rc)
    if rc != 0 and _read_text(os.path.join(run_dir, REASON)) == "stopped on request":
        # stop.yml: the ranks checkpointed and were stopped; SLURM records the job as completed, not failed
        print("dsfleet_node: %s: stopped on request (stop.yml)" % os.uname().nodename, flush=True)
        return 0
    if rc != 0:
        print("dsfleet_node: %s: the ranks exited with code %d; see %s" % (os.uname().nodename, rc,
                                                                            os.path.join(run_dir, LOG)),
              file=sys.stderr, flush=True)
    return rc if 0 <= rc < 256 else 128 + min(127, -rc)


def _log_tidy(log, done):
    note = _tidy_note(done)
    if note:
        log.write((note + "\n").encode())


def _read_text(path):
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def rank_pids(run_dir):
    """PIDs of the training ranks of the run on this host (not the launchers)."""
    out = []
    for pid in marked_pids(run_dir):
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"train.py") for a in argv) and any(a.startswith(b"--local_rank") for a in argv):
            out.append(pid)
    return out


def status(run_dir, report=False):
    run_dir = os.path.abspath(run_dir)
    state = _read_json(os.path.join(run_dir, STATE))
    metrics = os.path.join(run_dir, METRICS)
    out = {"dsfleet_status": 1, "report": report, "state": "missing", "rc": None, "reason": None,
           "started_at": None, "ended_at": None, "progress_at": newest_heartbeat(run_dir),
           "progress": _read_json(os.path.join(run_dir, PROGRESS)), "last_metric": _last_metric(metrics),
           "ranks_alive": len(rank_pids(run_dir)), "log_tail": _tail(os.path.join(run_dir, LOG))}
    out["reason"] = _read_text(os.path.join(run_dir, REASON))
    if state is None:
        if os.path.exists(os.path.join(run_dir, RC)):
            out["state"], out["rc"] = "exited", 127
        return out
    out["started_at"] = state.get("started_at")
    try:
        with open(os.path.join(run_dir, RC)) as f:
            out["state"], out["rc"] = "exited", int(f.read().strip())
        out["ended_at"] = os.path.getmtime(os.path.join(run_dir, RC))
    except (OSError, ValueError):
        out["state"] = "running" if _alive(state["pid"]) or _alive(state.get("supervisor") or -1) else "exited"
        if out["state"] == "exited":  # supervisor vanished without writing rc (killed): a failure
            out["rc"] = -9
            out["reason"] = out["reason"] or "the supervisor was killed (host rebooted or out of memory?)"
    return out


def _run(argv, timeout=15):
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, str(exc)
    return (proc.stdout, None) if proc.returncode == 0 else (None, (proc.stderr or proc.stdout).strip()[:200])


def device_readings(spec):
    """Memory and utilisation of this host's devices from the vendor tool. ``spec``: "nvidia:0,1", "amd:0",
    "intel:0", or "cpu" (the host's memory)."""
    vendor, _, indices = spec.partition(":")
    wanted = [int(i) for i in indices.split(",") if i.strip().isdigit()]
    out = []
    if vendor == "nvidia":
        text, error = _run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                            "--format=csv,noheader,nounits"])
        if text is None:
            return [{"error": "nvidia-smi: %s" % error}]
        for line in text.splitlines():
            cells = [c.strip() for c in line.split(",")]
            if len(cells) == 4 and cells[0].isdigit() and (not wanted or int(cells[0]) in wanted):
                num = [float(c) if c.replace(".", "", 1).isdigit() else None for c in cells[1:]]
                out.append({"index": int(cells[0]), "utilization_pct": num[0], "memory_used_mib": num[1],
                            "memory_total_mib": num[2]})
    elif vendor == "amd":
        text, error = _run(["rocm-smi", "--showuse", "--showmeminfo", "vram", "--json"])
        if text is None:
            return [{"error": "rocm-smi: %s" % error}]
        try:
            data = json.loads(text[text.index("{"):])
        except ValueError:
            return [{"error": "rocm-smi printed no JSON"}]
        for card, values in sorted(data.items()):
            index = int("".join(ch for ch in card if ch.isdigit()) or -1)
            if not card.startswith("card") or (wanted and index not in wanted):
                continue
            pick = {k.lower(): v for k, v in values.items()}
            used = next((v for k, v in pick.items() if "vram" in k and "used" in k), None)
            total = next((v for k, v in pick.items() if "vram" in k and "total" in k and "used" not in k), None)
            util = next((v for k, v in pick.items() if "gpu use" in k), None)
            out.append({"index": index, "utilization_pct": float(util) if util is not None else None,
                        "memory_used_mib": float(used) / 2**20 if used is not None else None,
                        "memory_total_mib": float(total) / 2**20 if total is not None else None})
    elif vendor == "intel":
        for index in wanted or [0]:
            text, error = _run(["xpu-smi", "stats", "-d", str(index), "-j"])
            if text is None:
                out.append({"index": index, "error": "xpu-smi: %s" % error})
                continue
            try:
                metrics = {m.get("metrics_type"): m.get("value") for m in json.loads(text).get("device_level", [])}
            except (ValueError, AttributeError):
                out.append({"index": index, "error": "xpu-smi printed no JSON"})
                continue
            out.append({"index": index, "utilization_pct": metrics.get("XPUM_STATS_GPU_UTILIZATION"),
                        "memory_used_mib": metrics.get("XPUM_STATS_MEMORY_USED"), "memory_total_mib": None})
    else:
        info = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0]) // 1024
        except (OSError, ValueError, IndexError):
            return [{"error": "cannot read /proc/meminfo"}]
        total = info.get("MemTotal")
        used = total - info.get("MemAvailable", 0) if total else None
        out.append({"index": None, "utilization_pct": None, "memory_used_mib": used, "memory_total_mib": total})
    return out


# SLURM job states (squeue %T): the job may still start this host's step; or it ended in one of the others
SLURM_COMING = {"PENDING", "CONFIGURING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
                "SUSPENDED", "SIGNALING"}
SLURM_BAD = {"BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
             "REVOKED", "SPECIAL_EXIT"}


def slurm_job(name):
    """The newest SLURM job named ``name`` that slurmctld still knows (squeue lists ended jobs for MinJobAge):
    {id, state, reason, nodes, exit_code}, {"error"} when squeue fails, or None when there is none."""
    text, error = _run(["squeue", "-h", "--me", "--states=all", "--name", name, "-o", "%i|%T|%r|%N"])
    if text is None:
        return {"error": "squeue: %s" % error}
    jobs = {}
    for line in text.splitlines():
        cells = line.strip().split("|")
        found = re.fullmatch(r"(\d+)(\+\d+)?", cells[0]) if len(cells) == 4 else None
        if found:  # a heterogeneous job lists each component as ID+N
            jobs.setdefault(int(found.group(1)), []).append({"state": cells[1], "reason": cells[2],
                                                             "nodes": cells[3]})
    if not jobs:
        return None
    newest = max(jobs)
    parts = jobs[newest]
    # the job's state: a component that ended badly, else one still coming (one saying why it waits first), else
    # the first
    coming = sorted((p for p in parts if p["state"] in SLURM_COMING),
                    key=lambda p: p["reason"] in ("", "None", "(null)"))
    part = next((p for p in parts if p["state"] in SLURM_BAD), None) or (coming or parts)[0]
    job = dict(part, id=newest, nodes=",".join(p["nodes"] for p in parts if p["nodes"]), exit_code=None)
    if job["state"] not in SLURM_COMING:
        shown, _ = _run(["scontrol", "show", "job", str(job["id"]), "-o"])
        found = re.search(r"\bExitCode=(\d+):(\d+)", shown or "")
        if found:
            job["exit_code"] = int(found.group(1)) or (128 + int(found.group(2)) if int(found.group(2)) else 0)
    return job


def _with_slurm(current, name):
    """Add the run's SLURM job to a host's status: ``queued`` until the job starts this host's step; why the job
    ended when it ended badly (cancelled, failed, timed out, a node failed)."""
    if current["state"] == "running":
        return current
    job = slurm_job(name)
    current["slurm"] = job
    if job is None:
        if current["state"] == "missing":
            current["reason"] = ("no SLURM job named %s is queued or known to slurmctld (never submitted, or it "
                                 "ended longer ago than MinJobAge)" % name)
        return current
    if "error" in job:
        if current["state"] == "missing":
            current["reason"] = "cannot ask SLURM about job %s: %s" % (name, job["error"])
        return current
    what = "SLURM job %d %s%s" % (job["id"], job["state"], " (%s)" % job["reason"]
                                  if job["reason"] and job["reason"] not in ("None", "(null)") else "")
    if current["state"] == "missing":
        if job["state"] in SLURM_COMING:
            current["state"] = "queued"
            return current
        current["state"], current["rc"] = "exited", job["exit_code"] or 1
        current["reason"] = "%s before this host's ranks started" % what
    elif job["state"] in SLURM_BAD:
        current["reason"] = what + (": " + current["reason"] if current.get("reason") else "")
        if not current.get("rc"):
            current["rc"] = job["exit_code"] or 1
    return current


def cmd_status(args):
    deadline = time.time() + max(0.0, args.wait)
    current = status(args.run_dir, args.report)
    if args.slurm_job:
        current = _with_slurm(current, args.slurm_job)
    while time.time() < deadline and current["state"] in ("running", "queued"):
        time.sleep(0.5 if current["state"] == "running" else 2)
        current = status(args.run_dir, args.report)
        if args.slurm_job:
            current = _with_slurm(current, args.slurm_job)
        if current["state"] not in ("running", "queued"):
            break
    if args.devices:
        current["devices"] = device_readings(args.devices)
    current["now"] = time.time()
    print(json.dumps(current))
    return 0


def cmd_stop(args):
    run_dir = os.path.abspath(args.run_dir)
    state = _read_json(os.path.join(run_dir, STATE)) or {}
    running = not os.path.exists(os.path.join(run_dir, RC)) and state.get("pid") and _alive(state["pid"])
    if running and not os.path.exists(os.path.join(run_dir, REASON)):
        _write(os.path.join(run_dir, REASON), "stopped on request\n")
    before = marked_pids(run_dir)
    terminated, killed = terminate(run_dir, state.get("pgid"), args.grace)
    time.sleep(0.2)
    left = marked_pids(run_dir)
    print(json.dumps({"terminated": terminated if running or before else [],
                      "killed": killed, "left": left, "tidied": tidy() if not left else None}))
    return 0


def cmd_checkpoints(args):
    """What this host holds for a resume (train/dsfleet_ckpt.py writes the markers)."""
    print(json.dumps(ckpt.listing(os.path.join(os.path.abspath(args.run_dir), "out"))))
    return 0


SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=15"]


def _say(message):
    print("dsfleet_node: " + message, file=sys.stderr, flush=True)


def _send(folder, names, arcdir, address, remote_argv):
    """Stream ``names`` of ``folder`` to ``remote_argv`` run on ``address`` over ssh; True when it took them."""
    proc = subprocess.Popen(SSH + [address, shlex.join(remote_argv)], stdin=subprocess.PIPE)
    try:
        ckpt.write_tar(proc.stdin, folder, names, arcdir)
    except (OSError, ValueError) as exc:
        _say("sending %s to %s failed: %s" % (arcdir, address, exc))
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
    return proc.wait() == 0


def _tag_names(folder):
    # the marker last: the receiver's folder is renamed complete only after the whole stream, so order is safety
    names = sorted(n for n in os.listdir(folder) if n != ckpt.MARKER)
    return names + ([ckpt.MARKER] if os.path.exists(os.path.join(folder, ckpt.MARKER)) else [])


def cmd_replicate(args):
    """The copy of this host's shards of one tag on the next host: they survive this host's disk."""
    folder = os.path.join(os.path.abspath(args.run_dir), "out", "checkpoint", args.tag)
    if ckpt.read_marker(folder) is None:
        _say("replicate: %s is not a complete checkpoint" % folder)
        return 2
    start = time.time()
    remote = json.loads(args.remote) + ["--dest", "%s/%s" % (ckpt.REPLICAS, args.source), "--name", args.tag,
                                        "--keep", str(args.keep)]
    ok = _send(folder, _tag_names(folder), args.tag, args.to, remote)
    _say("replicate: %s of %s to %s %s in %.1fs" % (args.tag, args.source, args.to, "done" if ok else "FAILED",
                                                   time.time() - start))
    return 0 if ok else 1


def cmd_receive(args):
    dest = os.path.join(os.path.abspath(args.run_dir), "out", args.dest)
    if os.path.isabs(args.dest) or ".." in args.dest.split("/") or "/" in args.name or args.name in ("", ".", ".."):
        _say("receive: refusing destination %s/%s" % (args.dest, args.name))
        return 2
    ckpt.read_tar(sys.stdin.buffer, dest, args.name)
    if args.keep:
        ckpt.prune(dest, args.keep)
    return 0


def _pack_names(folder, ranks):
    return [n for n in _tag_names(folder) if n != ckpt.MARKER and ckpt.rank_of_file(n) in ranks + [None]]


def cmd_pack(args):
    folder = str(ckpt.tag_dir(os.path.join(os.path.abspath(args.run_dir), "out"), args.step, args.holder))
    ranks = [int(r) for r in args.ranks.split(",") if r != ""]
    ckpt.write_tar(sys.stdout.buffer, folder, _pack_names(folder, ranks), "pack")
    sys.stdout.flush()
    return 0


def _gather(out, step, sources, gather):
    """One copy of every rank's files of tag ``step`` into the folder ``gather``, from this host's own files and
    replicas (copied) and the other hosts' (pulled over ssh with their `pack`). Returns the world size, or None
    (said why on stderr)."""
    shutil.rmtree(gather, ignore_errors=True)
    os.makedirs(gather)
    world = 0
    for i, src in enumerate(sources):
        world = max(world, int(src["world_size"]))
        if src.get("local"):
            folder = str(ckpt.tag_dir(out, step, src.get("holder")))
            for name in _pack_names(folder, src["ranks"]):
                shutil.copy2(os.path.join(folder, name), os.path.join(gather, name))
            continue
        pack = src["pack"] + ["--step", str(step), "--ranks", ",".join(map(str, src["ranks"]))] + (
            ["--holder", src["holder"]] if src.get("holder") else [])
        proc = subprocess.Popen(SSH + [src["address"], shlex.join(pack)], stdout=subprocess.PIPE)
        try:
            part = ckpt.read_tar(proc.stdout, gather, "part%d" % i)
        except (OSError, ValueError, EOFError) as exc:
            _say("gather: reading ranks %s of %s from %s failed: %s" % (src["ranks"], ckpt.tag_for(step),
                                                                        src["name"], exc))
            proc.kill()
            return None
        if proc.wait() != 0:
            _say("gather: fetching ranks %s of %s from %s failed" % (src["ranks"], ckpt.tag_for(step), src["name"]))
            return None
        for name in os.listdir(part):
            os.replace(os.path.join(part, name), os.path.join(gather, name))
        os.rmdir(part)
    have = sorted(set(r for r in (ckpt.rank_of_file(n) for n in os.listdir(gather)) if r is not None))
    # a DDP tag is one host's copy of the whole state (ddp_state.pt, no per-rank files)
    if have != list(range(world)) and not (not have and os.path.exists(os.path.join(gather, "ddp_state.pt"))):
        _say("gather: found ranks %s of %d for %s" % (have, world, ckpt.tag_for(step)))
        return None
    return world


def cmd_universal(args):
    """Gather every rank's files of one tag here, convert them to a universal checkpoint, ship it to every target."""
    out = os.path.join(os.path.abspath(args.run_dir), "out")
    sources, targets = json.loads(args.sources), json.loads(args.targets)
    ckpt_dir = os.path.join(out, "checkpoint")
    gather = os.path.join(ckpt_dir, "%s_gather" % ckpt.tag_for(args.step))
    utag = ckpt.universal_tag_for(args.step)
    start = time.time()
    world = _gather(out, args.step, sources, gather)
    if world is None:
        return 1
    _say("universal: gathered %d ranks' files of %s in %.1fs; converting" % (world, ckpt.tag_for(args.step),
                                                                            time.time() - start))
    final = os.path.join(ckpt_dir, utag)
    shutil.rmtree(final, ignore_errors=True)
    conv = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", gather,
                           "--output_folder", final], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if conv.returncode != 0:
        _say("universal: ds_to_universal failed: %s" % conv.stdout[-2000:])
        return 1
    shutil.rmtree(gather, ignore_errors=True)
    ckpt.mark_complete(ckpt_dir, utag, {"step": args.step, "universal": True, "from_world_size": world})
    for target in targets:
        remote = target["receive"] + ["--dest", "checkpoint", "--name", utag]
        if not _send(final, _tag_names(final), utag, target["address"], remote):
            _say("universal: sending %s to %s failed" % (utag, target["name"]))
            return 1
    print(json.dumps({"step": args.step, "tag": utag, "from_world_size": world, "sent_to": [t["name"] for t in targets],
                      "seconds": round(time.time() - start, 1)}))
    return 0


HUB_MANIFEST = ".dsfleet-source.json"


def _hub_manifest(folder, repo, revision, commit, source):
    """What a host's copy of a hub model holds: the commit and every file with its size (the HF metadata folder
    .cache/ travels too, but is not content)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(root, d), folder) != ".cache"]
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != HUB_MANIFEST:
                files[rel] = os.path.getsize(os.path.join(root, name))
    return {"repo": repo, "revision": revision, "commit": commit, "source": source, "files": files}


def _same_content(a, b):
    return bool(a and b) and all(a.get(k) == b.get(k) for k in ("repo", "commit", "files"))


def _hub_error(exc, repo, revision, endpoint):
    """What a user does about a failed download (by the hub client's exception class: no import needed)."""
    kind = type(exc).__name__
    token = "" if os.environ.get("HF_TOKEN") or os.environ.get("HF_TOKEN_PATH") else (
        " (HF_TOKEN is not set in the controller's environment)")
    if kind == "GatedRepoError" or (getattr(getattr(exc, "response", None), "status_code", 0) in (401, 403)):
        return ("%s is gated or private%s: accept its licence on the hub with your account and run the play with "
                "HF_TOKEN=<your token> in the controller's environment" % (repo, token))
    if kind == "RepositoryNotFoundError":
        return ("%s was not found at %s%s: check the id (org/name), or pass a local directory -e model=/path"
                % (repo, endpoint, token))
    if kind == "RevisionNotFoundError":
        return "%s has no revision %r: pass an existing branch, tag or commit with -e model_revision=..." % (
            repo, revision)
    return ("the master could not download %s@%s from %s and its Hugging Face cache has no copy (%s: %s): give "
            "the master network access to the hub (HF_ENDPOINT for a mirror), or pass a local directory "
            "-e model=/path" % (repo, revision, endpoint, kind, str(exc).strip().splitlines()[0][:300]
                                if str(exc).strip() else ""))


def _hub_download(repo, revision, dest):
    """Download (or update) ``repo`` at ``revision`` into ``dest``; falls back to this host's hub cache when the
    hub cannot be reached. Returns (commit, source)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from pathlib import Path

    import huggingface_hub
    from huggingface_hub import _local_folder
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        huggingface_hub.snapshot_download(repo, revision=revision, local_dir=dest)
    except Exception as exc:  # noqa: BLE001 - every failure is reported with what to do about it
        kind = type(exc).__name__
        if kind in ("GatedRepoError", "RepositoryNotFoundError", "RevisionNotFoundError"):
            raise RuntimeError(_hub_error(exc, repo, revision, endpoint)) from None
        _training_module_on_path()
        from dsfleet_modelinfo import hub_snapshot
        snap = hub_snapshot(repo) if revision == "main" else None
        if snap is None:
            raise RuntimeError(_hub_error(exc, repo, revision, endpoint)) from None
        _say("hub: %s unreachable (%s); copying %s from this host's cache %s" % (endpoint, kind, repo, snap))
        partial = dest + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(snap, partial, symlinks=False)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(partial, dest)
        return os.path.basename(snap), "cache"
    commits = set()
    for root, _dirs, names in os.walk(dest):
        if os.path.relpath(root, dest).split(os.sep)[0] == ".cache":
            continue
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), dest)
            meta = _local_folder.read_download_metadata(Path(dest), rel) if rel != HUB_MANIFEST else None
            if meta is not None:
                commits.add(meta.commit_hash)
    return (commits.pop() if len(commits) == 1 else revision), "hub"


def _ship_dir(folder, address, dest):
    """Send ``folder`` to ``dest`` on ``address`` (tar over the ssh mesh): unpacked beside it, swapped in whole."""
    partial = dest + ".partial"
    remote = "rm -rf {p} && mkdir -p {p} && tar -xf - -C {p} && rm -rf {d} && mv {p} {d}".format(
        p=shlex.quote(partial), d=shlex.quote(dest))
    tar = subprocess.Popen(["tar", "-C", folder, "-cf", "-", "."], stdout=subprocess.PIPE)
    ssh = subprocess.run(SSH + [address, remote], stdin=tar.stdout, stderr=subprocess.PIPE, text=True)
    tar.stdout.close()
    return tar.wait() == 0 and ssh.returncode == 0, ssh.stderr.strip().splitlines()[-3:]


def cmd_hub(args):
    """On the master: download a hub model once, then ship it to every target that lacks that commit."""
    import threading
    dest, start = os.path.abspath(args.dest), time.time()
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    before = _read_json(os.path.join(dest, HUB_MANIFEST))
    try:
        commit, source = _hub_download(args.repo, args.revision, dest)
    except RuntimeError as exc:
        _say("hub: " + str(exc))
        print(json.dumps({"repo": args.repo, "revision": args.revision, "error": str(exc)}))
        return 1
    manifest = _hub_manifest(dest, args.repo, args.revision, commit, source)
    _write(os.path.join(dest, HUB_MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    size = sum(manifest["files"].values())
    downloaded = time.time() - start
    _say("hub: %s@%s is commit %s on this host (%d files, %.1f MiB, %s, %.1fs)" % (
        args.repo, args.revision, commit, len(manifest["files"]), size / 2 ** 20, source, downloaded))
    results = {}

    def one(target):
        try:
            have = subprocess.run(SSH + [target["address"], "cat " + shlex.quote(target["dest"] + "/" + HUB_MANIFEST)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                theirs = json.loads(have.stdout) if have.returncode == 0 else None
            except ValueError:
                theirs = None
            if isinstance(theirs, dict) and _same_content(theirs, manifest):
                results[target["name"]] = {"sent": False, "ok": True}
                return
            t0 = time.time()
            ok, tail = _ship_dir(dest, target["address"], target["dest"])
            results[target["name"]] = {"sent": True, "ok": ok, "seconds": round(time.time() - t0, 1), "error": tail}
        except Exception as exc:  # noqa: BLE001 - a target that could not be served is a failure, never a success
            results[target["name"]] = {"sent": True, "ok": False, "error": ["%s: %s" % (type(exc).__name__, exc)]}

    threads = [threading.Thread(target=one, args=(t,)) for t in json.loads(args.targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for target in json.loads(args.targets):
        results.setdefault(target["name"], {"sent": True, "ok": False, "error": ["no result"]})
    failed = {n: r for n, r in results.items() if not r["ok"]}
    errors = ["sending %s to %s failed: %s" % (args.repo, name, " ".join(r["error"]) or "ssh failed")
              for name, r in sorted(failed.items())]
    for error in errors:
        _say("hub: " + error)
    sent = sorted(n for n, r in results.items() if r["sent"] and r["ok"])
    there = sorted(n for n, r in results.items() if not r["sent"])
    text = "%s@%s is commit %s (%d files, %.1f MiB, from %s in %.1fs); sent to %s%s" % (
        args.repo, args.revision, commit, len(manifest["files"]), size / 2 ** 20,
        "the hub" if source == "hub" else "the master's cache", downloaded, ", ".join(sent) or "no host",
        "; already on " + ", ".join(there) if there else "")
    print(json.dumps({"repo": args.repo, "revision": args.revision, "commit": commit, "source": source,
                      "text": text, "error": "; ".join(errors) or None,
                      "updated": not (isinstance(before, dict) and _same_content(before, manifest)),
                      "files": len(manifest["files"]), "mib": round(size / 2 ** 20, 1),
                      "download_seconds": round(downloaded, 1),
                      "sent_to": sent, "already_there": there,
                      "failed": sorted(failed), "seconds": round(time.time() - start, 1)}))
    return 1 if failed else 0


def cmd_ps(args):
    print(json.dumps({"pids": marked_pids(os.path.abspath(args.run_dir))}))
    return 0


def _port_free(port):
    import socket
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", port))
    except OSError as exc:
        return {"port": port, "free": False, "error": str(exc)}
    finally:
        sock.close()
    return {"port": port, "free": True}


def cmd_stage(args):
    """A host's staging checks in one call (the controller judges the result; this always exits 0)."""
    run_dir = os.path.abspath(args.run_dir)
    os.makedirs(os.path.join(run_dir, "out"), exist_ok=True)
    spec = json.loads(args.preflight)
    try:
        proc = subprocess.run(spec["argv"], env=dict(os.environ, **spec["env"]), cwd=spec["cwd"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
        errors = [ln for ln in proc.stderr.splitlines() if re.search(r"dsfleet-\w+: error", ln)]
        preflight = {"rc": proc.returncode, "result": _last_json(proc.stdout),
                     "error": " ".join(errors or proc.stderr.strip().splitlines()[-5:])}
    except (OSError, subprocess.TimeoutExpired) as exc:
        preflight = {"rc": 127, "result": None, "error": str(exc)}
    ports = [_port_free(int(p)) for p in (args.ports or "").split(",") if p.strip()]
    done = tidy(spec["env"])
    print(json.dumps({"preflight": preflight, "tidied": done, "tidy_note": _tidy_note(done),
                      "port": _port_free(args.port) if args.port else None,
                      "ports": ports, "ports_free": all(p["free"] for p in ports),
                      "checkpoints": ckpt.listing(os.path.join(run_dir, "out")) if args.checkpoints else None}))
    return 0


def cmd_together(args):
    """Run every argv at once (each its own process group), wait for all, report each one's rc and log tail."""
    run_dir = os.path.abspath(args.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    procs = []
    before = tidy()
    for i, argv in enumerate(json.loads(args.specs)):
        log = open(os.path.join(run_dir, "together-%d.log" % i), "w")
        procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))

    def forward(signum, _frame):
        for proc, _ in procs:
            try:
                os.killpg(proc.pid, signum)
            except OSError:
                pass
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    runs = []
    for i, (proc, log) in enumerate(procs):
        rc = proc.wait()
        log.close()
        with open(os.path.join(run_dir, "together-%d.log" % i), errors="replace") as f:
            tail = f.read().splitlines()[-20:]
        runs.append({"rc": rc, "tail": tail})
    worst = max((abs(r["rc"]) for r in runs), default=0)
    time.sleep(0.5)
    after = tidy()
    print(json.dumps({"rc": worst, "runs": runs, "tidy_note": _tidy_note(before),
                      "freed_mib": after["freed_mib"]}))
    return min(worst, 255)


def cmd_export(args):
    """Gather every rank's files of one tag here and write a Hugging Face directory from them (export_hf.py)."""
    out = os.path.join(os.path.abspath(args.run_dir), "out")
    tag = ckpt.tag_for(args.step)
    parent = os.path.join(out, "export-gather")
    start = time.time()
    if _gather(out, args.step, json.loads(args.sources), os.path.join(parent, tag)) is None:
        return 1
    dest = os.path.join(out, "export-" + tag)
    shutil.rmtree(dest, ignore_errors=True)
    proc = subprocess.run([sys.executable, args.script, "--checkpoint", parent, "--tag", tag, "--model", args.model,
                           "--output", dest], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shutil.rmtree(parent, ignore_errors=True)
    if proc.returncode != 0:
        errors = [ln for ln in proc.stderr.splitlines() if "dsfleet-export: error" in ln]
        _say("export: " + " ".join(errors or proc.stderr.strip().splitlines()[-5:]))
        return 1
    result = _last_json(proc.stdout) or {}
    result["seconds"] = round(time.time() - start, 1)
    print(json.dumps(result))
    return 0


def _last_json(text):
    for line in reversed(text.splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("start")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stall-timeout", type=float, default=0, help="stop the run when no rank steps for S s (0: off)")
    p.add_argument("--startup-timeout", type=float, default=0, help="stop the run when no step comes within S s")
    p.add_argument("--grace", type=float, default=10, help="seconds between SIGTERM and SIGKILL when stopping")
    p.add_argument("--env", action="append", help="KEY=VALUE added to the command's environment")
    p.add_argument("--foreground", action="store_true", help="do not detach (a SLURM step); exit with the rc")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("status")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--wait", type=float, default=0, help="wait up to S seconds, returning early when the process exits")
    p.add_argument("--report", action="store_true", help="mark this host's status as the one a follower prints")
    p.add_argument("--devices", help="add device readings: nvidia:0,1 | amd:0 | intel:0 | cpu")
    p.add_argument("--slurm-job", help="the SLURM job name of the run (launcher=slurm)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stop")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--grace", type=float, default=10)
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("ps")
    p.add_argument("--run-dir", required=True)
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("checkpoints")
    p.add_argument("--run-dir", required=True)
    p.set_defaults(func=cmd_checkpoints)
    p = sub.add_parser("replicate")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--tag", required=True)
    p.add_argument("--from", dest="source", required=True, help="this host's name in the plan")
    p.add_argument("--to", required=True, help="the next host's address (the ssh mesh knows it)")
    p.add_argument("--remote", required=True, help="JSON argv of dsfleet_node.py receive there")
    p.add_argument("--keep", type=int, default=0)
    p.set_defaults(func=cmd_replicate)
    p = sub.add_parser("receive")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dest", required=True, help="folder under D/out")
    p.add_argument("--name", required=True)
    p.add_argument("--keep", type=int, default=0)
    p.set_defaults(func=cmd_receive)
    p = sub.add_parser("pack")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--holder", default=None)
    p.add_argument("--ranks", required=True)
    p.set_defaults(func=cmd_pack)
    p = sub.add_parser("universal")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--sources", required=True)
    p.add_argument("--targets", required=True)
    p.set_defaults(func=cmd_universal)
    p = sub.add_parser("export")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--sources", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--script", required=True, help="the training module's export_hf.py")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("stage")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--preflight", required=True, help="JSON {argv, env, cwd} of the training module's preflight")
    p.add_argument("--port", type=int, default=None, help="the master port to find free (on the master)")
    p.add_argument("--ports", default="", help="more ports to find free, comma-separated")
    p.add_argument("--checkpoints", action="store_true", help="list the checkpoints held here (resume)")
    p.set_defaults(func=cmd_stage)
    p = sub.add_parser("hub")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--revision", default="main")
    p.add_argument("--dest", required=True, help="the folder this host keeps the model in")
    p.add_argument("--targets", default="[]", help="JSON [{name, address, dest}]: the hosts to ship it to")
    p.set_defaults(func=cmd_hub)
    p = sub.add_parser("together")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--specs", required=True, help="JSON list of argv lists, run at once")
    p.set_defaults(func=cmd_together)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
