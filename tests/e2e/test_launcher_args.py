"""launcher=ansible starts each host's ranks with code/train/node_launch.py, DeepSpeed's per-node launcher
(deepspeed.launcher.launch) without its imports, and without the `deepspeed --no_ssh` runner in front of it: the
arguments the plan computes must be exactly those the real runner computes from the rendered hostfile (and
--include), node by node, for CPU hosts, uneven GPU hosts and hosts whose devices are not 0..n-1; and every rank
node_launch.py starts must get what launch.py gives it. The runner runs for real in the training venv; only its final Popen is caught, to read the
command it would start."""
import json
import pathlib
import re
import subprocess

from unit.test_plan import A100, V100, host

from dsfleet_core import plan as P
from dsfleet_core import render
from helpers import ROOT

RUNNER = r"""
import json, sys
import deepspeed.launcher.runner as runner
seen = []
real = runner.subprocess.Popen
class Done:
    returncode = 0
    def wait(self):
        return 0
def caught(cmd, *args, **kwargs):  # the launch it would start; anything else (numactl on CPU) runs
    if "deepspeed.launcher.launch" not in cmd:
        return real(cmd, *args, **kwargs)
    seen.append(cmd)
    return Done()
runner.subprocess.Popen = caught
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
            # ours starts node_launch.py (launch.py's twin, below) with the same arguments
            assert ours[1:3] == ["-u", h["paths"]["node_launch"]], ours
            assert [a for a in theirs[4:] if a not in defaults] == ours[3:], (name, h["name"], theirs)
    assert plan["include"] == "10.1.0.11:0,2@10.1.0.12:0,1"   # the last case did exercise --include


DUMP = r"""
import json, os, sys
with open(os.path.join(os.environ["DUMP_DIR"], "rank%s.json" % os.environ["RANK"]), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, f)
"""


def test_node_launch_gives_each_rank_what_deepspeeds_launch_py_gives_it(train_python, tmp_path):
    """The plan starts code/train/node_launch.py, not `python -m deepspeed.launcher.launch` (which imports deepspeed
    and torch before any rank starts): both, run for real on the same arguments, must start the same ranks with the
    same command line and the same environment, for every host of every plan above."""
    script = tmp_path / "dump.py"
    script.write_text(DUMP)
    compared = 0
    for name, (hosts, knobs) in PLANS.items():
        plan = P.make_plan(hosts, dict({"run_id": "r", "max_steps": 5}, **knobs))
        for h in plan["hosts"][-1:]:
            ours = h["process"]["argv"]
            launch_args = ours[3:ours.index(h["paths"]["train"])]
            seen = {}
            for who, launcher in (("deepspeed", ["-m", "deepspeed.launcher.launch"]),
                                  ("dsfleet", [str(ROOT / "train" / "node_launch.py")])):
                out = tmp_path / ("%s-%d-%s" % (who, compared, h["name"]))
                out.mkdir()
                env = {"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "DUMP_DIR": str(out), "KEEP": "x"}
                done = subprocess.run([train_python, "-u"] + launcher + launch_args + [str(script), "--flag", "v"],
                                      capture_output=True, text=True, timeout=300, env=env)
                assert done.returncode == 0, (who, name, done.stdout[-2000:], done.stderr[-3000:])
                seen[who] = {p.name: json.loads(p.read_text()) for p in sorted(out.iterdir())}
                for rank in seen[who].values():  # the one variable set apart on purpose
                    assert rank["env"].pop("DUMP_DIR") == str(out)
            assert len(seen["dsfleet"]) == h["slots"], (name, h["name"], sorted(seen["dsfleet"]))
            for rank, got in seen["dsfleet"].items():
                want = seen["deepspeed"][rank]
                assert got["argv"] == want["argv"], (name, h["name"], rank, got["argv"], want["argv"])
                assert got["env"] == want["env"], (name, h["name"], rank, sorted(set(got["env"].items())
                                                                                 ^ set(want["env"].items())))
            assert seen["dsfleet"].keys() == seen["deepspeed"].keys()
            first = next(iter(seen["dsfleet"].values()))
            assert first["argv"][0].startswith("--local_rank=") and first["env"]["KEEP"] == "x"
            assert first["env"]["WORLD_SIZE"] == str(plan["world_size"]) and first["env"]["RANK"] != "0"
            compared += len(seen["dsfleet"])
    assert compared == 2 + 2 + 2


def test_node_launch_names_deepspeeds_own_visible_devices_variables(train_python):
    """Which variable selects a host's devices is DeepSpeed's accelerator's visible_devices_envs(); node_launch.py
    keeps that table without importing deepspeed: it must match the installed DeepSpeed's source."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("node_launch", ROOT / "train" / "node_launch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    where = subprocess.run([train_python, "-c", "import deepspeed.accelerator, os; "
                            "print(os.path.dirname(deepspeed.accelerator.__file__))"],
                           capture_output=True, text=True, check=True).stdout.split()[-1]
    for accel, var in mod.VISIBLE_DEVICES.items():
        source = pathlib.Path(where, "%s_accelerator.py" % accel).read_text()
        found = re.search(r"def visible_devices_envs\(self\):\s+return \[([^\]]*)\]", source)
        assert found and [v.strip().strip("'\"") for v in found.group(1).split(",")] == [var], (accel, found)


def test_infer_worlds_match_the_runners_single_host_launch(train_python, tmp_path):
    """infer.yml starts each replica's world with node_launch.py too: the arguments equal those
    `deepspeed --master_addr 127.0.0.1 --master_port P --num_gpus TP` (what infer used to run) hands launch.py, for
    a 2-rank CPU host as one tp=2 world and as two tp=1 replicas."""
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "unit"))  # test_infer_plan imports test_plan as a top-level module
    from test_infer_plan import LLAMA2_7B, model
    from test_plan import localhost

    from dsfleet_core import infer as I
    compared = 0
    for tp in (1, 2):
        p = I.make_infer_plan([localhost(cores=8)], {"run_id": "i", "tp": tp, "cpu_ranks": 2},
                              model(LLAMA2_7B, 6738415616), {"count": 20, "max_chars": 400})
        host = p["hosts"][0]
        for world in host["commands"]["worlds"]:
            script = world.index(host["paths"]["infer"])
            port = next(a.split("=")[1] for a in world if a.startswith("--master_port="))
            argv = ["--master_addr", "127.0.0.1", "--master_port", port, "--num_gpus", str(tp)] + world[script:]
            done = subprocess.run([train_python, "-c", RUNNER] + argv, capture_output=True, text=True, timeout=300,
                                  cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"})
            assert done.returncode == 0, done.stderr[-3000:]
            got = json.loads(done.stdout.splitlines()[-1])
            theirs, defaults = got["cmd"], ["--%s=%s" % kv for kv in got["defaults"].items()]
            assert theirs[1:4] == ["-u", "-m", "deepspeed.launcher.launch"] and world[1:3] == [
                "-u", host["paths"]["node_launch"]], (theirs, world)
            # launch.py's --node_rank defaults to 0, which node_launch.py is given
            assert [a for a in theirs[4:] if a not in defaults] == [a for a in world[3:] if a != "--node_rank=0"]
            compared += 1
    assert compared == 3  # tp=1: two replicas; tp=2: one world
