"""Run the project's real playbooks from tests, through ansible-runner."""

import json
import os
import pathlib
import socket
import sys
import tempfile

import ansible_runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"


class Result:
    """What a playbook run left: rc, per-host stats, the whole stdout, and the failure messages."""

    def __init__(self, runner):
        self.rc = runner.rc
        self.status = runner.status
        self.stats = runner.stats or {}
        self.stdout = runner.stdout.read()
        events = list(runner.events)
        self.failures = [e["event_data"]["res"].get("msg", "") for e in events
                         if e.get("event") == "runner_on_failed" and not e["event_data"].get("ignore_errors")]
        # every task result that succeeded: {"host", "task", "res"} (the debug messages, the changed flags)
        self.ok = [{"host": e["event_data"].get("host"), "task": e["event_data"].get("task"),
                    "res": e["event_data"].get("res") or {}} for e in events if e.get("event") == "runner_on_ok"]

    def task_result(self, task, host):
        """The result of the task named ``task`` (without its role prefix) on ``host``."""
        found = [r["res"] for r in self.ok if r["host"] == host and r["task"] == task]
        assert found, "no result of %r on %s" % (task, host)
        return found[-1]

    @property
    def changed(self):
        return sum((self.stats.get("changed") or {}).values())

    def __repr__(self):
        return "<playbook rc=%s changed=%s failures=%r>" % (self.rc, self.changed, self.failures)


def free_port():
    """A TCP port free on this machine now (tests never assume 29500: a real job may hold it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_playbook(playbook, extravars=None, inventory=None, timeout=1800, cmdline=None, envvars=None):
    """Run ROOT/playbook with the repository's ansible.cfg; inventory defaults to the embedded localhost one.

    A launch on this machine (the default inventory) gets a free master_port unless the test names one.
    """
    extravars = dict(extravars or {})
    if inventory is None and playbook == "launch.yml" and "master_port" not in extravars:
        extravars["master_port"] = free_port()
    # ansible-runner puts its own callback directory in ANSIBLE_CALLBACK_PLUGINS, after what is set here: name
    # the project's, so its progress lines (dsfleet_progress) reach stdout as they do for ./dsfleet
    env = {"ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_CALLBACK_PLUGINS": str(ROOT / "callback_plugins"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.update(envvars or {})
    with tempfile.TemporaryDirectory(prefix="dsfleet-runner-") as private:
        runner = ansible_runner.run(
            private_data_dir=private, project_dir=str(ROOT), playbook=str(ROOT / playbook),
            inventory=str(inventory or ROOT / "inventory" / "localhost.yml"), extravars=extravars or {},
            envvars=env, cmdline=cmdline, quiet=True, timeout=timeout, settings={"suppress_env_files": True})
        return Result(runner)


def load_summary(run_id):
    with open(RUNS / run_id / "summary.json") as f:
        return json.load(f)
