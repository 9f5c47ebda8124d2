"""launcher=ansible starts DeepSpeed's per-node launcher (deepspeed.launcher.launch) itself, without the
`deepspeed --no_ssh` runner in front of it: the arguments the plan computes must be exactly those the real runner
computes from the rendered hostfile (and --include), node by node, for CPU hosts, uneven GPU hosts and hosts whose
devices are not 0..n-1. The runner runs for real in the training venv; only its final Popen is caught, to read the
command it would start."""
import json
import subprocess

from unit.test_plan import A100, V100, host

from dsfleet_core import plan as P
from dsfleet_core import render

RUNNER = r"""
import json, sys
import deepspeed.launcher.runner as runner
seen = []
class Caught:
    returncode = 0
    def __init__(self, cmd, env=None):
        seen.append(cmd)
    def wait(self):
        return 0
runner.subprocess.Popen = Caught
runner.main(sys.argv[1:])
from deepspeed.launcher import launch
sys.argv = ["launch.py", "x.py"]
defaults = vars(launch.parse_args())
print(json.dumps({"cmd": seen[0], "defaults": {k: defaults[k] for k in ("log_level", "enable_each_rank_log")}}))
"""

PLANS = {
    "cpu, 2 ranks a host": ([host("c1", 11, cores=8), host("c2", 12, cores=4)], {"cpu_ranks": "2"}),
    "uneven A100 + V100": ([host("a", 11, [A100(i) for i in range(4)]), host("v", 12, [V100(0), V100(1)])], {}),
    "devices 0,2 and 0,1 (--include)": ([host("a", 11, [A100(0), A100(2)]), host("b", 12, [A100(0), A100(1)])], {}),
}


def test_node_launch_matches_deepspeeds_runner(train_python, tmp_path):
    for name, (hosts, knobs) in PLANS.items():
        plan = P.make_plan(hosts, dict({"run_id": "r", "max_steps": 5}, **knobs))
        (tmp_path / "hostfile").write_text(render.hostfile(plan))
        for h in plan["hosts"]:
            ours = h["process"]["argv"]
            train_at = ours.index(h["paths"]["train"])
            argv = ["--hostfile", str(tmp_path / "hostfile"), "--master_addr", plan["master"]["address"],
                    "--master_port", str(plan["master"]["port"])]
            argv += ["--include", plan["include"]] if plan["include"] else []
            argv += ["--no_ssh", "--node_rank", str(h["node_rank"])] + ours[train_at:]
            done = subprocess.run([train_python, "-c", RUNNER] + argv, capture_output=True, text=True, timeout=300,
                                  cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
            assert done.returncode == 0, (name, done.stderr[-3000:])
            got = json.loads(done.stdout.splitlines()[-1])
            theirs = got["cmd"]
            # the runner's own python aside, the same command; what the runner adds is launch.py's default anyway
            defaults = ["--%s=%s" % kv for kv in got["defaults"].items()]
            assert defaults == ["--log_level=info", "--enable_each_rank_log=None"], defaults
            assert theirs[1:4] == ["-u", "-m", "deepspeed.launcher.launch"], theirs
            assert [a for a in theirs[1:] if a not in defaults] == ours[1:], (name, h["name"], theirs)
    assert plan["include"] == "10.1.0.11:0,2@10.1.0.12:0,1"   # the last case did exercise --include
