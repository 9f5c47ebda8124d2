"""
Train a Hugging Face causal language model with DeepSpeed: the dsfleet training entry point.

One file, read top to bottom: defaults, input checks, model and data resolution, the training
loop. The Ansible launcher (launch.yml) runs it on every host; you can run it by hand the same way.

Two CPU ranks on one machine (what tests/unit/test_train.py does):

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 train/train.py \\
        --deepspeed_config ds_config.json --output_dir runs/tiny --max_steps 30

One process, no launcher (RANK/WORLD_SIZE/... default to a world of one):

    python train/train.py --deepspeed_config ds_config.json --output_dir runs/tiny

Several hosts, one launcher per host, rank 0 on the first host of the hostfile:

    deepspeed --hostfile hostfile --no_ssh --node_rank=R --master_addr=HOST0 --master_port=29500 \\
        train/train.py --deepspeed_config ds_config.json --output_dir runs/x \\
        --model /data/models/my-llama --dataset /data/corpus.jsonl --text_field text

Check the inputs before launching (no distributed init, no weights loaded, no deepspeed import);
prints one JSON line {"ok": true, "model", "dataset", "blocks", "vocab_size"} and exits 0:

    python train/train.py --deepspeed_config ds_config.json --output_dir runs/x --preflight

A minimal ds_config.json (ZeRO 2, fp32). Without an "optimizer" section AdamW is built here
(no fused_adam compile); without a "scheduler" section a linear warmup/decay LambdaLR is built here.
"auto" is accepted for train_batch_size, optimizer.params.lr and the WarmupLR/WarmupDecayLR
scheduler params; it is filled from the flags below.

    {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
     "zero_optimization": {"stage": 2}}

Outputs in --output_dir:
    metrics.jsonl   rank 0 appends one JSON object per line, flushed per line:
                    {"event": "start", "world_size", "model", "params", "block_size", "micro_batch",
                     "grad_accum", "precision", "zero_stage", "start_step", "total_steps", "time"}
                    {"event": "step", "step", "loss" (mean over ranks), "lr", "tokens_per_s" (all ranks),
                     "elapsed_s", "time"}   at step 1 of the run, every --log_every steps, the last step
                    {"event": "end", "steps", "first_loss", "final_loss", "tokens_per_s", "checkpoint_dir",
                     "checkpoint_tag", "export_dir", "elapsed_s", "time"}
                    {"event": "error", "error", "time"}   if training raised
    checkpoint/     engine.save_checkpoint (every --save_every steps and at the end); --resume continues
                    from its latest tag (exactly, if world size and batch settings are unchanged)
    export/         save_pretrained (safetensors) + tokenizer; AutoModelForCausalLM.from_pretrained loads it

Bad input exits 2 with one line on stderr: "dsfleet-train: error: <what is wrong>. <how to fix>".
"""
import argparse
import inspect
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS_DIR = HERE / "presets"             # one directory per preset: config.json + tokenizer files
BUNDLED_CORPUS = HERE / "data" / "corpus.txt"

# -----------------------------------------------------------------------------
# defaults; each is the default of the command-line flag of the same name
MODEL = "tiny"             # preset name, local model directory, or hub id (org/name)
DATASET = "bundled"        # "bundled", a .txt/.jsonl/.json/.csv/.parquet file, a datasets dir, or a hub name
TEXT_FIELD = "text"        # the text column of .jsonl and datasets inputs
MAX_STEPS = None           # optimizer steps to run; None: run --epochs
EPOCHS = 1                 # passes over this rank's shard, used when --max_steps is not given
BLOCK_SIZE = 128           # tokens per training sequence
LR = 3e-4                  # peak learning rate (client AdamW, or "auto" in the ds_config)
WARMUP_STEPS = 0           # linear warmup steps
SEED = 1234                # model init and data order
LOG_EVERY = 1              # log a step event every N steps (0: only the first and last step)
SAVE_EVERY = 0             # intermediate checkpoint every N steps (0: only at the end)
# fixed choices, not flags
WEIGHT_DECAY = 0.1         # client AdamW, applied to matrices only (not to norms and biases)
BETAS = (0.9, 0.95)
MIN_LR_RATIO = 0.1         # client schedule decays linearly to LR * MIN_LR_RATIO at the last step
DIST_TIMEOUT_S = 300       # bound on waiting for a peer rank (torch's default is 10 minutes)
# -----------------------------------------------------------------------------

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FILE_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}  # via datasets.load_dataset
AUTO_FILLABLE = {"train_batch_size", "optimizer.params.lr", "scheduler.params.warmup_max_lr",
                 "scheduler.params.warmup_min_lr", "scheduler.params.warmup_num_steps",
                 "scheduler.params.total_num_steps"}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""


def fail(what, fix):
    raise UsageError(f"{what}. {fix}")


def print0(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


# -----------------------------------------------------------------------------
# arguments

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other input error
        raise UsageError(f"{message}. Run 'python train/train.py --help' for the options")


def parse_args(argv=None):
    p = _Parser(prog="dsfleet-train", description="Train a causal LM with DeepSpeed (see the module docstring).")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config")
    p.add_argument("--output_dir", required=True, help="metrics.jsonl, checkpoint/ and export/ go here")
    p.add_argument("--model", default=MODEL, help="preset name (%s), local model dir, or hub id" % ", ".join(list_presets()))
    p.add_argument("--dataset", default=DATASET, help="'bundled', a .txt/.jsonl file, a datasets dir or name")
    p.add_argument("--text_field", default=TEXT_FIELD, help="text column of .jsonl/datasets inputs")
    p.add_argument("--max_steps", type=int, default=MAX_STEPS, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the data (default {EPOCHS})")
    p.add_argument("--block_size", type=int, default=BLOCK_SIZE, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=WARMUP_STEPS, help="linear warmup steps")
    p.add_argument("--seed", type=int, default=SEED, help="model init and data order seed")
    p.add_argument("--log_every", type=int, default=LOG_EVERY, help="step event every N steps (0: first/last)")
    p.add_argument("--save_every", type=int, default=SAVE_EVERY, help="checkpoint every N steps (0: at end)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint if present")
    p.add_argument("--preflight", action="store_true", help="check inputs, print one JSON line, exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; ignored (LOCAL_RANK/RANK/WORLD_SIZE are read from env)")
    return p.parse_args(argv)


def validate_args(args):
    """Range checks argparse cannot express. Returns args with epochs resolved."""
    if args.max_steps is not None and args.max_steps <= 0:
        fail(f"--max_steps must be a positive number of optimizer steps, got {args.max_steps}",
             "Pass --max_steps N with N >= 1, or leave it out to train for --epochs")
    if args.epochs is not None and args.epochs <= 0:
        fail(f"--epochs must be positive, got {args.epochs}", "Pass --epochs E with E >= 1")
    if args.max_steps is None and args.epochs is None:
        args.epochs = EPOCHS
    if args.block_size < 2:
        fail(f"--block_size must be at least 2 tokens, got {args.block_size}", "Pass e.g. --block_size 128")
    if not (math.isfinite(args.lr) and args.lr > 0):
        fail(f"--lr must be a positive finite number, got {args.lr}", "Pass e.g. --lr 3e-4")
    for name in ("warmup_steps", "log_every", "save_every"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}", f"Pass --{name} 0 or a positive number")
    if not args.text_field:
        fail("--text_field is empty", "Pass the name of the text column, e.g. --text_field text")
    if not args.output_dir.strip():
        fail("--output_dir is empty", "Pass a directory for metrics, checkpoints and the export")
    return args


# -----------------------------------------------------------------------------
# the DeepSpeed config: read the few settings this script needs, strictly

def _positive_int(cfg, key, default=None):
    value = cfg.get(key, default)
    if value == "auto":
        fail(f"deepspeed config: {key} is \"auto\"", "Replace it with a number (a planner fills \"auto\" fields)")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        fail(f"deepspeed config: {key} must be a positive integer, got {value!r}", f"Set \"{key}\": 1 or more")
    return value


def _section(cfg, key):
    value = cfg.get(key, {})
    if not isinstance(value, dict):
        fail(f"deepspeed config: {key} must be an object, got {type(value).__name__}", f"Write \"{key}\": {{...}}")
    return value


def _enabled(cfg, key):
    enabled = _section(cfg, key).get("enabled", False)
    if not isinstance(enabled, bool):
        fail(f"deepspeed config: {key}.enabled must be true or false, got {enabled!r}", f"Set \"{key}\": {{\"enabled\": false}}")
    return enabled


def _auto_paths(obj, prefix=""):
    """Dotted paths of every "auto" value in a nested config."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _auto_paths(value, f"{prefix}{key}.")
    elif obj == "auto":
        yield prefix[:-1]


def read_ds_config(path):
    """Load and check a ds_config file. Returns (config dict, settings dict)."""
    path = Path(path)
    if not path.is_file():
        fail(f"deepspeed config {path} does not exist", "Pass --deepspeed_config PATH to a JSON file")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read deepspeed config {path}: {e}", "Check the file's permissions and encoding")
    except json.JSONDecodeError as e:
        fail(f"deepspeed config {path} is not valid JSON ({e})", "Fix the JSON syntax")
    if not isinstance(cfg, dict):
        fail(f"deepspeed config {path} must hold a JSON object, got {type(cfg).__name__}", "Write {\"train_micro_batch_size_per_gpu\": 1, ...}")
    if "train_micro_batch_size_per_gpu" not in cfg:
        fail("deepspeed config: train_micro_batch_size_per_gpu is missing", "Add \"train_micro_batch_size_per_gpu\": N")
    micro = _positive_int(cfg, "train_micro_batch_size_per_gpu")
    accum = _positive_int(cfg, "gradient_accumulation_steps", 1)
    if cfg.get("train_batch_size", "auto") != "auto":
        _positive_int(cfg, "train_batch_size")
    bf16, fp16 = _enabled(cfg, "bf16"), _enabled(cfg, "fp16")
    if bf16 and fp16:
        fail("deepspeed config: bf16 and fp16 are both enabled", "Enable at most one of them")
    zero = _section(cfg, "zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        fail(f"deepspeed config: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}", "Set \"stage\": 2 for example")
    for key in ("optimizer", "scheduler"):
        if key in cfg and not isinstance(_section(cfg, key).get("type"), str):
            fail(f"deepspeed config: {key}.type is missing", f"Name the {key} type, or drop the {key} section to use this script's own")
    offload = _section(zero, "offload_optimizer").get("device", "none")
    if offload not in ("none", None) and "optimizer" not in cfg and cfg.get("zero_force_ds_cpu_optimizer", True):
        fail("deepspeed config: offload_optimizer needs DeepSpeed's CPU Adam, but there is no optimizer section",
             "Add \"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": \"auto\"}}, or set \"zero_force_ds_cpu_optimizer\": false")
    stray = sorted(set(_auto_paths(cfg)) - AUTO_FILLABLE)
    if stray:
        fail(f"deepspeed config: \"auto\" is not supported for {', '.join(stray)}",
             f"Replace it with a value (\"auto\" is filled only for {', '.join(sorted(AUTO_FILLABLE))})")
    settings = {"micro_batch": micro, "grad_accum": accum, "zero_stage": stage,
                "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32",
                "has_optimizer": "optimizer" in cfg, "has_scheduler": "scheduler" in cfg}
    return cfg, settings


def fill_auto(cfg, *, world_size, lr, warmup_steps, total_steps):
    """Fill the "auto" fields read_ds_config allows, and check train_batch_size. Returns a new dict."""
    cfg = json.loads(json.dumps(cfg))
    batch = cfg["train_micro_batch_size_per_gpu"] * cfg.get("gradient_accumulation_steps", 1) * world_size
    if cfg.get("train_batch_size", "auto") == "auto":
        cfg["train_batch_size"] = batch
    elif cfg["train_batch_size"] != batch:
        fail(f"deepspeed config: train_batch_size {cfg['train_batch_size']} != micro batch x grad accum x world size = {batch}",
             "Set train_batch_size to that product, or to \"auto\", or drop it")
    values = {"lr": lr, "warmup_max_lr": lr, "warmup_min_lr": 0.0,
              "warmup_num_steps": warmup_steps, "total_num_steps": total_steps}
    for section in ("optimizer", "scheduler"):
        params = cfg.get(section, {}).get("params", {})
        for key, value in params.items():
            if value == "auto":
                params[key] = values[key]
    return cfg


# -----------------------------------------------------------------------------
# model: preset, local directory, or hub id

def list_presets():
    return sorted(d.name for d in PRESETS_DIR.iterdir() if (d / "config.json").is_file()) if PRESETS_DIR.is_dir() else []


def _looks_like_path(spec):
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")


def resolve_model(spec):
    """Return ("preset" | "local" | "hub", path or hub id)."""
    presets = list_presets()
    if spec in presets:
        return "preset", str(PRESETS_DIR / spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            fail(f"model directory {path} has no config.json", "Point --model at a directory written by save_pretrained")
        return "local", str(path.resolve())
    if path.exists():
        fail(f"--model {spec} is a file, not a model directory", "Point --model at the directory that holds config.json")
    if _looks_like_path(spec):
        fail(f"model path {spec} does not exist", "Check the path on this host, or use a preset (%s) or a hub id org/name" % ", ".join(presets))
    if HUB_ID.fullmatch(spec):
        return "hub", spec
    fail(f"unknown model preset {spec!r}", "Use a preset (%s), an existing model directory, or a hub id org/name" % ", ".join(presets))


def _hf_call(what, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot load {what}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
             "Check that the model directory (or hub id) holds a transformers config and tokenizer")


def load_config_and_tokenizer(kind, where):
    from transformers import AutoConfig, AutoTokenizer
    local = kind != "hub"
    config = _hf_call(f"model config from {where}", AutoConfig.from_pretrained, where, local_files_only=local)
    tokenizer = _hf_call(f"tokenizer from {where}", AutoTokenizer.from_pretrained, where, local_files_only=local)
    if tokenizer.eos_token_id is None:
        fail(f"tokenizer from {where} has no eos token", "Use a tokenizer with an eos token (documents are joined with it)")
    return config, tokenizer


def build_model(kind, where, config, seed):
    """Preset: random init from the config (seeded). Otherwise: the pretrained weights, in fp32."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    if kind == "preset":
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(where, config=config, dtype=torch.float32, local_files_only=kind != "hub")


# -----------------------------------------------------------------------------
# data: resolve, read texts, tokenize, pack into blocks, shard by rank

def resolve_dataset(spec):
    """Return (kind, where) with kind in text, jsonl, file, disk, dir, hub."""
    if spec == "bundled":
        return "text", str(BUNDLED_CORPUS)
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".txt":
            return "text", str(path.resolve())
        if suffix == ".jsonl":
            return "jsonl", str(path.resolve())
        if suffix in FILE_BUILDERS:
            return "file", str(path.resolve())
        fail(f"dataset file {spec} has an unsupported extension {suffix or '(none)'}",
             "Use a .txt, .jsonl, .json, .csv or .parquet file, or a directory saved by datasets")
    if path.is_dir():
        saved = any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        return ("disk" if saved else "dir"), str(path.resolve())
    if _looks_like_path(spec) or suffix in (".txt", ".jsonl", *FILE_BUILDERS):
        fail(f"dataset path {spec} does not exist", "Check the path on this host, or use --dataset bundled")
    return "hub", spec


def _paragraphs(text):
    """Documents of a text file: blank-line separated paragraphs, or lines if there are no blank lines."""
    parts = re.split(r"\n\s*\n", text)
    if len(parts) == 1:
        parts = text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def read_texts(kind, where, text_field="text"):
    """Documents (non-empty strings) of a resolved dataset."""
    if kind in ("text", "jsonl"):
        try:
            raw = Path(where).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read dataset {where}: {e}", "Check the file's permissions; it must be UTF-8 text")
    if kind == "text":
        texts = _paragraphs(raw)
    elif kind == "jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"dataset {where} line {n} is not JSON ({e})", "Write one JSON object per line")
            if not isinstance(row, dict) or text_field not in row:
                fail(f"dataset {where} line {n} has no field {text_field!r}", "Pass --text_field NAME naming the text field")
            if not isinstance(row[text_field], str):
                fail(f"dataset {where} line {n}: field {text_field!r} is not a string", "Store the text as a JSON string")
            texts.append(row[text_field])
    else:
        import datasets
        try:
            if kind == "disk":
                ds = datasets.load_from_disk(where)
            elif kind == "file":
                ds = datasets.load_dataset(FILE_BUILDERS[Path(where).suffix.lower()], data_files=where)
            else:
                ds = datasets.load_dataset(where)
        except (OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
            fail(f"cannot load dataset {where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                 "Check the path or name; hub names need network access")
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                fail(f"dataset {where} has no train split (splits: {', '.join(ds)})", "Save or select a 'train' split")
            ds = ds["train"]
        if text_field not in ds.column_names:
            fail(f"dataset {where} has no column {text_field!r} (columns: {', '.join(ds.column_names)})",
                 "Pass --text_field NAME naming the text column")
        texts = [t for t in ds[text_field] if isinstance(t, str)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        fail(f"dataset {where} holds no text", "Point --dataset at a non-empty dataset")
    return texts


def tokenize(texts, tokenizer, batch_size=1000):
    """Token ids of each document, without special tokens."""
    ids = []
    for i in range(0, len(texts), batch_size):
        ids.extend(tokenizer(texts[i:i + batch_size], add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def pack(token_lists, eos_id, block_size):
    """Concatenate documents, each followed by eos, and cut into full blocks (the remainder is dropped)."""
    stream = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def shard(blocks, rank, world_size):
    """This rank's blocks: blocks[rank::world_size] after trimming so that every rank gets the same count."""
    usable = len(blocks) // world_size * world_size
    return blocks[:usable][rank::world_size]


def epoch_order(n, seed, epoch):
    """A permutation of range(n), the same on every run for a given (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def load_blocks(args, tokenizer):
    kind, where = resolve_dataset(args.dataset)
    texts = read_texts(kind, where, args.text_field)
    blocks = pack(tokenize(texts, tokenizer), tokenizer.eos_token_id, args.block_size)
    if not blocks:
        fail(f"dataset {args.dataset} yields no block of {args.block_size} tokens", "Use more text or a smaller --block_size")
    return where, blocks


def check_block_size(config, block_size):
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        fail(f"--block_size {block_size} exceeds the model's max_position_embeddings {limit}", f"Pass --block_size {limit} or less")


def lr_lambda(warmup_steps, total_steps):
    """Client schedule: linear warmup to 1, then linear decay to MIN_LR_RATIO at the last step."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
        return max(MIN_LR_RATIO, 1.0 - (1.0 - MIN_LR_RATIO) * progress)
    return factor


# -----------------------------------------------------------------------------

def preflight(args):
    read_ds_config(args.deepspeed_config)
    kind, where = resolve_model(args.model)
    config, tokenizer = load_config_and_tokenizer(kind, where)
    check_block_size(config, args.block_size)
    dataset, blocks = load_blocks(args, tokenizer)
    print(json.dumps({"ok": True, "model": where, "dataset": dataset, "blocks": len(blocks),
                      "vocab_size": getattr(config, "vocab_size", len(tokenizer))}), flush=True)


class Metrics:
    """rank 0's metrics.jsonl: one JSON object per line, flushed per line. Other ranks write nothing."""

    def __init__(self, path, enabled):
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, event, **fields):
        if self.file:
            self.file.write(json.dumps({"event": event, **fields, "time": time.time()}) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def training_function(args):
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        os.environ.setdefault(key, value)  # plain `python train/train.py` is a world of one
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    # everything that can be wrong with the input is found before the process group is joined
    ds_config, s = read_ds_config(args.deepspeed_config)
    kind, where = resolve_model(args.model)
    config, tokenizer = load_config_and_tokenizer(kind, where)
    check_block_size(config, args.block_size)
    _, blocks = load_blocks(args, tokenizer)
    mine = shard(blocks, rank, world_size)
    micro_per_epoch = len(mine) // s["micro_batch"]
    if micro_per_epoch == 0:
        fail(f"dataset gives each of {world_size} ranks {len(mine)} blocks, fewer than one micro batch of {s['micro_batch']}",
             "Use more text, a smaller --block_size, or a smaller train_micro_batch_size_per_gpu")
    epoch_steps = (args.epochs or 0) * micro_per_epoch // s["grad_accum"]
    total_steps = min(args.max_steps, epoch_steps) if args.max_steps and args.epochs else args.max_steps or epoch_steps
    if total_steps == 0:
        fail(f"{args.epochs} epoch(s) of {micro_per_epoch} micro batches make no full step of {s['grad_accum']} accumulated micro batches",
             "Pass --max_steps N, or more --epochs")
    ds_config = fill_auto(ds_config, world_size=world_size, lr=args.lr, warmup_steps=args.warmup_steps, total_steps=total_steps)

    import datetime
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
    out = Path(args.output_dir)
    ckpt_dir, export_dir = out / "checkpoint", out / "export"
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(kind, where, config, args.seed)
    n_params = sum(p.numel() for p in model.parameters())

    optimizer = scheduler = None
    if not s["has_optimizer"]:  # client AdamW: no DeepSpeed op to compile
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=BETAS)
    if not s["has_scheduler"]:
        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup_steps, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        model_parameters=None if optimizer else [p for p in model.parameters() if p.requires_grad])

    start_step = 0
    if args.resume and (ckpt_dir / "latest").is_file():
        _, client_state = engine.load_checkpoint(str(ckpt_dir))
        start_step = int((client_state or {}).get("step", engine.global_steps))
        print0(f"resumed from {ckpt_dir} at step {start_step}")
    elif args.resume:
        print0(f"no checkpoint in {ckpt_dir}; starting from step 0")

    data = torch.tensor(mine, dtype=torch.long)
    orders = {}

    def get_batch(micro_index):
        """The micro batch at a global micro-step index: a pure function of (seed, index), so resume is exact."""
        epoch, k = divmod(micro_index, micro_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order(len(mine), args.seed, epoch)
        mb = s["micro_batch"]
        return data[orders[epoch][k * mb:(k + 1) * mb]]

    def mean_over_ranks(value):
        # on the engine's device: NCCL/RCCL/XCCL reduce only device tensors (gloo takes CPU ones)
        t = torch.tensor([value], dtype=torch.float64, device=engine.device)
        dist.all_reduce(t)
        return t.item() / world_size

    metrics = Metrics(out / "metrics.jsonl", enabled=rank == 0)
    metrics.write("start", world_size=world_size, model=args.model, params=n_params, block_size=args.block_size,
                  micro_batch=s["micro_batch"], grad_accum=s["grad_accum"], precision=s["precision"],
                  zero_stage=s["zero_stage"], start_step=start_step, total_steps=total_steps)
    print0(f"training {args.model} ({n_params / 1e6:.2f}M params) on {world_size} rank(s): steps {start_step}..{total_steps}, "
           f"{s['precision']}, ZeRO {s['zero_stage']}, {len(blocks)} blocks of {args.block_size}")

    tokens_per_step = s["micro_batch"] * s["grad_accum"] * world_size * args.block_size
    first_loss = final_loss = None
    tag = None
    step = start_step
    try:
        engine.train()
        t0 = t_last = time.time()
        step_last = step
        while step < total_steps:
            lr = engine.get_lr()[0]
            loss_sum = 0.0
            for i in range(s["grad_accum"]):
                x = get_batch(step * s["grad_accum"] + i).to(engine.device)
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
                engine.step()
                loss_sum += loss.item()
            step += 1
            if step == start_step + 1 or step == total_steps or (args.log_every and step % args.log_every == 0):
                loss = mean_over_ranks(loss_sum / s["grad_accum"])
                now = time.time()
                tps = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                first_loss = loss if first_loss is None else first_loss
                final_loss = loss
                metrics.write("step", step=step, loss=loss, lr=lr, tokens_per_s=tps, elapsed_s=now - t0)
                print0(f"step {step}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s")
            if args.save_every and step % args.save_every == 0 and step < total_steps:
                engine.save_checkpoint(str(ckpt_dir), client_state={"step": step})
        elapsed = time.time() - t0

        tag = f"global_step{engine.global_steps}"
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
        export(engine, tokenizer, export_dir, s["zero_stage"], rank)
        dist.barrier()
    except Exception as e:
        metrics.write("error", error=f"{type(e).__name__}: {e}")
        metrics.close()
        raise
    metrics.write("end", steps=step, first_loss=first_loss, final_loss=final_loss,
                  tokens_per_s=tokens_per_step * (step - start_step) / max(elapsed, 1e-9),
                  checkpoint_dir=str(ckpt_dir.resolve()), checkpoint_tag=tag, export_dir=str(export_dir.resolve()),
                  elapsed_s=elapsed)
    metrics.close()
    print0(f"done: {step} steps in {elapsed:.1f}s, loss {first_loss} -> {final_loss}; export in {export_dir}")


def export(engine, tokenizer, export_dir, zero_stage, rank):
    """save_pretrained on rank 0; under ZeRO-3 every rank first helps gather the full weights."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank != 0:
        return
    module = engine.module
    extra = {"safe_serialization": True} if "safe_serialization" in inspect.signature(module.save_pretrained).parameters else {}
    module.save_pretrained(str(export_dir), state_dict=state_dict, **extra)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(str(export_dir))


def exit_now(code):
    """Flush, leave the process group, and end without interpreter teardown (ZeRO-3 can abort there)."""
    sys.stdout.flush()
    sys.stderr.flush()
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)


def main(argv=None):
    try:
        args = validate_args(parse_args(argv))
        if args.preflight:
            preflight(args)
        else:
            training_function(args)
    except UsageError as e:
        print(f"dsfleet-train: error: {e}", file=sys.stderr)
        exit_now(2)
    exit_now(0)


if __name__ == "__main__":
    main()
