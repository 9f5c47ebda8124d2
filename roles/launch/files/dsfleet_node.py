#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Per-host process supervisor for dsfleet runs (stdlib only; runs with the host's dsfleet venv python).

    dsfleet_node.py start  --run-dir D -- CMD ARGS...   start CMD detached in its own process group, log to D/node.log
    dsfleet_node.py status --run-dir D [--wait S]       JSON: state running|exited|missing, rc, progress, log tail
    dsfleet_node.py stop   --run-dir D [--grace S]      SIGTERM the process group and every process naming D, then KILL
    dsfleet_node.py ps     --run-dir D                  JSON: PIDs of processes whose command line names D
    dsfleet_node.py port-free --port P                  exit 0 if TCP port P can be bound here, else 1

The run directory's path is the run's marker: every rank's command line contains it (its --output_dir), so `stop`
and `ps` find ranks started by DeepSpeed's pdsh runner too, by PID, never by process name.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

STATE = "node.json"
RC = "node.rc"
LOG = "node.log"
METRICS = os.path.join("out", "metrics.jsonl")


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


def marked_pids(marker):
    """PIDs (not ours) whose command line contains ``marker``."""
    me = {os.getpid(), os.getppid()}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
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
    return "\n".join(data.splitlines()[-lines:])


def _last_metric(path):
    text = _tail(path, 5)
    for line in reversed(text.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def cmd_start(args):
    run_dir = os.path.abspath(args.run_dir)
    state = _read_json(os.path.join(run_dir, STATE))
    if state and _alive(state["pid"]) and not os.path.exists(os.path.join(run_dir, RC)):
        print(json.dumps(dict(state, already_running=True)))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        sys.exit("dsfleet_node: start needs a command after --")
    for name in (STATE, RC):
        if os.path.exists(os.path.join(run_dir, name)):
            os.unlink(os.path.join(run_dir, name))
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
    os.dup2(devnull, 0)
    log = open(os.path.join(run_dir, LOG), "ab", buffering=0)
    env = dict(os.environ)
    for item in args.env or []:
        key, _, value = item.partition("=")
        env[key] = value
    try:
        child = subprocess.Popen(command, cwd=run_dir, stdin=devnull, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
    except OSError as exc:
        log.write(("dsfleet_node: cannot start %s: %s\n" % (command[0], exc)).encode())
        with open(os.path.join(run_dir, RC), "w") as f:
            f.write("127\n")
        os.write(write_fd, json.dumps({"pid": None, "error": str(exc)}).encode())
        os._exit(0)
    state = {"pid": child.pid, "pgid": child.pid, "supervisor": os.getpid(), "started_at": time.time(),
             "command": command}
    with open(os.path.join(run_dir, STATE + ".tmp"), "w") as f:
        json.dump(state, f)
    os.replace(os.path.join(run_dir, STATE + ".tmp"), os.path.join(run_dir, STATE))
    os.write(write_fd, json.dumps(state).encode())
    os.close(write_fd)
    rc = child.wait()
    with open(os.path.join(run_dir, RC + ".tmp"), "w") as f:
        f.write("%d\n" % rc)
    os.replace(os.path.join(run_dir, RC + ".tmp"), os.path.join(run_dir, RC))
    os._exit(0)


def status(run_dir):
    run_dir = os.path.abspath(run_dir)
    state = _read_json(os.path.join(run_dir, STATE))
    metrics = os.path.join(run_dir, METRICS)
    out = {"state": "missing", "rc": None, "started_at": None, "ended_at": None, "progress_at": None,
           "last_metric": None,
           "log_tail": _tail(os.path.join(run_dir, LOG))}
    last = _last_metric(metrics)
    out["last_metric"] = last
    if last is not None and last.get("event") in ("step", "end"):
        out["progress_at"] = os.path.getmtime(metrics)
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
    return out


def cmd_status(args):
    deadline = time.time() + max(0.0, args.wait)
    current = status(args.run_dir)
    while time.time() < deadline and current["state"] == "running":
        time.sleep(0.5)
        current = status(args.run_dir)
        if current["state"] != "running":
            break
    current["now"] = time.time()
    print(json.dumps(current))
    return 0


def cmd_stop(args):
    run_dir = os.path.abspath(args.run_dir)
    state = _read_json(os.path.join(run_dir, STATE)) or {}
    targets = set(marked_pids(run_dir))
    pgid = state.get("pgid")
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
    deadline = time.time() + args.grace
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
    time.sleep(0.2)
    print(json.dumps({"terminated": sorted(targets | ({pgid} if pgid else set())), "killed": killed,
                      "left": marked_pids(run_dir)}))
    return 0


def cmd_ps(args):
    print(json.dumps({"pids": marked_pids(os.path.abspath(args.run_dir))}))
    return 0


def cmd_port_free(args):
    import socket
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("", args.port))
    except OSError as exc:
        print(json.dumps({"port": args.port, "free": False, "error": str(exc)}))
        return 1
    finally:
        sock.close()
    print(json.dumps({"port": args.port, "free": True}))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("start")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--env", action="append", help="KEY=VALUE added to the command's environment")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_start)
    p = sub.add_parser("status")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--wait", type=float, default=0, help="wait up to S seconds, returning early when the process exits")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("stop")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--grace", type=float, default=10)
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("ps")
    p.add_argument("--run-dir", required=True)
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("port-free")
    p.add_argument("--port", type=int, required=True)
    p.set_defaults(func=cmd_port_free)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
