#!/usr/bin/env python3
"""Training speed: dsfleet's training module under the plan's ds_config, against HF Trainer + DeepSpeed with the
reference config the guides ship, and against a minimal DeepSpeed loop with dsfleet's identical ds_config.

    .venv/bin/python bench/vs_trainer.py [--rounds 3] [--steps 40] [--warmup 8] [--ranks 2]

One run measures every arm side by side, interleaved (round 1: each arm once, round 2: each arm again, ...), on
this machine, the same model, data, ranks and precision:

  model     a Llama of 26M parameters (hidden 512, 8 layers, 8 heads, intermediate 1376, the bundled tiny preset's
            tokenizer, vocabulary 1024), random weights, saved once as a local model directory (safetensors)
  data      a seeded synthetic corpus (bench/big_corpus.py's word list), packed into blocks of 128 tokens by the
            training module's token cache; every arm reads the same blocks
  ranks     --ranks CPU ranks under DeepSpeed's launcher (gloo), OMP_NUM_THREADS = cores / ranks, bf16

  dsfleet   train/train.py with the ds_config the plan (lib/dsfleet_core/plan.py) renders for this machine as a
            CPU host, every default left as it is (micro batch, optimizer, buckets) -- what `launch.yml` runs
  hf        transformers' Trainer, DeepSpeed through TrainingArguments(deepspeed=...) with
            shared/reference/ds_config_zero2_offload.json (ZeRO-2, overlap_comm, 5e8 buckets, optimizer offloaded
            to the CPU with pinned memory, "auto" batch fields), per_device_train_batch_size 4, bf16, the same lr
  minimal   deepspeed.initialize, then forward, backward, step and nothing else (no logging, no checkpoint, no
            all-reduce of the loss), with the ds_config of the dsfleet arm, the same model init and batch order

Each arm's rank 0 stamps the wall time at the end of every optimizer step; tokens/s is (steps after --warmup) x
tokens per step / the time they took. The losses per step of dsfleet and the minimal loop are compared too (the
same model, data order and config: they must agree within float noise). Results: bench/results/vs_trainer.json.
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
from dsfleet_core import plan as P  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from load_memory import BUILD, free_port, meminfo_mib  # noqa: E402  (BUILD: a random-weight model dir)

PYTHON = os.environ.get("DSFLEET_TRAIN_PYTHON", str(pathlib.Path.home() / ".dsfleet" / "venv" / "bin" / "python"))
REFERENCE = ROOT.parent / "shared" / "reference" / "ds_config_zero2_offload.json"
LLAMA_26M = {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 8, "intermediate_size": 1376, "vocab_size": 1024, "max_position_embeddings": 256,
             "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
             "eos_token_id": 2, "pad_token_id": 0}
WORDS = ("the river runs past old stone walls and green fields while birds call over quiet water in the "
         "morning light a farmer walks slowly to the market with bread cheese apples and a small dog that "
         "barks at every cart rolling by on the long dusty road toward the town square").split()
BLOCK, LR, SEED, WARMUP_STEPS = 128, 3e-4, 1234, 0


# The pieces every arm shares, from the training module itself: model build (seeded), the token cache's blocks,
# the rank's shard and the batch order. Run under DeepSpeed's launcher: RANK, WORLD_SIZE, LOCAL_RANK are set.
COMMON = r"""
import argparse, json, os, sys, time
sys.path.insert(0, os.environ["DSFLEET_TRAIN_DIR"])
import train as T
A = json.loads(os.environ["BENCH_ARGS"])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
kind, where = T.resolve_model(A["model"])
config, tokenizer = T.load_config_and_tokenizer(kind, where)
targs = T.validate_args(T.parse_args(["--deepspeed_config", "x", "--output_dir", "x", "--model", A["model"],
                                      "--dataset", A["dataset"], "--block_size", str(A["block"]),
                                      "--token_cache", A["cache"], "--max_steps", "1"]))
data, _, _ = T.load_data(targs, tokenizer, kind, where, config.vocab_size)
mine = T.shard(range(data.n), rank, world)
"""

MINIMAL = COMMON + r"""
import deepspeed, torch
ds_config, s = T.read_ds_config(A["ds_config"])
ds_config = T.fill_auto(ds_config, world_size=world, lr=A["lr"], warmup_steps=A["warmup_steps"],
                        total_steps=A["steps"])
deepspeed.init_distributed()
model, _ = T.build_model(kind, where, config, A["seed"], s["precision"], ds_config)
# the module's own schedule (linear warmup, linear decay to 10%): without a scheduler section the module builds
# this LambdaLR, so the minimal loop does too -- the only piece of the module's loop it keeps
schedule = None if s["has_scheduler"] else (lambda opt: torch.optim.lr_scheduler.LambdaLR(
    opt, T.lr_lambda(A["warmup_steps"], A["steps"])))
engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, lr_scheduler=schedule,
                                       model_parameters=T.param_groups(model, s["weight_decay"]))
mb, per_epoch = s["micro_batch"], len(mine) // s["micro_batch"]
orders, stamps, losses = {}, [], []
engine.train()
for step in range(A["steps"]):
    for i in range(s["grad_accum"]):
        epoch, k = divmod(step * s["grad_accum"] + i, per_epoch)
        order = orders.setdefault(epoch, T.epoch_order(len(mine), A["seed"], epoch))
        x, y, _ = data.batch([mine[j] for j in order[k * mb:(k + 1) * mb]])
        loss = engine(input_ids=x, labels=y).loss
        engine.backward(loss)
        engine.step()
    losses.append(loss.item())
    stamps.append(time.time())
json.dump({"stamps": stamps, "losses": losses, "tokens_per_step": mb * s["grad_accum"] * world * A["block"]},
          open(A["out"] + ".rank%d.json" % rank, "w"))
"""

HF = COMMON + r"""
import torch, transformers as TR
class Blocks(torch.utils.data.Dataset):
    def __len__(self):
        return data.n
    def __getitem__(self, i):
        x, y, _ = data.batch([i])
        return {"input_ids": x[0], "labels": y[0]}
stamps = []
class Stamp(TR.TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        stamps.append(time.time())
torch.manual_seed(A["seed"])
model = TR.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32)
args = TR.TrainingArguments(output_dir=A["out"] + ".hf", per_device_train_batch_size=A["micro"], max_steps=A["steps"],
                            learning_rate=A["lr"], bf16=True, deepspeed=A["reference"], logging_steps=10**9,
                            save_strategy="no", report_to=[], dataloader_num_workers=0, seed=A["seed"],
                            use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
trainer = TR.Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Stamp()])
trainer.train()
json.dump({"stamps": stamps, "tokens_per_step": A["micro"] * world * A["block"]}, open(A["out"] + ".rank%d.json" % rank, "w"))
"""


def record(bf16=True):
    """This machine as the plan role records it: a CPU host, its cores and memory."""
    return {"name": "localhost", "address": "localhost", "reachable": True, "local": True, "home": "/h",
            "venv": "/h/v", "interfaces": [{"name": "lo", "ipv4": ["127.0.0.1/8"]}],
            "gpu": {"accelerator": "cpu", "gpus": [],
                    "cpu": {"cores": os.cpu_count(), "memory_mib": meminfo_mib(), "bf16": bf16}}}


def write_corpus(path, mib, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        size = 0
        while size < mib << 20:
            para = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                            for _ in range(rng.randint(2, 6)))
            f.write(para + "\n\n")
            size += len(para) + 2


def tidy_shm():
    """DeepSpeed's CPU all-reduce segments of ranks that ended under this bench (no dsfleet supervisor here)."""
    for p in pathlib.Path("/dev/shm").glob("deepspeed_*"):
        try:
            p.unlink()
        except OSError:
            pass


def launch(name, argv, env, work, timeout=1800):
    cmd = [PYTHON, "-m", "deepspeed.launcher.runner", "--num_gpus", str(env["BENCH_RANKS"]), "--master_port",
           str(free_port())] + argv
    log = work / ("%s.log" % name)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    tidy_shm()
    if rc != 0:
        sys.exit("%s failed (rc %s):\n%s" % (name, rc, "\n".join(log.read_text(errors="replace").splitlines()[-30:])))
    return time.time() - start


def merge(base, extra):
    """base with extra merged in, dict by dict (None removes a key)."""
    for key, value in extra.items():
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def rate(stamps, tokens_per_step, warmup):
    span = stamps[-1] - stamps[warmup - 1]
    return (len(stamps) - warmup) * tokens_per_step / span


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--arms", default="dsfleet,hf,minimal")
    parser.add_argument("--corpus-mib", type=int, default=4)
    parser.add_argument("--override", default="{}", help="JSON merged into the plan's ds_config (dsfleet and "
                        "minimal arms), to measure one setting against the plan's choice")
    parser.add_argument("--knobs", default="{}", help="JSON of launch.yml knobs for the plan (e.g. micro_batch)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    work = pathlib.Path(tempfile.mkdtemp(prefix="dsfleet-vs-trainer-"))
    try:
        model = work / "llama-26m"
        built = subprocess.run([PYTHON, "-c", BUILD, str(model), json.dumps(LLAMA_26M),
                                str(ROOT / "train" / "presets" / "tiny")], capture_output=True, text=True, check=True)
        params = json.loads(built.stdout.strip().splitlines()[-1])["params"]
        corpus = work / "corpus.txt"
        write_corpus(corpus, args.corpus_mib)
        plan = P.make_plan([record()], {"run_id": "bench", "cpu_ranks": args.ranks, "precision": "bf16",
                                        "max_steps": args.steps, **json.loads(args.knobs)}, None, dict(LLAMA_26M))
        config = merge(json.loads(json.dumps(plan["ds_config"])), json.loads(args.override))
        ds_config = work / "ds_config.json"
        ds_config.write_text(json.dumps(config))
        micro = config["train_micro_batch_size_per_gpu"]
        threads = max(1, (os.cpu_count() or 1) // args.ranks)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DSFLEET_TRAIN_DIR=str(ROOT / "train"),
                   BENCH_RANKS=str(args.ranks))
        cache = work / "cache"
        results = {a: [] for a in arms}
        for r in range(args.rounds):
            for arm in arms:
                out = work / ("%s-%d" % (arm, r))
                if arm == "dsfleet":
                    seconds = launch(out.name, [str(ROOT / "train" / "train.py"), "--deepspeed_config", str(ds_config),
                                                "--output_dir", str(out), "--model", str(model), "--dataset",
                                                str(corpus), "--block_size", str(BLOCK), "--max_steps",
                                                str(args.steps), "--lr", repr(LR), "--seed", str(SEED),
                                                "--warmup_steps", str(WARMUP_STEPS),
                                                "--save_every_minutes", "0", "--token_cache", str(cache)], env, work)
                    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    steps = [e for e in events if e["event"] == "step"]
                    start = next(e for e in events if e["event"] == "start")
                    tokens = start["micro_batch"] * start["grad_accum"] * start["world_size"] * start["block_size"]
                    run = {"tokens_per_s": rate([e["time"] for e in steps], tokens, args.warmup),
                           "losses": [e["loss"] for e in steps], "seconds": round(seconds, 1)}
                else:
                    script = work / ("%s.py" % arm)
                    script.write_text(MINIMAL if arm == "minimal" else HF)
                    benv = dict(env, BENCH_ARGS=json.dumps({
                        "model": str(model), "dataset": str(corpus), "block": BLOCK, "cache": str(cache),
                        "ds_config": str(ds_config), "reference": str(REFERENCE), "steps": args.steps, "lr": LR,
                        "seed": SEED, "micro": 4, "out": str(out), "warmup_steps": WARMUP_STEPS}))
                    seconds = launch(out.name, [str(script)], benv, work)
                    ranks = [json.loads(pathlib.Path("%s.rank%d.json" % (out, i)).read_text())
                             for i in range(args.ranks)]
                    run = {"tokens_per_s": rate(ranks[0]["stamps"], ranks[0]["tokens_per_step"], args.warmup),
                           "seconds": round(seconds, 1)}
                    if arm == "minimal":  # the mean over ranks, as dsfleet logs it
                        run["losses"] = [sum(v) / len(v) for v in zip(*(x["losses"] for x in ranks), strict=True)]
                results[arm].append(run)
                print("round %d %-8s %8.0f tokens/s  (%.0f s)" % (r + 1, arm, run["tokens_per_s"], run["seconds"]),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {a: statistics.median(x["tokens_per_s"] for x in results[a]) for a in arms}
    summary = {"params": params, "ranks": args.ranks, "threads_per_rank": threads, "steps": args.steps,
               "warmup": args.warmup, "rounds": args.rounds, "block": BLOCK, "dsfleet_micro_batch": micro,
               "hf_micro_batch": 4, "dsfleet_ds_config": config, "override": json.loads(args.override),
               "knobs": json.loads(args.knobs),
               "median_tokens_per_s": {a: round(v) for a, v in median.items()},
               "runs": {a: [{k: v for k, v in x.items() if k != "losses"} for x in results[a]] for a in arms},
               "machine": "%d cores" % os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "hf" in median and "dsfleet" in median:
        summary["dsfleet_over_hf"] = round(median["dsfleet"] / median["hf"], 3)
    if "minimal" in median and "dsfleet" in median:
        summary["dsfleet_over_minimal"] = round(median["dsfleet"] / median["minimal"], 3)
        a, b = results["dsfleet"][0]["losses"], results["minimal"][0]["losses"]
        summary["loss_max_abs_diff_dsfleet_vs_minimal"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "vs_trainer.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "dsfleet_ds_config")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
