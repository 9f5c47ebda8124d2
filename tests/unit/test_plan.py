"""The cluster planner on tables of clusters: which hosts, slots, vendor, backend, precision, master, ifnames."""
import base64
import json
import pathlib

import pytest

from dsfleet_core import PlanError
from dsfleet_core import knobs as K
from dsfleet_core import plan as P
from dsfleet_core import run as R


def make_plan(hosts, knobs=None):
    """The planner as the plan role calls it: the run is always named."""
    return P.make_plan(hosts, dict({"run_id": "r"}, **(knobs or {})))


def gpu(index, name, mem, cc=None, arch=None, vendor="nvidia", bf16=None):
    if bf16 is None:
        bf16 = (cc is not None and float(cc) >= 8.0) or (arch or "").startswith(("gfx90a", "gfx94"))
    return {"index": index, "vendor": vendor, "name": name, "memory_mib": mem, "compute_capability": cc,
            "arch": arch, "bf16": bf16, "uuid": None, "mig": False}


A100 = lambda i: gpu(i, "NVIDIA A100-SXM4-80GB", 81920, "8.0")  # noqa: E731
V100 = lambda i: gpu(i, "Tesla V100-SXM2-32GB", 32768, "7.0")  # noqa: E731
RTX4090 = lambda i: gpu(i, "NVIDIA GeForce RTX 4090", 24564, "8.9")  # noqa: E731
MI250 = lambda i: gpu(i, "AMD Instinct MI250X", 65536, arch="gfx90a", vendor="amd")  # noqa: E731


def host(name, last_octet, gpus=(), vendor=None, cores=8, cpu_bf16=False, **extra):
    record = {
        "name": name, "address": "10.1.0.%d" % last_octet, "reachable": True, "local": False,
        "gpu": {"accelerator": vendor or (gpus[0]["vendor"] if gpus else "cpu"), "gpus": list(gpus),
                "cpu": {"model": "Xeon", "cores": cores, "memory_mib": 65536, "bf16": cpu_bf16}},
        "interfaces": [{"name": "lo", "ipv4": ["127.0.0.1/8"]},
                       {"name": "eth0", "ipv4": ["10.1.0.%d/24" % last_octet]},
                       {"name": "docker0", "ipv4": ["172.17.0.1/16"]}],
        "home": "/home/u/.dsfleet", "venv": "/home/u/.dsfleet/venv", "path": "/usr/bin:/bin",
    }
    record.update(extra)
    return record


def localhost(cores=2, cpu_bf16=True):
    record = host("localhost", 1, cores=cores, cpu_bf16=cpu_bf16, local=True)
    record["address"] = "localhost"
    return record


# name, hosts, knobs, expected subset of the plan, expected per-host (name, slots, devices, ifname)
CLUSTERS = [
    ("mixed A100/V100 -> fp16, own slots each",
     [host("a100", 11, [A100(i) for i in range(4)]), host("v100", 12, [V100(i) for i in range(2)])], {},
     {"accelerator": "nvidia", "backend": "nccl", "precision": "fp16", "world_size": 6, "uneven": True,
      "master": {"name": "a100", "address": "10.1.0.11", "port": 29500}, "min_device_memory_mib": 32768},
     [("a100", 4, [0, 1, 2, 3], "eth0"), ("v100", 2, [0, 1], "eth0")]),
    ("all Ampere or newer -> bf16",
     [host("ws", 11, [RTX4090(0), RTX4090(1)]), host("srv", 12, [A100(i) for i in range(4)])], {},
     {"accelerator": "nvidia", "precision": "bf16", "world_size": 6, "include": None},
     [("ws", 2, [0, 1], "eth0"), ("srv", 4, [0, 1, 2, 3], "eth0")]),
    ("NVIDIA + AMD -> the vendor with more memory, the other left out",
     [host("nv", 11, [V100(0)]), host("amd", 12, [MI250(0), MI250(1)])], {},
     {"accelerator": "amd", "backend": "nccl", "precision": "bf16", "world_size": 2, "ds_accelerator": "cuda"},
     [("amd", 2, [0, 1], "eth0")]),
    ("NVIDIA + AMD + CPU laptop, user picks nvidia",
     [host("nv", 11, [V100(0)]), host("amd", 12, [MI250(0), MI250(1)]), host("laptop", 20)],
     {"accelerator": "nvidia"},
     {"accelerator": "nvidia", "world_size": 1, "precision": "fp16"},
     [("nv", 1, [0], "eth0")]),
    ("CPU only -> gloo, cpu_ranks each, fp32 without CPU bf16",
     [host("c1", 11, cores=8), host("c2", 12, cores=4)], {"cpu_ranks": "2"},
     {"accelerator": "cpu", "backend": "gloo", "precision": "fp32", "world_size": 4, "ds_accelerator": "cpu",
      "env": {"GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "2"}},
     [("c1", 2, None, "eth0"), ("c2", 2, None, "eth0")]),
    ("CPU with bf16 on every host -> bf16",
     [host("c1", 11, cpu_bf16=True), host("c2", 12, cpu_bf16=True)], {},
     {"accelerator": "cpu", "precision": "bf16", "world_size": 4}, [("c1", 2, None, "eth0"), ("c2", 2, None, "eth0")]),
    ("this machine alone -> loopback",
     [localhost()], {},
     {"accelerator": "cpu", "backend": "gloo", "world_size": 2, "master": {"name": "localhost",
                                                                          "address": "127.0.0.1", "port": 29500},
      "env": {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}},
     [("localhost", 2, None, "lo")]),
    ("gpus host var restricted to 0,2 -> --include keeps the indices",
     [host("a", 11, [A100(0), A100(2)]), host("b", 12, [A100(0), A100(1)])], {},
     {"world_size": 4, "include": "10.1.0.11:0,2@10.1.0.12:0,1"},
     [("a", 2, [0, 2], "eth0"), ("b", 2, [0, 1], "eth0")]),
    ("slots host var caps a host; excluded host named",
     [host("a", 11, [A100(i) for i in range(4)], slots=2), host("b", 12, [A100(0)])], {"exclude": "b"},
     {"world_size": 2, "nodes": 1}, [("a", 2, [0, 1], "eth0")]),
    ("master knob reorders; rank 0 on the chosen host",
     [host("a", 11, [A100(0)]), host("b", 12, [A100(0), A100(1)])], {"master": "b", "master_port": 29611},
     {"master": {"name": "b", "address": "10.1.0.12", "port": 29611}},
     [("b", 2, [0, 1], "eth0"), ("a", 1, [0], "eth0")]),
    ("forced cpu on GPU hosts uses every host",
     [host("a", 11, [A100(0)]), host("amd", 12, [MI250(0)])], {"accelerator": "cpu", "cpu_ranks": 1},
     {"accelerator": "cpu", "backend": "gloo", "world_size": 2}, [("a", 1, None, "eth0"), ("amd", 1, None, "eth0")]),
]


@pytest.mark.parametrize("hosts,knobs,expected,per_host", [c[1:] for c in CLUSTERS], ids=[c[0] for c in CLUSTERS])
def test_plan_table(hosts, knobs, expected, per_host):
    plan = make_plan(hosts, knobs)
    for key, value in expected.items():
        if isinstance(value, dict) and key == "env":
            for k, v in value.items():
                assert plan["env"][k] == v, (k, plan["env"])
        else:
            assert plan[key] == value, (key, plan[key])
    got = [(h["name"], h["slots"], h["devices"], h["ifname"]) for h in plan["hosts"]]
    assert got == per_host
    assert plan["world_size"] == sum(h["slots"] for h in plan["hosts"])
    assert [h["first_rank"] for h in plan["hosts"]] == [sum(h2["slots"] for h2 in plan["hosts"][:i])
                                                         for i in range(len(plan["hosts"]))]
    assert plan["batch"]["global"] == plan["batch"]["micro"] * plan["batch"]["grad_accum"] * plan["world_size"]
    left = {e["name"] for e in plan["excluded"]}
    assert left | {h["name"] for h in plan["hosts"]} == {h["name"] for h in hosts}


def test_left_out_reasons_name_the_vendor():
    plan = make_plan([host("nv", 11, [V100(0)]), host("amd", 12, [MI250(0), MI250(1)]), host("cpu", 13)], {})
    reasons = {e["name"]: e["reason"] for e in plan["excluded"]}
    assert "nvidia devices; the plan uses amd" in reasons["nv"]
    assert "no accelerator" in reasons["cpu"]


def test_per_host_ifname_differs_and_master_address_is_on_the_shared_network():
    a = host("a", 11, [A100(0)])
    b = host("b", 12, [A100(0)])
    # a has a management network first; b reaches a only on 10.1.0.0/24 through ens2
    a["interfaces"].insert(1, {"name": "mgmt0", "ipv4": ["192.168.5.11/24"]})
    b["interfaces"] = [{"name": "ens2", "ipv4": ["10.1.0.12/24"]}]
    plan = make_plan([a, b], {})
    assert plan["master"]["address"] == "10.1.0.11"
    assert [h["ifname"] for h in plan["hosts"]] == ["eth0", "ens2"]
    assert plan["hosts"][1]["env"]["NCCL_SOCKET_IFNAME"] == "ens2"
    assert plan["env"]["NCCL_SOCKET_IFNAME"] == "ens2,eth0"
    assert plan["warnings"]


@pytest.mark.parametrize("hosts,knobs,message", [
    ([host("a", 11, [A100(0)])], {"accelerator": "amd"}, "no reachable, non-excluded host has a amd device"),
    ([host("a", 11, [A100(0)])], {"accelerator": "tpu"}, "accelerator='tpu' is not one of"),
    ([host("a", 11, [A100(0)]), host("b", 12)], {"exclude": ["a", "b"]}, "every host is excluded"),
    ([host("a", 11, [A100(0)])], {"exclude": "zz"}, "exclude names zz"),
    ([host("a", 11, [A100(0)]), dict(host("b", 12, [A100(0)]), address="10.1.0.11")], {}, "same address 10.1.0.11"),
    ([host("a", 11, [A100(0)])], {"max_steps": 0}, "max_steps=0 must be >= 1"),
    ([host("a", 11, [A100(0)])], {"max_steps": "ten"}, "knob max_steps='ten' must be an integer"),
    ([host("a", 11, [A100(0)])], {"modle": "x"}, "unknown knob(s) modle"),
    ([host("a", 11, [V100(0)])], {"precision": "bf16"}, "a cannot run bf16"),
    ([host("c", 11)], {"precision": "fp16"}, "fp16 is not supported by DeepSpeed on CPU"),
    ([host("a", 11, [A100(0)], slots=3)], {}, "slots=3 but has only 1"),
    ([host("a", 11, [A100(0)]), {"name": "b", "address": "10.1.0.12", "reachable": False}], {},
     "host b is unreachable"),
    ([host("a", 11, [A100(0)]), dict(host("b", 12, [A100(0)]), interfaces=[{"name": "x", "ipv4": ["10.9.0.2/24"]}])],
     {}, "host b has no interface on the network of master address 10.1.0.11"),
    ([host("a", 11, [A100(0)]), dict(host("b", 12, [A100(0)]), venv="/other/venv")],
     {"launcher": "pdsh"}, "dsfleet paths differ"),
    ([], {}, "no host in group dsfleet"),
])
def test_bad_input_names_host_and_fix(hosts, knobs, message):
    with pytest.raises(PlanError) as err:
        make_plan(hosts, knobs)
    assert message in str(err.value)


def test_unreachable_host_left_out_when_allowed():
    plan = make_plan([host("a", 11, [A100(0)]), {"name": "b", "address": "10.1.0.12", "reachable": False}],
                          {"require_all_hosts": "false"})
    assert plan["excluded"] == [{"name": "b", "reason": "unreachable (no facts gathered)"}]
    assert plan["world_size"] == 1


def test_knob_coercion_from_extra_vars_strings():
    k = K.normalize({"max_steps": "10", "lr": "1e-3", "exclude": "a, b", "require_all_hosts": "no",
                           "extra_env": '{"NCCL_DEBUG": "INFO"}'})
    assert (k["max_steps"], k["lr"], k["exclude"], k["require_all_hosts"]) == (10, 1e-3, ["a", "b"], False)
    assert k["extra_env"] == {"NCCL_DEBUG": "INFO"}
    assert k["model"] == "tiny" and k["launcher"] == "ansible"


def test_process_specs_ansible_launcher_one_deepspeed_per_host():
    plan = make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0), A100(1)])],
                     {"max_steps": 7, "model": "/m", "run_id": "r1", "extra_env": {"NCCL_DEBUG": "INFO"}})
    for h in plan["hosts"]:
        paths, proc, cmds = h["paths"], h["process"], h["commands"]
        assert paths["run_dir"] == "/home/u/.dsfleet/runs/r1" and proc["cwd"] == paths["run_dir"]
        argv = proc["argv"]
        # DeepSpeed's per-node launcher's torch-free twin, with what `deepspeed --no_ssh --node_rank N` would pass
        # launch.py
        assert argv[:3] == ["/home/u/.dsfleet/venv/bin/python", "-u", "/home/u/.dsfleet/code/train/node_launch.py"]
        assert paths["node_launch"] == argv[2]
        world = json.loads(base64.urlsafe_b64decode(argv[3].split("=", 1)[1]))
        assert argv[3].startswith("--world_info=") and list(world.items()) == [
            (x["address"], list(range(x["slots"]))) for x in plan["hosts"]]
        assert argv[4:7] == ["--master_addr=10.1.0.11", "--master_port=29500", "--node_rank=%d" % h["node_rank"]]
        assert argv[7] == paths["train"]
        assert argv[argv.index("--keep_checkpoints") + 1] == "2" and "--resume" not in argv
        assert argv[argv.index("--max_steps") + 1] == "7" and argv[argv.index("--model") + 1] == "/m"
        assert argv[argv.index("--deepspeed_config") + 1] == paths["ds_config"]
        # the supervisor wraps exactly the rank's command; preflight checks the same arguments
        assert cmds["start"]["argv"] == [paths["python"], paths["node"], "start", "--run-dir", paths["run_dir"],
                                         "--stall-timeout", "300", "--startup-timeout", "600", "--grace", "10",
                                         "--"] + argv
        assert cmds["preflight"]["argv"][3:] == argv[8:]
        env = proc["env"]
        assert env["PATH"] == "/home/u/.dsfleet/venv/bin:/usr/bin:/bin"
        assert (env["DS_ACCELERATOR"], env["NCCL_SOCKET_IFNAME"], env["NCCL_DEBUG"]) == ("cuda", "eth0", "INFO")
        assert cmds["start"]["env"] == env and cmds["preflight"]["env"] == env
        assert h["watched"] is True
        assert ("--port" in cmds["stage"]["argv"]) == (h["node_rank"] == 0)   # the master's port is checked free
        assert cmds["stop"]["argv"][-2:] == ["--grace", "10"] and cmds["status"]["argv"][5:7] == ["--wait", "5"]
    assert plan["deepspeed_env"]["PATH"] == plan["hosts"][0]["process"]["env"]["PATH"]
    table = "\n".join(R.plan_table(plan))
    assert "world size 3 on 2 host(s)" in table and "10.1.0.11:29500" in table


def test_process_specs_pdsh_launcher_only_the_master_starts_and_is_watched():
    plan = make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)])],
                     {"launcher": "pdsh", "stop_grace": 3, "poll_interval": 2})
    master, worker = plan["hosts"]
    argv = master["process"]["argv"]
    assert argv[argv.index("--launcher"):argv.index("--launcher") + 3] == ["--launcher", "pdsh",
                                                                           master["paths"]["train"]]
    assert "--no_ssh" not in master["process"]["argv"]
    assert master["process"]["env"]["PDSH_RCMD_TYPE"] == "ssh"
    assert worker["process"] is None and worker["commands"]["start"] is None
    assert (master["watched"], worker["watched"]) == (True, False)
    # every host can still be stopped and asked: the pdsh runner's ranks carry the same run directory
    assert worker["commands"]["stop"]["argv"][-2:] == ["--grace", "3"]
    assert worker["commands"]["status"]["argv"][-2:] == ["--wait", "2"]
    assert plan["deepspeed_env"]["NCCL_SOCKET_IFNAME"] == "eth0"


def test_ds_config_holds_the_policy():
    plan = make_plan([host("a", 11, [A100(0), A100(1)])], {"zero_stage": 3, "micro_batch": 2, "grad_accum": 4})
    c = plan["ds_config"]
    assert (c["train_batch_size"], c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (16, 2, 4)
    assert c["bf16"] == {"enabled": True} and c["fp16"]["enabled"] is False
    assert c["gradient_clipping"] == 1.0
    assert c["zero_optimization"]["stage"] == 3
    assert c["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "offload_optimizer" not in c["zero_optimization"]


def test_offload_keeps_the_same_optimizer():
    hosts = [host("a", 11, [V100(0)])]
    plain, offloaded = make_plan(hosts)["ds_config"], make_plan(hosts, {"offload": "cpu"})["ds_config"]
    assert offloaded["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    same = {k: v for k, v in plain["optimizer"]["params"].items() if k not in ("torch_adam", "fused")}
    assert offloaded["optimizer"]["params"] == same
    assert plain["optimizer"]["type"] == offloaded["optimizer"]["type"] == "AdamW"
    assert same == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    # torch's fused AdamW steps it without offload (no op to compile, updated in place), DeepSpeed's CPU Adam with it
    assert (plain["optimizer"]["params"]["torch_adam"], plain["optimizer"]["params"]["fused"]) == (True, True)
    cpu = make_plan([host("c", 11)], {"offload": "cpu"})["ds_config"]
    assert cpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is False


def test_dry_run_is_a_plan_field():
    assert make_plan([host("a", 11, [A100(0)])], {"dry_run": "true"})["dry_run"] is True
    assert make_plan([host("a", 11, [A100(0)])])["dry_run"] is False


def test_interfaces_from_facts():
    facts = {"interfaces": ["lo", "veth-x"], "lo": {"ipv4": {"address": "127.0.0.1", "netmask": "255.0.0.0"}},
             "veth_x": {"ipv4": {"address": "10.2.0.5", "netmask": "255.255.255.0"}, "speed": 10000,
                        "ipv4_secondaries": [{"address": "10.3.0.5", "netmask": "255.255.0.0"}]}}
    facts["lo"]["speed"] = -1  # the kernel's "unknown"
    assert P.interfaces(facts) == [{"name": "lo", "ipv4": ["127.0.0.1/8"]},
                                   {"name": "veth-x", "ipv4": ["10.2.0.5/24", "10.3.0.5/16"], "speed_mbps": 10000}]


PLAN2 = None


def _two_host_plan(**knobs):
    return P.make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)])],
                          dict({"max_steps": 10, "run_id": "r"}, **knobs))


@pytest.mark.parametrize("statuses,state,host,reason", [
    ({"a": {"state": "running", "started_at": 100, "now": 110, "last_metric": None},
      "b": {"state": "running"}}, "running", "", ""),
    ({"a": {"state": "running", "started_at": 100, "now": 110, "progress_at": 109,
            "last_metric": {"event": "step", "step": 3, "loss": 2.5, "tokens_per_s": 1000, "elapsed_s": 9}},
      "b": {"state": "running"}}, "running", "", ""),
    ({"a": {"state": "running", "started_at": 100, "now": 110},
      "b": {"state": "exited", "rc": 1, "log_tail": "boom"}}, "failed", "b", "exited with code 1"),
    ({"a": {"state": "exited", "rc": 1, "ended_at": 105.5, "log_tail": "reset by peer"},
      "b": {"state": "exited", "rc": -9, "ended_at": 103.0, "log_tail": "boom"}}, "failed", "b", "code -9"),
    # the hosts' supervisors enforce the timeouts and say why they stopped the ranks
    ({"a": {"state": "exited", "rc": -15, "ended_at": 700, "reason": "no training step within startup_timeout=600s"},
      "b": {"state": "exited", "rc": 1, "ended_at": 703}}, "failed", "a", "no training step within startup_timeout"),
    ({"a": {"state": "exited", "rc": 1, "ended_at": 905},
      "b": {"state": "exited", "rc": -15, "ended_at": 900, "reason": "no progress for 301s (stall_timeout=300s)"}},
     "failed", "b", "no progress for 301s"),
    ({"a": {"state": "running", "started_at": 100, "now": 110}}, "failed", "b", "no status from host"),
    ({"a": {"state": "running", "started_at": 100, "now": 110}, "b": None}, "failed", "b", "unreachable"),
    ({"a": {"state": "exited", "rc": 0, "last_metric": {"event": "end", "steps": 10, "final_loss": 1.0}},
      "b": {"state": "exited", "rc": 0}}, "done", "a", ""),
    ({"a": {"state": "exited", "rc": 0, "last_metric": {"event": "step", "step": 4}},
      "b": {"state": "exited", "rc": 0}}, "failed", "a", "without finishing"),
])
def test_progress_judgement(statuses, state, host, reason):
    out = R.progress(_two_host_plan(), statuses, 0)
    assert out["state"] == state
    assert out["host"] == host
    assert reason in out["reason"]
    if state == "running":
        assert out["line"]
    if (statuses.get("b") or {}).get("log_tail") and state == "failed":
        assert out["log_tail"] == "boom"


def test_pdsh_mode_watches_only_the_master():
    plan = _two_host_plan(launcher="pdsh")
    out = R.progress(plan, {"a": {"state": "running", "started_at": 1, "now": 2}, "b": {"state": "missing"}})
    assert out["state"] == "running"


def test_summary_from_metrics():
    plan = _two_host_plan()
    metrics = [{"event": "start"}, {"event": "step", "step": 1, "loss": 3.0},
               {"event": "end", "steps": 10, "first_loss": 3.0, "final_loss": 1.5, "tokens_per_s": 900.0,
                "checkpoint_dir": "/o/checkpoint", "export_dir": "/o/export", "elapsed_s": 4.0}]
    s = R.summary(plan, metrics, {"run_dir": "/runs/r"})
    assert (s["world_size"], s["steps"], s["first_loss"], s["final_loss"]) == (2, 10, 3.0, 1.5)
    assert [h["name"] for h in s["hosts"]] == ["a", "b"] and s["checkpoint_dir"] == "/o/checkpoint"
    assert any("3.0000 -> 1.5000" in line for line in R.summary_table(s))
    assert "records      /runs/r/{metrics.jsonl,plot.png}; tensorboard --logdir /runs/r/tensorboard" in R.summary_table(s)
    with pytest.raises(PlanError):
        R.summary(plan, metrics[:2])
    slurm = R.summary(make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)])], {"launcher": "slurm"}),
                      metrics, {"slurm_job": 17})
    assert slurm["launcher"] == "slurm" and slurm["slurm_job"] == 17
    assert "accelerator  nvidia, bf16, ZeRO-2, launcher slurm (SLURM job 17)" in R.summary_table(slurm)


def test_follow_line_gives_step_loss_rate_elapsed_and_eta():
    status = {"now": 1100.0, "started_at": 1000.0,
              "progress": {"event": "step", "step": 150, "total": 1150, "start_step": 100, "loss": 2.5,
                           "tokens_per_s": 5400.0, "elapsed_s": 50.0, "time": 1100.0}}
    assert R.follow_line(status) == "step 150/1150  loss 2.5000  5400 tokens/s  elapsed 50s  ETA 16m40s"
    status["now"] = 1110.0  # ten seconds after the last step: elapsed goes on, the rate drops
    assert "elapsed 1m00s" in R.follow_line(status)
    assert R.follow_line({"now": 1030.0, "started_at": 1000.0, "log_tail": "[INFO] x\nloading weights\n"}) == \
        "starting: 30s  | loading weights"
    assert R.follow_line({"now": 9000, "started_at": 0, "progress": {"event": "step", "step": 5, "total": 9,
                                                                     "start_step": 5, "elapsed_s": 0}}).endswith("ETA n/a")
    assert R.follow_line({"state": "queued", "slurm": {"id": 7, "state": "PENDING", "reason": "Resources"}}) == \
        "queued: SLURM job 7 PENDING (Resources)"
    assert R.follow_line({"state": "queued", "slurm": {"id": 8, "state": "PENDING", "reason": "None"}}) == \
        "queued: SLURM job 8 PENDING"
    assert R.follow_line({"state": "queued", "slurm": {"id": 8, "state": "RUNNING", "reason": "None"}}) == \
        "starting: SLURM job 8 is running; this host's step is starting"


def test_status_table_and_stop_report():
    plan = _two_host_plan()
    statuses = {"a": {"state": "running", "rc": None, "ranks_alive": 1, "now": 10, "started_at": 0,
                      "progress": {"event": "step", "step": 4, "total": 10, "start_step": 0, "loss": 3.25,
                                   "tokens_per_s": 1200.0, "elapsed_s": 8.0, "time": 10},
                      "devices": [{"index": 0, "utilization_pct": 97.0, "memory_used_mib": 30822.0,
                                   "memory_total_mib": 81920.0}]},
                "b": None}
    lines = R.status_table(plan, statuses)
    assert lines[1].split() == ["a", "running", "1/1", "4/10", "3.2500", "1200", "97.0%", "30.1/80.0", "GiB"]
    assert lines[2].split()[:2] == ["b", "unreachable"]
    assert "failed on b" in lines[3]
    report = R.stop_report(plan, {"a": {"terminated": [5]}, "b": {"terminated": []}}, {"a": [10, 20], "b": [20]})
    assert report == ["run r: stopped on a",
                      "newest checkpoint complete on every host: step 20; continue with ./dsfleet launch.yml "
                      "-e resume=r"]
    assert "resume would start from step 0" in R.stop_report(plan, {}, {"a": [10], "b": []})[1]
    assert R.common_checkpoint({"a": [10, 20, 30], "b": [20, 30], "c": [30, 40]}) == 30
    assert R.common_checkpoint({}) is None


def test_supervisor_commands_carry_the_watchdog_and_the_reporting_host():
    plan = _two_host_plan(stall_timeout=60, startup_timeout=120, stop_grace=4, checkpoint_grace=90)
    a, b = plan["hosts"]
    start = a["commands"]["start"]["argv"]
    assert start[start.index("--stall-timeout") + 1] == "60" and start[start.index("--startup-timeout") + 1] == "120"
    assert start[start.index("--grace") + 1] == "4" and start[start.index("--") + 1:] == a["process"]["argv"]
    assert "--report" in a["commands"]["status"]["argv"] and "--report" not in b["commands"]["status"]["argv"]
    assert a["commands"]["stop_checkpoint"]["argv"][-2:] == ["--grace", "90"]
    assert a["commands"]["status_now"]["argv"][-3:] == ["--devices", "nvidia:0", "--report"]
    # two hosts without a shared filesystem: every host keeps the model states and its shards by local rank
    assert plan["ds_config"]["checkpoint"] == {"use_node_local_storage": True}
    assert "checkpoint" not in make_plan([host("a", 11, [A100(0)])])["ds_config"]


def test_resume_continues_the_named_run():
    plan = P.make_plan([host("a", 11, [A100(0)])], {"resume": "ft-1", "save_every_minutes": "15"})
    assert plan["run_id"] == "ft-1" and plan["hosts"][0]["paths"]["run_dir"].endswith("/runs/ft-1")
    argv = plan["hosts"][0]["process"]["argv"]
    assert "--resume" in argv and argv[argv.index("--save_every_minutes") + 1] == "15.0"
    assert plan["knobs"]["resume"] == "ft-1"
    with pytest.raises(PlanError, match="drop run_id"):
        P.make_plan([host("a", 11, [A100(0)])], {"resume": "ft-1", "run_id": "other"})
    with pytest.raises(PlanError, match="resume='../x' may hold only"):
        P.make_plan([host("a", 11, [A100(0)])], {"resume": "../x", "run_id": "r"})


def test_status_json_takes_the_last_json_line():
    assert R.status_json('motd line\n{"state": "running", "dsfleet_status": 1}\n') == {"state": "running",
                                                                                      "dsfleet_status": 1}
    assert R.status_json("") is None and R.status_json("not json\n{broken") is None


# --- resume on another world: replicas, the gather, the universal checkpoint -----------------------------------

def _three(**knobs):
    return P.make_plan([host("a", 11, [A100(0), A100(1)]), host("b", 12, [A100(0), A100(1)]),
                        host("c", 13, [A100(0), A100(1)])], dict({"max_steps": 10, "run_id": "r"}, **knobs))


def _marker(step, world, ranks, stage=2):
    return {"tag": "global_step%d" % step, "step": step, "world_size": world, "ranks": ranks, "zero_stage": stage}


def test_each_host_replicates_its_shards_to_the_next_host_in_a_ring():
    plan = _three()
    ring = [(e["ranks"], e["to"]) for e in plan["replicas"]]
    assert ring == [([0, 1], "b"), ([2, 3], "c"), ([4, 5], "a")]
    argv = plan["replicas"][1]["argv"]
    assert argv[2] == "replicate" and argv[argv.index("--from") + 1] == "b" and argv[argv.index("--to") + 1] == "10.1.0.13"
    assert json.loads(argv[argv.index("--remote") + 1]) == plan["hosts"][2]["commands"]["receive"]["argv"]
    train = plan["hosts"][0]["process"]["argv"]
    assert train[train.index("--replicas") + 1] == plan["hosts"][0]["paths"]["replicas"]
    single = P.make_plan([host("a", 11, [A100(0)])], {"run_id": "r"})
    assert single["replicas"] == [] and "--replicas" not in single["hosts"][0]["process"]["argv"]


def test_resume_source_exact_when_every_host_holds_its_own_shards_of_this_layout():
    plan = _three(resume="r")
    listings = {n: {"layouts": {"10": _marker(10, 6, r), "20": _marker(20, 6, r)}, "universal": [], "replicas": {}}
                for n, r in (("a", [0, 1]), ("b", [2, 3]), ("c", [4, 5]))}
    found = R.resume_source(listings, plan)
    assert (found["step"], found["mode"], found["argv"]) == (20, "exact", None)
    # step 20 missing on c: the newest step complete everywhere is 10
    del listings["c"]["layouts"]["20"]
    assert R.resume_source(listings, plan)["step"] == 10


def test_resume_source_gathers_a_dead_hosts_shards_from_its_replica():
    # written by a, b, c (2 ranks each); c is gone; b kept c's copy? no: c copied to a (the ring c -> a)
    plan = P.make_plan([host("a", 11, [A100(0), A100(1)]), host("b", 12, [A100(0), A100(1)])],
                       {"max_steps": 10, "run_id": "r", "resume": "r"})
    listings = {
        "a": {"layouts": {"30": _marker(30, 6, [0, 1])}, "universal": [],
              "replicas": {"c": {"30": _marker(30, 6, [4, 5])}}},
        "b": {"layouts": {"30": _marker(30, 6, [2, 3])}, "universal": [],
              "replicas": {"a": {"30": _marker(30, 6, [0, 1])}}},
    }
    found = R.resume_source(listings, plan)
    assert found["mode"] == "convert" and found["step"] == 30
    argv = found["argv"]
    assert argv[:3] == plan["hosts"][0]["commands"]["universal"]["argv"][:3] and argv[argv.index("--step") + 1] == "30"
    sources = json.loads(argv[argv.index("--sources") + 1])
    # the master's own files and the replica it holds travel nowhere; b sends only its own ranks
    assert [(s["name"], s["holder"], s["ranks"], s["local"]) for s in sources] == [
        ("a", None, [0, 1], True), ("a", "c", [4, 5], True), ("b", None, [2, 3], False)]
    assert sources[2]["pack"] == plan["hosts"][1]["commands"]["pack"]["argv"]
    targets = json.loads(argv[argv.index("--targets") + 1])
    assert [t["name"] for t in targets] == ["b"] and targets[0]["address"] == "10.1.0.12"
    assert "written by 6 rank(s), now 4" in found["text"]
    # without c's replica ranks 4 and 5 are gone: nothing to resume from, and the message lists what is there
    del listings["a"]["replicas"]["c"]
    gone = R.resume_source(listings, plan)
    assert gone["mode"] == "none" and "a: 30" in gone["text"]


def test_resume_source_prefers_an_existing_universal_checkpoint_and_exact_at_the_same_step():
    plan = _two_host_plan(resume="r")
    listings = {"a": {"layouts": {"5": _marker(5, 2, [0])}, "universal": [8]},
                "b": {"layouts": {"5": _marker(5, 2, [1])}, "universal": [8]}}
    assert R.resume_source(listings, plan)["mode"] == "universal"
    listings["a"]["layouts"]["8"] = _marker(8, 2, [0])
    listings["b"]["layouts"]["8"] = _marker(8, 2, [1])
    assert R.resume_source(listings, plan)["mode"] == "exact"
    # the same world size on other ranks (hosts swapped) is not exact
    listings = {"a": {"layouts": {"8": _marker(8, 2, [1])}}, "b": {"layouts": {"8": _marker(8, 2, [0])}}}
    assert R.resume_source(listings, plan)["mode"] == "convert"
    # an older dsfleet's marker has no layout: trusted as exact, as train.py does
    assert R.resume_source({"a": {"layouts": {"3": {"tag": "global_step3"}}},
                            "b": {"layouts": {"3": {"tag": "global_step3"}}}}, plan)["mode"] == "exact"


def test_resume_on_another_world_keeps_the_global_batch_and_says_so():
    before = _three(micro_batch=2, grad_accum=1)["layout"]
    assert before["world_size"] == 6 and before["global_batch"] == 12
    plan = P.make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)])],
                       {"run_id": "r", "resume": "r", "micro_batch": 2, "grad_accum": 1}, before)
    assert plan["batch"] == {"micro": 2, "grad_accum": 3, "global": 12}
    assert plan["ds_config"]["gradient_accumulation_steps"] == 3 and plan["ds_config"]["train_batch_size"] == 12
    assert plan["resume"]["same_layout"] is False
    line = [ln for ln in R.plan_table(plan) if ln.startswith("resume:")][0]
    assert "written by 6 rank(s) on a, b, c; now 2 rank(s)" in line and "global batch 12 kept" in line
    same = P.make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)])],
                       {"run_id": "r", "resume": "r"}, _two_host_plan()["layout"])
    assert same["resume"]["same_layout"] and "exact continuation" in " ".join(R.plan_table(same))
    odd = P.make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)])],
                      {"run_id": "r", "resume": "r", "micro_batch": 4}, before)
    assert odd["batch"]["global"] == 8 and "does not divide" in odd["resume"]["note"]


def test_a_run_planned_by_global_batch_resumes_with_its_stored_knobs():
    """A resume re-plans from the knobs plan.json stored (the derived grad_accum among them): the global batch is
    kept, on the same world and on a smaller one."""
    hosts = [host("a", 11, [A100(0)]), host("b", 12, [A100(0)]), host("c", 13, [A100(0)]), host("d", 14, [A100(0)])]
    first = P.make_plan(hosts, {"run_id": "r", "global_batch": 32})
    assert first["batch"] == {"micro": 4, "grad_accum": 2, "global": 32}
    stored = {n: v for n, v in first["knobs"].items() if n not in ("run_id", "resume", "dry_run", "follow")}
    again = P.make_plan(hosts, dict(stored, resume="r"), first["layout"])
    assert again["batch"] == first["batch"] and again["resume"]["same_layout"]
    fewer = P.make_plan(hosts[:2], dict(stored, resume="r"), first["layout"])
    assert fewer["batch"] == {"micro": 4, "grad_accum": 4, "global": 32}


def test_staging_is_one_command_per_host():
    plan = _two_host_plan()
    a, b = (h["commands"]["stage"]["argv"] for h in plan["hosts"])
    paths = plan["hosts"][0]["paths"]
    assert a[:4] == [paths["python"], "-c", P.UNPACK, paths["home"]]
    assert a[4:7] == [paths["python"], paths["node"], "stage"]
    assert json.loads(a[a.index("--preflight") + 1]) == plan["hosts"][0]["commands"]["preflight"]
    assert a[a.index("--port") + 1] == str(plan["master"]["port"]) and "--port" not in b   # the master's only
    assert "--checkpoints" not in a
    resumed = _two_host_plan(resume="r")
    assert all("--checkpoints" in h["commands"]["stage"]["argv"] for h in resumed["hosts"])


def test_export_source_gathers_the_newest_whole_checkpoint_on_the_master():
    plan = _two_host_plan()
    listings = {"a": {"layouts": {"10": _marker(10, 2, [0]), "20": _marker(20, 2, [0])},
                      "replicas": {"b": {"10": _marker(10, 2, [1])}}},
                "b": {"layouts": {"10": _marker(10, 2, [1]), "20": _marker(20, 2, [1])}, "replicas": {}}}
    found = R.export_source(listings, plan)
    assert found["step"] == 20 and found["dest"].endswith("/runs/r/out/export-global_step20")
    argv = found["argv"]
    assert argv[:len(plan["hosts"][0]["commands"]["export"]["argv"])] == plan["hosts"][0]["commands"]["export"]["argv"]
    assert argv[argv.index("--model", 3) + 1] == "tiny" and argv[argv.index("--step") + 1] == "20"
    sources = json.loads(argv[argv.index("--sources") + 1])
    assert [(s["name"], s["holder"], s["ranks"]) for s in sources] == [("a", None, [0]), ("b", None, [1])]
    # b gone: step 10 still exports from a's own shard and the copy of b's it keeps; 20 does not
    listings["b"] = None
    assert R.export_source(listings, plan)["step"] == 10
    bad = R.export_source(listings, plan, step=20)
    assert bad["step"] is None and "step 20 is not a checkpoint" in bad["text"] and "complete: 10" in bad["text"]
    assert "did not answer" in R.export_source({"a": None, "b": listings["a"]}, plan)["text"]
    empty = R.export_source({"a": {"layouts": {}}, "b": {"layouts": {}}}, plan)
    assert empty["step"] is None and "no checkpoint with every rank's files" in empty["text"]
    assert plan["hosts"][1]["commands"]["export"] is None   # the master gathers


def test_devices_not_from_zero_list_the_host_to_its_highest_index_and_include_the_planned_ones():
    """DeepSpeed's runner only lets --include pick among 0..slots-1 (real runner: tests/e2e/test_launcher_args.py)."""
    from dsfleet_core import render
    plan = make_plan([host("a", 11, [A100(0), A100(2)]), host("b", 12, [A100(0), A100(1)])])
    assert plan["include"] == "10.1.0.11:0,2@10.1.0.12:0,1" and plan["world_size"] == 4
    assert render.hostfile(plan).splitlines()[2:] == ["10.1.0.11 slots=3", "10.1.0.12 slots=2"]
    assert json.loads(base64.urlsafe_b64decode(P.world_info(plan))) == {"10.1.0.11": [0, 2], "10.1.0.12": [0, 1]}


def test_the_run_files_render_from_the_plan():
    from dsfleet_core import render
    plan = _three()
    files = render.files(plan)
    assert sorted(files) == sorted(render.FILES)
    assert files["hostfile"].splitlines()[2:] == ["10.1.0.11 slots=2", "10.1.0.12 slots=2", "10.1.0.13 slots=2"]
    assert json.loads(files["plan.json"]) == json.loads(json.dumps(plan))
    assert json.loads(files["ds_config.json"]) == plan["ds_config"]
    assert json.loads(files["replicas.json"]) == plan["replicas"]
    env = dict(line.split("=", 1) for line in files[".deepspeed_env"].splitlines())
    assert env == {k: str(v) for k, v in plan["deepspeed_env"].items()}
    plan["deepspeed_env"]["BAD"] = "two\nlines"
    with pytest.raises(ValueError, match="BAD cannot be written"):
        render.files(plan)


def test_inputs_only_the_controller_has_are_copied_to_every_host_and_read_there():
    hosts = [host("a", 11, [A100(0)]), host("b", 12, [A100(0)])]
    inputs = {"model": {"path": "/data/llama", "dir": True}, "dataset": {"path": "/data/c.jsonl", "dir": False}}
    p = P.make_plan(hosts, {"run_id": "r", "model": "/data/llama", "dataset": "/data/c.jsonl"}, None, None, inputs)
    for h in p["hosts"]:
        staged = {i["name"]: i for i in h["inputs"]}
        model, data = staged["model"]["dest"], staged["dataset"]["dest"]
        assert model.startswith("/home/u/.dsfleet/inputs/llama-") and staged["model"]["folder"] == model
        assert data.startswith("/home/u/.dsfleet/inputs/c.jsonl-") and data.endswith("/c.jsonl")
        argv = h["process"]["argv"]
        assert argv[argv.index("--model") + 1] == model and argv[argv.index("--dataset") + 1] == data
        pre = h["commands"]["preflight"]["argv"]
        assert pre[pre.index("--dataset") + 1] == data
    export = p["hosts"][0]["commands"]["export"]["argv"]
    assert export[export.index("--model") + 1] == model
    assert "dataset /data/c.jsonl: on the controller only; copied to every host" in "\n".join(R.plan_table(p))
    # this machine alone reads them where they are
    alone = P.make_plan([localhost()], {"run_id": "r", "dataset": "/data/c.jsonl"}, None, None, inputs)
    assert alone["inputs"] == {} and alone["hosts"][0]["inputs"] == []
    argv = alone["hosts"][0]["process"]["argv"]
    assert argv[argv.index("--dataset") + 1] == "/data/c.jsonl"


def test_a_hub_model_is_downloaded_once_on_the_master_and_shipped_to_the_others():
    hosts = [host("a", 11, [A100(0)]), host("b", 12, [A100(0)]), host("c", 13, [A100(0)])]
    inputs = {"model": {"hub": "acme/llama-7b", "revision": "v1.0"}, "dataset": None}
    p = P.make_plan(hosts, {"run_id": "r", "model": "acme/llama-7b", "model_revision": "v1.0"}, None, None, inputs)
    folder = "/home/u/.dsfleet/inputs/hub/acme--llama-7b--v1.0"
    for h in p["hosts"]:
        (item,) = h["inputs"]
        assert (item["hub"], item["revision"], item["dest"], item["src"]) == ("acme/llama-7b", "v1.0", folder, None)
        argv = h["process"]["argv"]
        assert argv[argv.index("--model") + 1] == folder
    assert [h["commands"]["hub"] is None for h in p["hosts"]] == [False, True, True]
    argv = p["hosts"][0]["commands"]["hub"]["argv"]
    verb = argv.index("hub")
    pairs = {argv[i]: argv[i + 1] for i in range(verb + 1, len(argv) - 1) if argv[i].startswith("--")}
    assert (pairs["--repo"], pairs["--revision"], pairs["--dest"]) == ("acme/llama-7b", "v1.0", folder)
    assert json.loads(pairs["--targets"]) == [{"name": "b", "address": "10.1.0.12", "dest": folder},
                                               {"name": "c", "address": "10.1.0.13", "dest": folder}]
    table = "\n".join(R.plan_table(p))
    assert "model acme/llama-7b@v1.0: from the hub, downloaded once on the master a into " + folder in table
    assert "shipped to b, c over the ssh mesh" in table
    # this machine alone downloads it too (into its own folder, at the revision asked for); a revision that is not
    # a plain name still gives a safe folder name
    alone = P.make_plan([localhost()], {"run_id": "r"}, None, None,
                        {"model": {"hub": "acme/x", "revision": "refs/pr/3"}})
    (item,) = alone["hosts"][0]["inputs"]
    assert item["dest"].split("/")[-1].startswith("acme--x--refs_pr_3-") and "/" not in item["dest"].split("hub/")[1]
    assert json.loads(alone["hosts"][0]["commands"]["hub"]["argv"][-1]) == []


def test_data_format_and_eval_reach_the_training_module():
    argv = make_plan([host("a", 11, [A100(0)])], {"data_format": "instruction", "prompt_field": "q",
                                                  "response_field": "a", "eval_fraction": 0.1, "eval_every": 20,
                                                  "run_id": "r"})["hosts"][0]["process"]["argv"]
    pairs = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert (pairs["--data_format"], pairs["--prompt_field"], pairs["--response_field"]) == ("instruction", "q", "a")
    assert (pairs["--eval_fraction"], pairs["--eval_every"]) == ("0.1", "20") and "--eval_dataset" not in pairs
    assert pairs["--token_cache"].endswith("/.dsfleet/cache/tokens")   # on each host, beside its runs
    plain = make_plan([host("a", 11, [A100(0)])])["hosts"][0]["process"]["argv"]
    assert "--eval_fraction" not in plain and plain[plain.index("--data_format") + 1] == "auto"
    with pytest.raises(PlanError, match="eval_fraction=0.1 and eval_dataset=/e.jsonl were both passed"):
        make_plan([host("a", 11, [A100(0)])], {"eval_fraction": 0.1, "eval_dataset": "/e.jsonl"})


def test_summary_gives_eval_tokens_per_device_and_mfu():
    cfg = json.loads((pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "gpt2.json").read_text())
    plan = P.make_plan([host("a", 11, [A100(0), A100(1)])], {"run_id": "r"}, None, cfg)
    metrics = [{"event": "eval", "step": 5, "eval_loss": 2.0, "perplexity": 7.389},
               {"event": "end", "steps": 10, "first_loss": 3.0, "final_loss": 1.5, "tokens_per_s": 100000.0,
                "eval_loss": 1.9, "perplexity": 6.686, "elapsed_s": 4.0}]
    s = R.summary(plan, metrics)
    assert (s["eval_loss"], s["perplexity"], s["evals"]) == (1.9, 6.686, [{"step": 5, "eval_loss": 2.0,
                                                                           "perplexity": 7.389}])
    assert s["tokens_per_s_per_device"] == 50000.0
    assert s["mfu"] == pytest.approx(6 * 124439808 * 100000.0 / (2 * 312e12))
    table = "\n".join(R.summary_table(s))
    assert "eval         loss 1.9000, perplexity 6.69 (1 evals)" in table
    assert "tokens/s     100000 (50000 per device; MFU 12.0% of the devices' datasheet peak)" in table
    cpu = R.summary(P.make_plan([host("c", 11)], {"run_id": "r"}, None, cfg), metrics)
    assert cpu["mfu"] is None and "MFU" not in "\n".join(R.summary_table(cpu))


def test_a_host_whose_gpus_have_no_driver_is_left_out_with_the_reason_never_a_cpu_host():
    """gpu_facts' ``undriven``: GPUs on the PCI bus that no vendor tool answers for."""
    bare = host("bare", 12, [])
    bare["gpu"]["undriven"] = [{"vendor": "nvidia", "count": 2, "names": ["GA100 [A100 SXM4 80GB]"] * 2,
                                "reason": "nvidia-smi not found"}]
    fleet = [host("a", 11, [A100(0)]), bare]
    p = make_plan(fleet, {"require_all_hosts": False})
    assert [h["name"] for h in p["hosts"]] == ["a"]
    reason = {e["name"]: e["reason"] for e in p["excluded"]}["bare"]
    assert reason == ("2 NVIDIA GPUs present (lspci: GA100 [A100 SXM4 80GB] x2), no driver: nvidia-smi not found "
                      "(setup.yml with drivers_install: true installs it)")
    with pytest.raises(PlanError, match=r"host bare: 2 NVIDIA GPUs present .*no driver: nvidia-smi not found; "
                                        r"install the driver \(ansible-playbook setup.yml with drivers_install"):
        make_plan(fleet)          # require_all_hosts is the default
    # a host whose NVIDIA GPUs work but whose AMD card has no driver trains on the NVIDIA ones, with a warning
    mixed = host("mixed", 13, [A100(0)])
    mixed["gpu"]["undriven"] = [{"vendor": "amd", "count": 1, "names": ["Aldebaran/MI200 [Instinct MI210]"],
                                 "reason": "amd-smi and rocm-smi not found"}]
    q = make_plan([host("a", 11, [A100(0)]), mixed])
    assert [h["name"] for h in q["hosts"]] == ["a", "mixed"]
    assert any(w.startswith("mixed: 1 AMD GPU present (lspci: Aldebaran/MI200 [Instinct MI210]), no driver: amd-smi "
                            "and rocm-smi not found; those GPUs are not used") for w in q["warnings"]), q["warnings"]


def test_each_hosts_script_starts_by_hand_what_the_ansible_launcher_starts_there(tmp_path):
    """runs/<id>/nodes/<host>.sh (render.node_scripts): the same argv, environment and directory as the plan's
    per-node process, after unpacking the bundle it carries; also for a pdsh plan, whose hosts get one each."""
    import shlex
    import subprocess

    from dsfleet_core import render
    for launcher in ("ansible", "pdsh"):
        plan = P.make_plan([host(n, 11 + i, [A100(0), A100(1)]) for i, n in enumerate("abc")],
                           {"max_steps": 10, "run_id": "r", "launcher": launcher, "dataset": "/data/c.jsonl"},
                           None, None, {"dataset": {"path": "/data/c.jsonl", "dir": False}})
        scripts = render.node_scripts(plan, "QUJD" * 60)
        assert sorted(scripts) == ["nodes/a.sh", "nodes/b.sh", "nodes/c.sh"]
        for h in plan["hosts"]:
            text = scripts["nodes/%s.sh" % h["name"]]
            proc = h["node_process"]
            assert "--node_rank=%d" % h["node_rank"] in proc["argv"]
            assert h["paths"]["node_launch"] in proc["argv"] and "--launcher" not in proc["argv"]
            if launcher == "ansible":
                assert proc["argv"] == h["process"]["argv"] and proc["env"] == h["process"]["env"]
            assert text.splitlines()[-1] == "exec " + " ".join(shlex.quote(a) for a in proc["argv"])
            assert ["export %s=%s" % (k, shlex.quote(str(v))) for k, v in sorted(proc["env"].items())] == [
                ln for ln in text.splitlines() if ln.startswith("export ")]
            assert "cd %s" % proc["cwd"] in text.splitlines()
            assert "copy /data/c.jsonl from the controller to %s first" % h["paths"]["inputs"]["dataset"] in text
            assert "".join(text.split("<<'DSFLEET_BUNDLE'\n")[1].split("\nDSFLEET_BUNDLE")[0].split()) == "QUJD" * 60
            path = tmp_path / ("%s-%s.sh" % (launcher, h["name"]))
            path.write_text(text)
            assert subprocess.run(["sh", "-n", str(path)]).returncode == 0          # the shell parses it
            # run where there is no venv: it says what to do and starts nothing
            ran = subprocess.run(["sh", str(path)], capture_output=True, text=True)
            assert ran.returncode == 2 and "no dsfleet python environment at /home/u/.dsfleet/venv; run setup.yml" \
                in ran.stderr
        assert "node 1 of 3, b (10.1.0.12): 2 rank(s), nvidia, bf16" in scripts["nodes/b.sh"]


def test_the_render_action_writes_the_scripts_with_the_same_bytes_and_drops_those_of_hosts_gone(tmp_path):
    import os
    import sys
    root = pathlib.Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "action_plugins"))
    import dsfleet_render
    code, node = str(root / "train"), str(root / "roles" / "launch" / "files" / "dsfleet_node.py")
    three = _three()
    written = dsfleet_render.write(str(tmp_path), three, code=code, node=node)
    assert {"nodes/a.sh", "nodes/b.sh", "nodes/c.sh", "plan.json"} <= set(written)
    assert os.access(tmp_path / "nodes" / "a.sh", os.X_OK) and not (tmp_path / "nodes" / "bundle.tar.gz").exists()
    assert dsfleet_render.write(str(tmp_path), three, code=code, node=node) == []     # the same bytes: nothing
    two = P.make_plan([host("a", 11, [A100(0), A100(1)]), host("b", 12, [A100(0), A100(1)])],
                      {"max_steps": 10, "run_id": "r"})
    written = dsfleet_render.write(str(tmp_path), two, code=code, node=node)
    assert "nodes/c.sh" in written and sorted(p.name for p in (tmp_path / "nodes").iterdir()) == ["a.sh", "b.sh"]
    assert "node 1 of 2, b" in (tmp_path / "nodes" / "b.sh").read_text()


# --- strategy=fsdp|ddp: torchrun per node, sizing per strategy, what only DeepSpeed does ----------------------

LLAMA7B = json.loads((pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "llama-2-7b.json")
                     .read_text())
TINY = json.loads((pathlib.Path(__file__).resolve().parents[2] / "train" / "presets" / "tiny" / "config.json")
                  .read_text())


def _a100s(*counts):
    return [host("h%d" % i, 11 + i, [A100(g) for g in range(n)]) for i, n in enumerate(counts)]


def test_fsdp_runs_torchrun_on_every_host_with_its_rank_devices_and_sharding():
    hosts = _a100s(4, 4)
    hosts[1]["gpu"]["gpus"] = [A100(g) for g in (0, 2, 5, 7)]  # torchrun sees exactly these: CUDA_VISIBLE_DEVICES
    plan = P.make_plan(hosts, {"run_id": "r", "strategy": "fsdp", "max_steps": 10}, model=LLAMA7B)
    assert (plan["strategy"], plan["fsdp_sharding"]) == ("fsdp", "hybrid")  # 7B fits one host's 4 shards
    proc = plan["hosts"][1]["process"]
    argv = proc["argv"]
    assert argv[:13] == ["/home/u/.dsfleet/venv/bin/torchrun", "--nnodes", "2", "--node_rank", "1",
                         "--nproc_per_node", "4", "--master_addr", "10.1.0.11", "--master_port", "29500",
                         "--max_restarts", "0"]
    assert argv[13] == "/home/u/.dsfleet/code/train/train.py"
    assert argv[argv.index("--strategy") + 1] == "fsdp" and argv[argv.index("--fsdp_sharding") + 1] == "hybrid"
    assert proc["env"]["CUDA_VISIBLE_DEVICES"] == "0,2,5,7" and proc == plan["hosts"][1]["node_process"] | {
        "env": proc["env"]}
    assert plan["ds_config"]["zero_optimization"] == {"stage": 0} and "checkpoint" not in plan["ds_config"]
    assert plan["ds_config"]["bf16"] == {"enabled": True} and plan["ds_config"]["gradient_clipping"] == 1.0
    table = R.plan_table(plan)
    assert "launcher ansible (torchrun on every host), FSDP (hybrid sharding)" in table[3]
    assert any(line.startswith("memory: 6,738,415,616 parameters (llama); FSDP (hybrid sharding) bf16") for line in table)
    # the per-device need: 16 bytes a parameter over the shard, plus the root and two layers unsharded
    s = plan["sizing"]
    shape = __import__("dsfleet_core.shape", fromlist=["x"]).model_shape(LLAMA7B)
    unsharded = shape["embedding"] + shape["lm_head"] + 2 * shape["per_layer"]
    assert s["model_states_mib"] == -(-(16 * shape["params"] // 4 + 6 * unsharded) // 2 ** 20)
    full = P.make_plan(hosts, {"run_id": "r", "strategy": "fsdp", "fsdp_sharding": "full"}, model=LLAMA7B)
    assert full["sizing"]["model_states_mib"] < s["model_states_mib"] and full["fsdp_sharding"] == "full"
    # DeepSpeed's plan is unchanged: its launcher, ZeRO in the ds_config
    ds = P.make_plan(hosts, {"run_id": "r"}, model=LLAMA7B)
    assert ds["hosts"][1]["process"]["argv"][2].endswith("/node_launch.py") and "--strategy" not in ds["hosts"][1][
        "process"]["argv"] and ds["ds_config"]["zero_optimization"]["stage"] in (2, 3)


def test_fsdp_shards_fully_where_hybrid_cannot_and_says_why_hybrid_was_refused():
    uneven = _a100s(4, 2)
    assert P.make_plan(uneven, {"run_id": "r", "strategy": "fsdp"}, model=LLAMA7B)["fsdp_sharding"] == "full"
    with pytest.raises(PlanError, match=r"fsdp_sharding=hybrid .* same number of ranks, more than one each "
                                        r"\(here: h0 x4, h1 x2\); use -e fsdp_sharding=full"):
        P.make_plan(uneven, {"run_id": "r", "strategy": "fsdp", "fsdp_sharding": "hybrid"}, model=LLAMA7B)
    # one rank a host: hybrid would shard nothing
    ones = P.make_plan(_a100s(1, 1, 1), {"run_id": "r", "strategy": "fsdp"}, model=TINY)
    assert ones["fsdp_sharding"] == "full"
    # a model the plan cannot size: full (the least memory), said in the table
    unsized = P.make_plan(_a100s(2, 2), {"run_id": "r", "strategy": "fsdp"})
    assert unsized["fsdp_sharding"] == "full" and "FSDP (full sharding)" in R.plan_table(unsized)[3]


def test_ddp_takes_a_model_that_fits_whole_and_refuses_one_that_does_not():
    small = P.make_plan(_a100s(2, 2), {"run_id": "r", "strategy": "ddp"}, model=TINY)
    assert small["strategy"] == "ddp" and small["fsdp_sharding"] is None
    argv = small["hosts"][0]["process"]["argv"]
    assert argv[argv.index("--strategy") + 1] == "ddp" and "--fsdp_sharding" not in argv
    assert small["sizing"]["model_states_mib"] == -(-16 * small["sizing"]["params"] // 2 ** 20)
    with pytest.raises(PlanError, match=r"the model does not fit: 6,738,415,616 parameters \(llama\), DDP, bf16, "
                                        r"micro batch 1 x 128 tokens needs \d+ MiB per device.* even with activation "
                                        r"checkpointing: DDP keeps the whole model.*Use -e strategy=fsdp"):
        P.make_plan(_a100s(4, 4), {"run_id": "r", "strategy": "ddp"}, model=LLAMA7B)


def test_torch_strategies_refuse_zero_offload_and_pdsh_by_name():
    hosts = _a100s(2, 2)
    with pytest.raises(PlanError, match="zero_stage=3 applies to strategy=deepspeed; strategy=fsdp shards by "
                                        "fsdp_sharding: drop zero_stage, or use -e strategy=deepspeed"):
        P.make_plan(hosts, {"run_id": "r", "strategy": "fsdp", "zero_stage": 3})
    with pytest.raises(PlanError, match="offload=cpu applies to strategy=deepspeed; strategy=ddp keeps"):
        P.make_plan(hosts, {"run_id": "r", "strategy": "ddp", "offload": "cpu"})
    with pytest.raises(PlanError, match="launcher=pdsh is DeepSpeed's own runner; strategy=fsdp starts torchrun"):
        P.make_plan(hosts, {"run_id": "r", "strategy": "fsdp", "launcher": "pdsh"})
    with pytest.raises(PlanError, match="fsdp_sharding=full applies to strategy=fsdp"):
        P.make_plan(hosts, {"run_id": "r", "strategy": "ddp", "fsdp_sharding": "full"})
    with pytest.raises(PlanError, match="strategy=.megatron. is not one of deepspeed, fsdp, ddp"):
        P.make_plan(hosts, {"run_id": "r", "strategy": "megatron"})
    # the neutral values a resumed run's stored knobs hold are accepted
    assert P.make_plan(hosts, {"run_id": "r", "strategy": "fsdp", "zero_stage": 0, "offload": "none"})["zero"] == {
        "stage": 0, "offload": "none"}


def test_a_torch_strategy_resumes_only_its_own_layout_and_strategy():
    hosts = _a100s(2, 2)
    first = P.make_plan(hosts, {"run_id": "r", "strategy": "fsdp"})
    assert first["layout"]["strategy"] == "fsdp" and first["layout"]["fsdp_sharding"] == "full"
    same = P.make_plan(hosts, {"resume": "r", "strategy": "fsdp"}, first["layout"])
    assert same["resume"]["same_layout"]
    with pytest.raises(PlanError, match=r"written by 4 rank\(s\) on h0 x2, h1 x2; strategy=fsdp resumes only on that same layout"):
        P.make_plan(hosts[:1], {"resume": "r", "strategy": "fsdp", "require_all_hosts": False}, first["layout"])
    with pytest.raises(PlanError, match="run r was trained with strategy=fsdp; .* resume with -e strategy=fsdp"):
        P.make_plan(hosts, {"resume": "r"}, first["layout"])
    ds = P.make_plan(hosts, {"run_id": "r"})
    with pytest.raises(PlanError, match="trained with strategy=deepspeed"):
        P.make_plan(hosts, {"resume": "r", "strategy": "ddp"}, ds["layout"])
    # the hosts' markers: an FSDP plan takes only its own kind of tag, never a conversion
    plan = P.make_plan(hosts, {"resume": "r", "strategy": "fsdp"}, first["layout"])
    listings = {"h0": {"layouts": {"8": dict(_marker(8, 4, [0, 1], 0), strategy="fsdp-full"),
                                   "9": _marker(9, 4, [0, 1], 0)}, "universal": [9]},
                "h1": {"layouts": {"8": dict(_marker(8, 4, [2, 3], 0), strategy="fsdp-full"),
                                   "9": _marker(9, 4, [2, 3], 0)}, "universal": [9]}}
    assert (R.resume_source(listings, plan)["step"], R.resume_source(listings, plan)["mode"]) == (8, "exact")
    del listings["h1"]["layouts"]["8"]
    assert R.resume_source(listings, plan)["mode"] == "none"


# --- launcher=slurm: one batch script from the plan ---------------------------------------------------------------

def test_slurm_plan_submits_on_the_master_and_every_node_step_runs_what_the_ansible_launcher_runs_there(tmp_path):
    """launcher=slurm: no host starts ranks itself (commands.start is null); the master submits job.sbatch and
    cancels it by name; every host is watched, its status asking SLURM about the job; each node's step is the
    supervisor in the foreground around exactly the node process the ansible launcher starts there."""
    import shlex
    import subprocess

    from dsfleet_core import render
    hosts = [host(n, 11 + i, [A100(0), A100(1)], hostname="node-" + n) for i, n in enumerate("abc")]
    hosts[2]["slurm_node"] = "gpu07"
    for strategy in ("deepspeed", "fsdp"):
        plan = make_plan(hosts, {"launcher": "slurm", "strategy": strategy, "max_steps": 10})
        ansible = make_plan(hosts, {"strategy": strategy, "max_steps": 10})
        assert plan["slurm"]["job_name"] == "dsfleet-r" and plan["slurm"]["nodes"] == ["node-a", "node-b", "gpu07"]
        assert plan["slurm"]["components"] == [{"nodes": ["node-a", "node-b", "gpu07"], "tasks_per_node": 2,
                                                "gres": "gpu:2"}]
        for h, other in zip(plan["hosts"], ansible["hosts"]):
            assert h["commands"]["start"] is None and h["watched"] and h["process"] is None
            assert h["node_process"] == other["node_process"]
            step = h["slurm_step"]["argv"]
            assert step[step.index("--") + 1:] == other["process"]["argv"]
            assert step[:step.index("--")] == other["commands"]["start"]["argv"][:step.index("--") - 1] + [
                "--foreground"]
            assert h["slurm_step"]["env"] == other["process"]["env"]
            assert h["commands"]["status"]["argv"][-2:] == ["--slurm-job", "dsfleet-r"]
            assert (h["commands"]["submit"] is not None) == (h["node_rank"] == 0)
        assert plan["hosts"][0]["commands"]["submit"]["argv"] == ["sbatch", "--parsable",
                                                                 "/home/u/.dsfleet/runs/r/job.sbatch"]
        assert plan["hosts"][0]["commands"]["cancel"]["argv"] == ["scancel", "--me", "--name", "dsfleet-r"]
        text = render.sbatch_script(plan, "QUJD" * 60)
        sbatch = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
        assert sbatch[:8] == ["#SBATCH --nodes=3", "#SBATCH --nodelist=node-a,node-b,gpu07",
                              "#SBATCH --ntasks-per-node=2", "#SBATCH --exclusive", "#SBATCH --gres=gpu:2",
                              "#SBATCH --job-name=dsfleet-r", "#SBATCH --output=/home/u/.dsfleet/slurm-r-%j.out",
                              "#SBATCH --chdir=/home/u/.dsfleet"]
        for h in plan["hosts"]:
            part = text.split("    %s)  # node rank %d" % (h["slurm_node"], h["node_rank"]))[1].split(";;")[0]
            assert "      exec " + " ".join(shlex.quote(a) for a in h["slurm_step"]["argv"]) in part
            assert ["export %s=%s" % (k, shlex.quote(str(v))) for k, v in sorted(h["slurm_step"]["env"].items())] \
                == [ln.strip() for ln in part.splitlines() if ln.strip().startswith("export ")]
        assert "srun --nodes=3 --ntasks=3 --ntasks-per-node=1 --kill-on-bad-exit=1" in text
        assert "planned='gpu07 node-a node-b'" in text and "MASTER_ADDR=10.1.0.11 MASTER_PORT=29500" in text
        path = tmp_path / "job.sbatch"
        path.write_text(text)
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        # a node's part where there is no venv: it names the fix and starts nothing
        ran = subprocess.run(["bash", str(path), "--dsfleet-node"], capture_output=True, text=True,
                             env={"SLURMD_NODENAME": "gpu07", "PATH": "/usr/bin:/bin"})
        assert ran.returncode == 2 and "job.sbatch on gpu07: no dsfleet python environment at " \
            "/home/u/.dsfleet/venv; run setup.yml" in ran.stderr
        ran = subprocess.run(["bash", str(path), "--dsfleet-node"], capture_output=True, text=True,
                             env={"SLURMD_NODENAME": "gpu99", "PATH": "/usr/bin:/bin"})
        assert ran.returncode == 2 and "node gpu99 is not in the plan (node-a node-b gpu07)" in ran.stderr
        ran = subprocess.run(["bash", str(path)], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
        assert ran.returncode != 0 and "SLURM_JOB_NODELIST: run with sbatch" in ran.stderr
    assert ("slurm: job dsfleet-r on node(s) node-a,node-b,gpu07, whole nodes, 2 task(s) a node, --gres=gpu:2; each "
            "node's launcher is its one step task; submitted on a") in R.plan_table(plan)


def test_slurm_plan_options_heterogeneous_nodes_and_what_it_refuses():
    plan = make_plan([host("a", 11, [A100(0), A100(1)]), host("v", 12, [V100(0)])],
                     {"launcher": "slurm", "slurm_time": "1-00:00:00", "slurm_partition": "gpu",
                      "slurm_options": ["--qos=high", "--mail-type=END"], "checkpoint_grace": 600})
    assert plan["slurm"]["components"] == [{"nodes": ["a"], "tasks_per_node": 2, "gres": "gpu:2"},
                                           {"nodes": ["v"], "tasks_per_node": 1, "gres": "gpu:1"}]
    assert plan["slurm"]["options"] == ["--partition=gpu", "--time=1-00:00:00", "--signal=TERM@600", "--qos=high",
                                        "--mail-type=END"]
    from dsfleet_core import render
    text = render.sbatch_script(plan, "QUJD")
    assert "#SBATCH --nodelist=a\n#SBATCH --ntasks-per-node=2\n#SBATCH --exclusive\n#SBATCH --gres=gpu:2\n" in text
    assert "#SBATCH hetjob\n#SBATCH --nodes=1\n#SBATCH --nodelist=v\n#SBATCH --ntasks-per-node=1\n" \
        "#SBATCH --exclusive\n#SBATCH --gres=gpu:1\n" in text
    srun = [ln for ln in text.splitlines() if ln.startswith("srun ")]
    assert srun == ['srun --het-group=0 --nodes=1 --ntasks=1 --ntasks-per-node=1 --kill-on-bad-exit=1 '
                    '--bcast=/tmp/dsfleet-r-"$SLURM_JOB_ID".sbatch "$0" --dsfleet-node : --het-group=1 --nodes=1 '
                    '--ntasks=1 --ntasks-per-node=1 --kill-on-bad-exit=1 --bcast=/tmp/dsfleet-r-"$SLURM_JOB_ID".sbatch '
                    '"$0" --dsfleet-node']
    cpu = make_plan([host("c1", 11), host("c2", 12)], {"launcher": "slurm", "slurm_submit": False})
    assert cpu["dry_run"] and cpu["slurm"]["components"] == [{"nodes": ["c1", "c2"], "tasks_per_node": 2,
                                                              "gres": None}]
    # CPU hosts with different slots: tasks per node differ, so one component each kind of node
    uneven = make_plan([host("c1", 11, slots=1), host("c2", 12), host("c3", 13)], {"launcher": "slurm"})
    assert ("slurm: job dsfleet-r on node(s) c1,c2,c3, whole nodes, a heterogeneous job (c1: 1 task(s) a node; "
            "c2,c3: 2 task(s) a node); each node's launcher is its one step task; submitted on c1") \
        in R.plan_table(uneven)
    assert uneven["slurm"]["components"] == [{"nodes": ["c1"], "tasks_per_node": 1, "gres": None},
                                             {"nodes": ["c2", "c3"], "tasks_per_node": 2, "gres": None}]
    assert "--gres" not in render.sbatch_script(cpu, "QUJD")
    assert any("not submitted (slurm_submit=false)" in line for line in R.plan_table(cpu))
    two = [host("a", 11, [A100(0)]), host("b", 12, [A100(0)])]
    bad = [({"slurm_time": "tomorrow"}, "slurm_time=tomorrow is not a SLURM time limit"),
           ({"slurm_options": ["--qos high"]}, "is not one `--name` or `--name=value` sbatch option"),
           ({"slurm_options": ["--nodelist=x"]}, "--nodelist is dsfleet's to set from the plan"),
           ({"slurm_options": ["--time=5"]}, "--time is dsfleet's to set from the plan; use -e slurm_time=..."),
           ({"slurm_partition": "gpu;rm"}, "slurm_partition=gpu;rm: letters, digits")]
    for knobs, message in bad:
        with pytest.raises(PlanError, match=message.replace("(", r"\(").replace("?", r"\?").replace(".", r"\.")):
            make_plan(two, dict({"launcher": "slurm"}, **knobs))
    with pytest.raises(PlanError, match="slurm_partition, slurm_time apply to launcher=slurm \\(this run's launcher "
                       "is ansible\\): add -e launcher=slurm, or drop slurm_partition and slurm_time"):
        make_plan(two, {"slurm_partition": "gpu", "slurm_time": "10:00"})
    with pytest.raises(PlanError, match="hosts a and b are both SLURM node n1; set slurm_node"):
        make_plan([host("a", 11, [A100(0)], hostname="n1"), host("b", 12, [A100(0)], hostname="n1")],
                  {"launcher": "slurm"})
    with pytest.raises(PlanError, match="launcher=slurm runs one batch script on every host, but the dsfleet paths"):
        make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)], home="/x", venv="/x/venv")],
                  {"launcher": "slurm"})


def test_status_and_progress_of_a_queued_slurm_run():
    plan = make_plan([host("a", 11, [A100(0)]), host("b", 12, [A100(0)])], {"launcher": "slurm"})
    queued = {"dsfleet_status": 1, "state": "queued", "rc": None, "reason": None, "progress": None,
              "ranks_alive": 0, "slurm": {"id": 5, "state": "PENDING", "reason": "Priority"}}
    statuses = {"a": dict(queued, report=True), "b": dict(queued)}
    assert R.progress(plan, statuses) == {"state": "running", "host": "", "reason": "", "log_tail": "",
                                          "line": "queued: SLURM job 5 PENDING (Priority)"}
    lines = R.status_table(plan, statuses)
    assert lines[1].split()[:3] == ["a", "queued", "0/1"] and lines[-1] == "run r: queued: SLURM job 5 PENDING (Priority)"
    assert R.stop_report(plan, {"a": {"terminated": []}, "b": {"terminated": []}}, {"a": [], "b": []})[:2] == [
        "run r: stopped on no host (nothing of the run was running)",
        "the SLURM job dsfleet-r is cancelled too, whether queued or running (scancel --me --name dsfleet-r)"]
    # the job was cancelled before b's step started: b is blamed with the job's state
    statuses["b"] = dict(queued, state="exited", rc=143, ended_at=10.0,
                         reason="SLURM job 5 CANCELLED before this host's ranks started")
    judged = R.progress(plan, statuses)
    assert (judged["state"], judged["host"], judged["reason"]) == (
        "failed", "b", "SLURM job 5 CANCELLED before this host's ranks started")
