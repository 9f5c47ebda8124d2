#!/usr/bin/env python3
"""Peak memory per rank of a 0.5B model on 2 CPU ranks: the whole model on every rank (ZeRO-2) against ZeRO-3 built
under deepspeed.zero.Init, each beside the plan's prediction.

    .venv/bin/python bench/load_memory.py [--steps 2] [--micro-batch 1]

The model is Qwen2-0.5B's published architecture (the values of Qwen/Qwen2-0.5B's config.json: hidden 896, 24
layers, 14 heads, 2 KV heads, intermediate 4864, vocabulary 151936, tied embeddings: 494,032,768 parameters) with
random weights, saved locally once (safetensors, fp32) with the bundled tiny preset's tokenizer, so the training
module takes the from_pretrained path a user's model takes. For each ZeRO stage the plan (lib/dsfleet_core/plan.py,
this machine as a CPU host with 2 ranks) renders the ds_config and predicts the MiB per rank; the real training
module then runs under DeepSpeed's launcher on 2 CPU ranks (fp32: this CPU has no bf16) and the bench reads each
rank's peak resident memory (VmHWM in /proc/<pid>/status) once rank 0 has logged --steps optimizer steps, and the
peak right after the model was built (rank 0's load_peak_rss_mib in metrics.jsonl), then stops the ranks (no
multi-GB checkpoint or export is written). Results: bench/results/load_memory.json.
"""

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
from dsfleet_core import plan as P  # noqa: E402

PYTHON = os.environ.get("DSFLEET_TRAIN_PYTHON", str(pathlib.Path.home() / ".dsfleet" / "venv" / "bin" / "python"))
QWEN2_0_5B = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
              "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151643}
BUILD = r"""
import json, shutil, sys, torch, transformers as T
cfg = T.AutoConfig.for_model(**json.loads(sys.argv[2]))
torch.manual_seed(0)
model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
model.save_pretrained(sys.argv[1])
for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    src = sys.argv[3] + "/" + name
    try:
        shutil.copy(src, sys.argv[1])
    except FileNotFoundError:
        pass
print(json.dumps({"params": model.num_parameters()}))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meminfo_mib():
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) // 1024


def vm_mib(pid, field="VmHWM"):
    """VmHWM (peak resident) or VmRSS (resident now) of a process, MiB; None once it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            return int(next(line for line in f if line.startswith(field)).split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def rank_pids(out_dir):
    """PIDs of the training ranks of this run (not DeepSpeed's launcher, whose command line names the script too)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = pathlib.Path("/proc/%s/cmdline" % entry).read_bytes().split(b"\0")
            except OSError:
                continue
            if (any(c.endswith(b"train.py") for c in cmd) and str(out_dir).encode() in cmd
                    and any(c.startswith(b"--local_rank") for c in cmd)
                    and not any(b"deepspeed.launcher" in c for c in cmd)):
                pids.append(int(entry))
    return pids


def tidy_shm():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dsfleet_node", ROOT / "roles" / "launch" / "files" / "dsfleet_node.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)
    node.tidy()


def record():
    """This machine as the plan role would record it: a CPU host, its cores and memory."""
    return {"name": "localhost", "address": "localhost", "reachable": True, "local": True, "home": "/h",
            "venv": "/h/v", "interfaces": [{"name": "lo", "ipv4": ["127.0.0.1/8"]}],
            "gpu": {"accelerator": "cpu", "gpus": [],
                    "cpu": {"cores": os.cpu_count(), "memory_mib": meminfo_mib(), "bf16": False}}}


BUCKET_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
               "stage3_param_persistence_threshold")


def run(stage, model_dir, work, steps, micro, variant="plan"):
    """One measured run. ``variant``: "plan", the ds_config as the plan renders it; "defaults", the same without
    the model-scaled buckets and the fused AdamW (DeepSpeed's default buckets, torch's default Adam path: what
    dsfleet rendered before)."""
    plan = P.make_plan([record()], {"run_id": "bench", "zero_stage": stage, "offload": "none", "cpu_ranks": 2,
                                    "precision": "fp32", "micro_batch": micro}, None, dict(QWEN2_0_5B))
    config = json.loads(json.dumps(plan["ds_config"]))
    if variant == "defaults":
        for key in BUCKET_KEYS:
            config["zero_optimization"].pop(key, None)
        config["optimizer"]["params"].pop("fused", None)
    name = "zero%d-%s" % (stage, variant)
    ds_config = work / ("ds-%s.json" % name)
    ds_config.write_text(json.dumps(config))
    out = work / ("run-%s" % name)
    cmd = [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(ROOT / "train" / "train.py"), "--deepspeed_config", str(ds_config), "--output_dir", str(out),
           "--model", str(model_dir), "--dataset", "bundled", "--max_steps", "1000", "--block_size", "128",
           "--log_every", "1", "--save_every_minutes", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    log = open(work / ("%s.log" % name), "w")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    peaks, metrics, pids, resident = {}, out / "metrics.jsonl", set(), []
    try:
        while proc.poll() is None and time.time() - start < 3600:
            for pid in rank_pids(out):
                pids.add(pid)
                value = vm_mib(pid)
                if value:
                    peaks[pid] = max(peaks.get(pid, 0), value)
            events = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
            done = sum(1 for e in events if e["event"] == "step")
            if done > len(resident):  # resident memory of each rank as each step is logged: does it grow?
                resident.append(sorted(round(vm_mib(pid, "VmRSS") or 0) for pid in pids))
            if done >= steps:
                break
            time.sleep(0.5)
        else:
            log.flush()
            tail = pathlib.Path(log.name).read_text(errors="replace").splitlines()[-40:]
            sys.exit("ZeRO-%d run ended or timed out before %d steps:\n%s" % (stage, steps, "\n".join(tail)))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        deadline = time.time() + 60
        while any(vm_mib(pid) is not None for pid in pids) and time.time() < deadline:
            time.sleep(0.2)  # the ranks' segments stay mapped until they are gone
        tidy_shm()  # ranks killed here, not under dsfleet's supervisor: their /dev/shm segments are ours to remove
    first = events[0]
    s = plan["sizing"]
    return {"zero_stage": stage, "variant": variant, "micro_batch": micro, "steps": steps, "params": first["params"],
            "params_here_rank0": first["params_here"], "load_peak_rss_mib_rank0": first["load_peak_rss_mib"],
            "peak_rss_mib_per_rank": sorted(round(v) for v in peaks.values()),
            "rss_mib_per_rank_after_each_step": resident,
            "predicted_mib_per_rank": s["device_mib"], "predicted": {k: s[k] for k in (
                "model_states_mib", "activations_mib", "buffers_mib", "runtime_mib", "host_mib")},
            "ds_config_zero": config["zero_optimization"], "optimizer": config["optimizer"],
            "seconds": round(time.time() - start, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--runs", default="2:plan,2:defaults,3:plan",
                        help="stage:variant pairs to measure (variant: plan or defaults), e.g. 3:plan")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="dsfleet-loadmem-"))
    try:
        model_dir = work / "qwen2-0.5b-random"
        built = subprocess.run([PYTHON, "-c", BUILD, str(model_dir), json.dumps(QWEN2_0_5B),
                                str(ROOT / "train" / "presets" / "tiny")], capture_output=True, text=True)
        if built.returncode != 0:
            sys.exit(built.stderr[-3000:])
        rows = [run(int(item.split(":")[0]), model_dir, work, args.steps, args.micro_batch, item.split(":")[1])
                for item in args.runs.split(",")]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"model": "Qwen2-0.5B architecture, random weights, fp32", "ranks": 2, "machine_mib": meminfo_mib(),
              "cpus": os.cpu_count(), "rows": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "load_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print("stage  ds_config  params       rank0 holds   load peak   peak RSS per rank   predicted/rank")
    for r in rows:
        print("ZeRO-%d %-10s %-12s %-13s %-11s %-19s %s" % (
            r["zero_stage"], r["variant"], "{:,}".format(r["params"]), "{:,}".format(r["params_here_rank0"]),
            "%d MiB" % r["load_peak_rss_mib_rank0"], ", ".join("%d" % v for v in r["peak_rss_mib_per_rank"]) + " MiB",
            "%d MiB" % r["predicted_mib_per_rank"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
