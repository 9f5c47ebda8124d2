#!/usr/bin/env python3
"""A corpus several times larger than the memory the job may use trains: the token cache streams it.

    sudo .venv/bin/python bench/big_corpus.py [--corpus-mib 3072] [--cap-mib 1024] [--steps 20]

Writes a synthetic corpus (seeded random sentences over a small word list: license-clean, paragraphs separated by
blank lines) of --corpus-mib MiB, then runs, each in its own cgroup (v1 memory controller: memory.limit_in_bytes =
--cap-mib, swap off here) on this machine:

1. the training module itself (train/train.py, the tiny preset, one rank: ``python train.py`` is a world of one)
   for --steps steps with a fresh token cache: it must finish, and the cgroup's peak usage is recorded;
2. for contrast, what the module did before the token cache: read the whole corpus, tokenize it into Python lists
   and pack it (train.py's load_blocks), which the cap kills.

Results: bench/results/big_corpus.json and the README's Benchmarks section.
"""

import argparse
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("DSFLEET_TRAIN_PYTHON", str(pathlib.Path.home() / ".dsfleet" / "venv" / "bin" / "python"))
CGROUP = pathlib.Path("/sys/fs/cgroup/memory")
WORDS = ("the river runs past old stone walls and green fields while birds call over quiet water in the "
         "morning light a farmer walks slowly to the market with bread cheese apples and a small dog that "
         "barks at every cart rolling by on the long dusty road toward the town square").split()
OLD_PATH = r"""
import sys
sys.path.insert(0, sys.argv[1])
import argparse, train as T
kind, where = T.resolve_model("tiny")
_, tok = T.load_config_and_tokenizer(kind, where)
_, blocks = T.load_blocks(argparse.Namespace(dataset=sys.argv[2], text_field="text", block_size=128), tok)
print(len(blocks))
"""


def write_corpus(path, mib, seed=0):
    rng = random.Random(seed)
    target = mib << 20
    with open(path, "w") as f:
        size = 0
        while size < target:
            para = " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                            for _ in range(rng.randint(2, 6)))
            f.write(para + "\n\n")
            size += len(para) + 2


def in_cgroup(name, cap_mib, argv, env, timeout):
    """Run argv in a fresh memory cgroup capped at cap_mib; (returncode, peak MiB, seconds, oom kills, output)."""
    group = CGROUP / name
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap_mib << 20))
        try:
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap_mib << 20))
        except OSError:
            pass  # no swap accounting: this machine has no swap either way
        start = time.time()
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        seconds = time.time() - start
        peak = int((group / "memory.max_usage_in_bytes").read_text()) >> 20
        oom = (group / "memory.oom_control").read_text()
        kills = int(next((line.split()[1] for line in oom.splitlines() if line.startswith("oom_kill ")), "0"))
        return proc.returncode, peak, round(seconds, 1), kills, output
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mib", type=int, default=3072)
    parser.add_argument("--cap-mib", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0 or not CGROUP.is_dir():
        sys.exit("needs root and the cgroup v1 memory controller at %s" % CGROUP)
    work = pathlib.Path(tempfile.mkdtemp(prefix="dsfleet-bigcorpus-"))
    try:
        corpus = work / "corpus.txt"
        t = time.time()
        write_corpus(corpus, args.corpus_mib)
        written = round(time.time() - t, 1)
        config = work / "ds_config.json"
        config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                      "zero_optimization": {"stage": 0}, "steps_per_print": 1000}))
        # as a user's run has it: the tokenizer's own threads on (TOKENIZERS_PARALLELISM unset), every core
        env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
        env.update(OMP_NUM_THREADS=str(os.cpu_count() or 1), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   MASTER_PORT=str(29700 + os.getpid() % 200))
        out = work / "out"
        rc, peak, seconds, kills, output = in_cgroup(
            "dsfleet-bench-%d-new" % os.getpid(), args.cap_mib,
            [PYTHON, str(ROOT / "train" / "train.py"), "--deepspeed_config", str(config), "--output_dir", str(out),
             "--dataset", str(corpus), "--max_steps", str(args.steps), "--log_every", "5", "--save_every_minutes",
             "0", "--token_cache", str(work / "cache")], env, timeout=3600)
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").exists() else []
        start = next((e for e in events if e["event"] == "start"), {})
        end = next((e for e in events if e["event"] == "end"), {})
        new = {"returncode": rc, "cgroup_peak_mib": peak, "seconds": seconds, "oom_kills": kills,
               "steps": end.get("steps"), "final_loss": end.get("final_loss"),
               "peak_rss_mib": end.get("peak_rss_mib"), "token_cache": start.get("token_cache"),
               "tail": output.splitlines()[-5:]}
        rc, peak, seconds, kills, output = in_cgroup(
            "dsfleet-bench-%d-old" % os.getpid(), args.cap_mib,
            [PYTHON, "-c", OLD_PATH, str(ROOT / "train"), str(corpus)], env, timeout=3600)
        old = {"returncode": rc, "cgroup_peak_mib": peak, "seconds": seconds, "oom_kills": kills,
               "tail": output.splitlines()[-3:]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"corpus_mib": args.corpus_mib, "cap_mib": args.cap_mib, "corpus_written_s": written,
              "token_cache_run": new, "in_memory_lists": old, "machine": "%d cores" % os.cpu_count(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "big_corpus.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if new["returncode"] == 0 and new["steps"] == args.steps else 1


if __name__ == "__main__":
    sys.exit(main())
