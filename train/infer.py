"""
Generate text with a Hugging Face causal language model through DeepSpeed inference: the dsfleet inference entry.

playbooks/infer.yml runs one DeepSpeed world per replica: tp_size ranks on one host, tensor parallel across its
devices; the replicas (several per host, on every host) split the prompts. By hand, replica 1 of 2:

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port 29510 train/infer.py --model DIR \\
        --ds_config ds_inference_config.json --prompts prompts.jsonl --output_dir out --replica 1 --replicas 2

--ds_config is DeepSpeed's inference config (deepspeed.init_inference's config): {"dtype": "bf16",
"tensor_parallel": {"tp_size": 2}, "replace_with_kernel_inject": false}; the world must have tp_size ranks.
Automatic tensor parallelism (AutoTP) shards the model across them; tp_size 1 runs the plain module. The
replica takes every --replicas-th prompt from --replica on.

--prompts is JSON lines: {"index": 0, "prompt": "text"} or {"index": 0, "messages": [{"role": "user", ...}]};
with a chat template in the tokenizer (--chat auto/on) a prompt is sent as one user message, messages always
need the template. Greedy when --temperature is 0, else sampling with --temperature/--top_p, seeded per batch
from --seed and the batch's first prompt index, so a prompt's output does not depend on how prompts were split.

Outputs in --output_dir, written by rank 0 of the replica, one line per prompt, flushed per batch:
    generations-<replica>.jsonl   {"index", "prompt", "output", "tokens", "prompt_tokens", "seconds", "replica"}
    done-<replica>.json           {"replica", "prompts", "tokens", "seconds", "load_seconds", "tp_size", "dtype",
                                   "params_per_rank" (what this rank holds after AutoTP sharded the model)}

Check the inputs without torch (no weights loaded): --preflight prints {"ok": true, ...} and exits 0.
Bad input exits 2 with one line on stderr: "dsfleet-infer: error: <what is wrong>. <how to fix>".
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from dsfleet_modelinfo import model_info  # noqa: E402

from dsfleet_config import UsageError, fail  # noqa: E402

DTYPES = ("fp32", "bf16", "fp16")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message}. Run 'python train/infer.py --help' for the options")


def parse_args(argv=None):
    p = _Parser(prog="dsfleet-infer", description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (or hub id in the local cache)")
    p.add_argument("--ds_config", required=True, help="DeepSpeed inference config (JSON)")
    p.add_argument("--prompts", required=True, help="JSON lines with index and prompt or messages")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=8, help="prompts per generate() call of a replica")
    p.add_argument("--chat", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--replica", type=int, default=0, help="this world's replica: it takes prompts[replica::replicas]")
    p.add_argument("--replicas", type=int, default=1, help="replicas answering this prompts file")
    p.add_argument("--preflight", action="store_true")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher passes it
    a = p.parse_args(argv)
    if not 0 <= a.replica < a.replicas:
        fail(f"--replica {a.replica} is not below --replicas {a.replicas}", "Number the replicas 0..N-1")
    if a.max_new_tokens < 1 or a.batch < 1:
        fail("--max_new_tokens and --batch must be 1 or more", "Pass positive numbers")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        fail(f"--temperature {a.temperature} / --top_p {a.top_p} out of range", "Use temperature >= 0, 0 < top_p <= 1")
    return a


def read_config(path):
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(f"cannot read the inference config {path}: {e}", "Pass --ds_config a JSON file")
    tp = (cfg.get("tensor_parallel") or {}).get("tp_size", 1)
    if not isinstance(tp, int) or tp < 1:
        fail(f"{path}: tensor_parallel.tp_size must be a positive integer, got {tp!r}", "Fix the config")
    if cfg.get("dtype", "fp32") not in DTYPES:
        fail(f"{path}: dtype {cfg.get('dtype')!r} is not one of {', '.join(DTYPES)}", "Fix the config")
    return cfg, tp


def read_prompts(path):
    """[{"index", "prompt" | "messages"}] from the JSON lines file playbooks/infer.yml renders."""
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        fail(f"cannot read the prompts {path}: {e}", "Pass --prompts a JSON lines file")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            fail(f"{path} line {n} is not JSON ({e})", "Write one JSON object per line")
        if not isinstance(rec, dict) or not isinstance(rec.get("index"), int) or not (
                isinstance(rec.get("prompt"), str) or isinstance(rec.get("messages"), list)):
            fail(f"{path} line {n} needs an integer index and a prompt string or a messages list",
                 "Write {\"index\": 0, \"prompt\": \"...\"}")
        out.append(rec)
    return out


def preflight(args):
    info = model_info(args.model)
    if not info["found"]:
        fail(info["error"], "Fix model=")
    _, tp = read_config(args.ds_config)
    prompts = read_prompts(args.prompts)
    if args.chat == "on" and not info["chat_template"]:
        fail(f"chat=on but the tokenizer of {info['dir']} has no chat template", "Pass -e chat=off or auto")
    if any("messages" in p for p in prompts) and not info["chat_template"]:
        fail(f"the prompts hold messages but the tokenizer of {info['dir']} has no chat template",
             "Give plain prompt strings, or a model whose tokenizer has a chat template")
    return {"ok": True, "model": info["dir"], "params": info["params"], "tp_size": tp, "prompts": len(prompts)}


def prompt_text(tokenizer, rec, chat):
    """What the model is given: the chat template (when there is one and chat is not off), or the prompt."""
    use_chat = "messages" in rec or (chat != "off" and getattr(tokenizer, "chat_template", None))
    if not use_chat:
        return rec["prompt"]
    messages = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def run(args):
    import datetime

    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t_start = time.time()
    cfg, tp = read_config(args.ds_config)
    info = model_info(args.model)
    if not info["found"]:
        fail(info["error"], "Fix model=")
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=300))
    dist = deepspeed.comm
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp:
        # one world per replica: on CPU DeepSpeed's shared-memory all-reduce spans the whole world whatever the
        # group, so two tensor-parallel groups in one world would mix their sums
        fail(f"the world has {world} rank(s) but tp_size is {tp}", f"Start {tp} rank(s) per replica (--num_gpus {tp}) "
             "and give each replica its --replica index")
    out = Path(args.output_dir)
    if rank == 0:  # nothing of an earlier attempt of this replica stays to be gathered
        out.mkdir(parents=True, exist_ok=True)
        for old in (out / f"generations-{args.replica}.jsonl", out / f"done-{args.replica}.json"):
            old.unlink(missing_ok=True)
    torch.manual_seed(args.seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.get("dtype", "fp32")]
    tokenizer = AutoTokenizer.from_pretrained(info["dir"])
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(info["dir"], dtype=dtype).eval()
    engine = deepspeed.init_inference(model, config=cfg)
    module = engine.module
    device = get_accelerator().current_device_name() if get_accelerator().device_name() != "cpu" else "cpu"
    load_s = time.time() - t_start

    prompts = read_prompts(args.prompts)
    mine = prompts[args.replica::args.replicas]
    leader = rank == 0
    gen_path = out / f"generations-{args.replica}.jsonl"
    total_tokens, gen_s = 0, 0.0
    eos = tokenizer.eos_token_id
    with open(gen_path, "w") if leader else open(os.devnull, "w") as sink:
        for start in range(0, len(mine), args.batch):
            batch = mine[start:start + args.batch]
            texts = [prompt_text(tokenizer, rec, args.chat) for rec in batch]
            # a chat template writes its own special tokens
            templated = [t is not rec.get("prompt") for t, rec in zip(texts, batch)]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not any(templated)).to(device)
            torch.manual_seed(args.seed + batch[0]["index"])
            sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p} \
                if args.temperature > 0 else {"do_sample": False}
            t0 = time.time()
            with torch.no_grad():
                seqs = module.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                       **sampling)
            seconds = time.time() - t0
            gen_s += seconds
            width = enc["input_ids"].shape[1]
            for i, rec in enumerate(batch):
                new = seqs[i, width:].tolist()
                if eos is not None and eos in new:
                    new = new[:new.index(eos) + 1]
                while new and new[-1] == tokenizer.pad_token_id and tokenizer.pad_token_id != eos:
                    new.pop()
                total_tokens += len(new)
                line = {"index": rec["index"], "prompt": rec.get("prompt", rec.get("messages")),
                        "output": tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new),
                        "prompt_tokens": int(enc["attention_mask"][i].sum()), "seconds": round(seconds, 4),
                        "replica": args.replica}
                sink.write(json.dumps(line) + "\n")
            sink.flush()
    if leader:
        (out / f"done-{args.replica}.json").write_text(json.dumps({
            "replica": args.replica, "prompts": len(mine), "tokens": total_tokens, "seconds": round(gen_s, 4),
            "load_seconds": round(load_s, 3), "tp_size": tp, "dtype": cfg.get("dtype", "fp32"), "rank": rank,
            "params_per_rank": sum(p.numel() for p in module.parameters())}) + "\n")
    dist.barrier()
    return 0


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.preflight:
            print(json.dumps(preflight(args)), flush=True)
            return 0
        return run(args)
    except UsageError as e:
        print(f"dsfleet-infer: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
