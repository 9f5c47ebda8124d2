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
                     "grad_accum", "precision", "zero_stage", "start_step", "total_steps", "params_here" (what
                     rank 0 held once built: its ZeRO-3 partition), "activation_checkpointing",
                     "load_peak_rss_mib", "time"}
                    {"event": "step", "step", "loss" (mean over ranks), "lr", "tokens_per_s" (all ranks),
                     "elapsed_s", "grad_norm" (before clipping, where DeepSpeed computed it), "time"}   at step 1
                     of the run, every --log_every steps, the last step
                    {"event": "eval", "step", "eval_loss", "perplexity", "eval_tokens", "time"}   with eval data
                    {"event": "end", "steps", "first_loss", "final_loss", "tokens_per_s", "checkpoint_dir",
                     "checkpoint_tag", "export_dir", "elapsed_s", "peak_rss_mib" (rank 0), "time"}
                    {"event": "error", "error", "time"}   if training raised
    checkpoint/     engine.save_checkpoint (every --save_every steps, every --save_every_minutes, on SIGTERM
                    and at the end); --resume continues from the newest tag complete on every rank's disk:
                    exactly if it was written by this world size, else from <tag>_universal (a universal
                    checkpoint, see dsfleet_ckpt.py) when one is there
    export/         save_pretrained (safetensors) + tokenizer; AutoModelForCausalLM.from_pretrained loads it
    tensorboard/    TensorBoard events (train/loss, train/lr, train/tokens_per_s, train/grad_norm, eval/loss,
                    eval/perplexity): tensorboard --logdir runs/<id>/tensorboard
    plot.png        loss (train, eval), lr and tokens/s per step (dsfleet_plot.py), redrawn every --plot_every_s

Bad input exits 2 with one line on stderr: "dsfleet-train: error: <what is wrong>. <how to fix>".
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the torch-free pieces live beside this file (also when loaded by path)
    sys.path.insert(0, str(HERE))

import dsfleet_torch as T  # noqa: E402
from export_hf import save_pretrained_dir  # noqa: E402

import dsfleet_tokens as TK  # noqa: E402
from dsfleet_ckpt import (  # noqa: E402
    complete_layouts,
    mark_complete,
    newest_at_most,
    prune,
    tag_for,
    universal_steps,
    universal_tag_for,
    usable_steps,
)
from dsfleet_config import AUTO_FILLABLE, MIN_LR_RATIO, UsageError, fail, fill_auto, lr_lambda, read_ds_config  # noqa: E402,F401
from dsfleet_data import (  # noqa: E402,F401
    BUNDLED_CORPUS,
    FILE_BUILDERS,
    HUB_ID,
    PRESETS_DIR,
    check_block_size,
    epoch_order,
    list_presets,
    pack,
    read_texts,
    resolve_dataset,
    resolve_model,
    shard,
    tokenize,
)

# -----------------------------------------------------------------------------
# defaults; each is the default of the command-line flag of the same name
MODEL = "tiny"             # preset name, local model directory, or hub id (org/name)
DATASET = "bundled"        # "bundled", a .txt/.jsonl/.json/.csv/.parquet file, a datasets dir, or a hub name
TEXT_FIELD = "text"        # the text column of .jsonl and datasets inputs
DATA_FORMAT = "auto"       # text | instruction | chat | auto (from the first row: dsfleet_tokens.py)
PROMPT_FIELD, RESPONSE_FIELD, MESSAGES_FIELD = "prompt", "response", "messages"
EVAL_FRACTION = 0.0        # the last fraction of the blocks held out for eval (0: none, unless --eval_dataset)
EVAL_EVERY = 0             # eval every N steps (0: at the end only), when there is eval data
TOKEN_CACHE = "~/.dsfleet/cache/tokens"  # where each host keeps the tokenized corpus (dsfleet_tokens.py)
MAX_STEPS = None           # optimizer steps to run; None: run --epochs
EPOCHS = 1                 # passes over this rank's shard, used when --max_steps is not given
BLOCK_SIZE = 128           # tokens per training sequence
LR = 3e-4                  # peak learning rate (client AdamW, or "auto" in the ds_config)
WARMUP_STEPS = 0           # linear warmup steps
SEED = 1234                # model init and data order
LOG_EVERY = 1              # log a step event every N steps (0: only the first and last step)
PLOT_EVERY_S = 60          # redraw out/plot.png at most this often while training (and always at the end)
SAVE_EVERY = 0             # intermediate checkpoint every N steps (0: only at the end)
SAVE_EVERY_MINUTES = 30.0  # and a checkpoint whenever this many minutes passed since the last one (0: off)
KEEP_CHECKPOINTS = 2       # complete checkpoints kept on each host (0: all)
STRATEGY = "deepspeed"     # deepspeed | fsdp | ddp (dsfleet_torch.py: FSDP2 fully_shard, DistributedDataParallel)
FSDP_SHARDING = "full"     # fsdp: full (over every rank) | hybrid (within a host, replicated across hosts)
# fixed choices, not flags
# the client AdamW, used only when a hand-written ds_config has no "optimizer" section (the plan always writes
# one: lib/dsfleet_core/plan.py OPTIMIZER); weight decay applies to matrices only (not to norms and biases)
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
DIST_TIMEOUT_S = 300       # bound on waiting for a peer rank (torch's default is 10 minutes)
# -----------------------------------------------------------------------------



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
    p.add_argument("--data_format", default=DATA_FORMAT, choices=TK.FORMATS,
                   help="text (packed), instruction (prompt/response, loss on the response), chat (messages with "
                        "the tokenizer's chat template, loss on assistant turns); auto: from the first row")
    p.add_argument("--prompt_field", default=PROMPT_FIELD, help="instruction data: the prompt field")
    p.add_argument("--response_field", default=RESPONSE_FIELD, help="instruction data: the response field")
    p.add_argument("--messages_field", default=MESSAGES_FIELD, help="chat data: the list of {role, content}")
    p.add_argument("--eval_fraction", type=float, default=EVAL_FRACTION,
                   help="hold out this fraction of the blocks (the last ones) for eval loss and perplexity")
    p.add_argument("--eval_dataset", default=None, help="eval on this dataset instead (same formats)")
    p.add_argument("--eval_every", type=int, default=EVAL_EVERY, help="eval every N steps (0: at the end)")
    p.add_argument("--token_cache", default=TOKEN_CACHE, help="folder of this host's token caches")
    p.add_argument("--max_steps", type=int, default=MAX_STEPS, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the data (default {EPOCHS})")
    p.add_argument("--block_size", type=int, default=BLOCK_SIZE, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=WARMUP_STEPS, help="linear warmup steps")
    p.add_argument("--seed", type=int, default=SEED, help="model init and data order seed")
    p.add_argument("--log_every", type=int, default=LOG_EVERY, help="step event every N steps (0: first/last)")
    p.add_argument("--plot_every_s", type=float, default=PLOT_EVERY_S,
                   help="redraw out/plot.png at most this often while training (0: only at the end)")
    p.add_argument("--no_tensorboard", action="store_true", help="write no TensorBoard events in out/tensorboard/")
    p.add_argument("--save_every", type=int, default=SAVE_EVERY, help="checkpoint every N steps (0: at end)")
    p.add_argument("--save_every_minutes", type=float, default=SAVE_EVERY_MINUTES,
                   help="also checkpoint when this many minutes passed since the last one (0: off)")
    p.add_argument("--keep_checkpoints", type=int, default=KEEP_CHECKPOINTS, help="complete checkpoints kept (0: all)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint complete on every rank's disk, if there is one")
    p.add_argument("--replicas", default=None,
                   help="JSON list [{ranks, argv}]: after each checkpoint the host holding RANK's shards runs argv "
                        "+ [--tag TAG] (dsfleet_node.py replicate: a copy on the next host)")
    p.add_argument("--strategy", default=STRATEGY, choices=T.STRATEGIES,
                   help="deepspeed: the DeepSpeed engine (ZeRO from the config); fsdp: torch's FSDP2 fully_shard; "
                        "ddp: torch's DistributedDataParallel (start with torchrun)")
    p.add_argument("--fsdp_sharding", default=FSDP_SHARDING, choices=T.SHARDINGS,
                   help="fsdp: shard over every rank, or within each host (replicated across hosts)")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="recompute each layer's activations in the backward pass (less memory, ~1/3 more compute)")
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
    if not 0 <= args.eval_fraction < 1:
        fail(f"--eval_fraction must be in [0, 1), got {args.eval_fraction}", "Pass e.g. --eval_fraction 0.05")
    if args.eval_fraction and args.eval_dataset:
        fail("--eval_fraction and --eval_dataset were both given", "Pass one: a held-out fraction or an eval dataset")
    for name in ("warmup_steps", "log_every", "plot_every_s", "save_every", "save_every_minutes", "keep_checkpoints", "eval_every"):
        if getattr(args, name) < 0:
            fail(f"--{name} must be >= 0, got {getattr(args, name)}", f"Pass --{name} 0 or a positive number")
    if not args.text_field:
        fail("--text_field is empty", "Pass the name of the text column, e.g. --text_field text")
    if not args.output_dir.strip():
        fail("--output_dir is empty", "Pass a directory for metrics, checkpoints and the export")
    return args


# -----------------------------------------------------------------------------
# the DeepSpeed config: read the few settings this script needs, strictly

# -----------------------------------------------------------------------------
# model: preset, local directory, or hub id

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


TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_model(kind, where, config, seed, precision="fp32", ds_config=None, checkpointing=False, meta=False):
    """Preset: random init from the config (seeded). Otherwise: the pretrained weights. Either way in the training
    precision (a 16-bit run never holds an fp32 copy per rank) with SDPA attention; under ZeRO-3 (``ds_config``'s
    stage 3) inside deepspeed.zero.Init, through transformers' HfDeepSpeedConfig, so each rank only ever holds its
    partition of the weights. ``meta``: the structure only, from the config (the caller holds torch.device("meta");
    FSDP's ranks but the first). Returns (model, the HfDeepSpeedConfig to keep alive or None)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    dtype = getattr(torch, TORCH_DTYPES[precision])
    keep = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig
        keep = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference: alive while the model is used
    if kind == "preset" or meta:
        build, build_args = AutoModelForCausalLM.from_config, (config,)
        options = {"dtype": dtype}
    else:
        build, build_args = AutoModelForCausalLM.from_pretrained, (where,)
        options = {"config": config, "dtype": dtype, "local_files_only": kind != "hub"}
    try:
        model = build(*build_args, attn_implementation="sdpa", **options)
    except (ValueError, ImportError) as e:  # a family without SDPA: its own attention
        if "sdpa" not in str(e).lower() and "scaled_dot_product" not in str(e).lower():
            raise
        model = build(*build_args, **options)
    if checkpointing:
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, keep


def peak_rss_mib():
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def parameter_count(model):
    """Every parameter, also when ZeRO-3 holds only a partition of it here (ds_numel: the whole tensor's size; an
    FSDP DTensor's numel is the whole tensor's too)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


# -----------------------------------------------------------------------------
# data: resolve, read texts, tokenize, pack into blocks, shard by rank

def load_blocks(args, tokenizer):
    """Every block as token lists (the small-data path the tests and the bundled corpus use directly)."""
    kind, where = resolve_dataset(args.dataset)
    texts = read_texts(kind, where, args.text_field)
    blocks = pack(tokenize(texts, tokenizer), tokenizer.eos_token_id, args.block_size)
    if not blocks:
        fail(f"dataset {args.dataset} yields no block of {args.block_size} tokens", "Use more text or a smaller --block_size")
    return where, blocks


def data_fields(args):
    return {"text": args.text_field, "prompt": args.prompt_field, "response": args.response_field,
            "messages": args.messages_field}


class Blocks:
    """A token cache mapped read-only: ``tokens[i]`` (block_size ids), ``labels[i]`` and ``lengths[i]`` for
    instruction and chat data (None for packed text), the first ``n`` of them in use."""

    def __init__(self, folder, meta, start=0, n=None):
        import numpy as np
        self.meta, self.folder = meta, folder
        total, size = meta["blocks"], meta["block_size"]
        self.tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r", shape=(total, size)) \
            if total else np.zeros((0, size), dtype=meta["dtype"])
        labelled = meta["labelled"] and total
        self.labels = np.memmap(folder / "labels.bin", dtype="int32", mode="r", shape=(total, size)) if labelled else None
        self.lengths = np.memmap(folder / "lengths.bin", dtype="uint32", mode="r", shape=(total,)) if labelled else None
        self.start, self.n = start, total - start if n is None else n

    def part(self, start, n):
        return Blocks(self.folder, self.meta, self.start + start, n)

    def batch(self, indices):
        """(input_ids, labels, attention_mask or None) as int64 CPU tensors for these block indices (0-based in
        this part)."""
        import numpy as np
        import torch
        rows = np.asarray(indices, dtype=np.int64) + self.start
        x = torch.from_numpy(self.tokens[rows].astype(np.int64))
        if self.labels is None:
            return x, x, None
        y = torch.from_numpy(self.labels[rows].astype(np.int64))
        mask = torch.arange(x.shape[1])[None, :] < torch.from_numpy(self.lengths[rows].astype(np.int64))[:, None]
        return x, y, mask.long()


def load_data(args, tokenizer, model_kind, model_where, vocab_size):
    """(train Blocks, eval Blocks or None, token-cache facts for the metrics): the dataset tokenized once per host
    into the token cache (or the cache an earlier run built), the eval part held out or from --eval_dataset."""
    fields = data_fields(args)

    def cached(spec):
        kind, where = resolve_dataset(spec)
        folder, meta = TK.build_or_open(args.token_cache, tokenizer, model_kind, model_where, kind, where,
                                        args.data_format, fields, args.block_size, vocab_size, log=print0)
        if not meta["blocks"]:
            fail(f"dataset {spec} yields no block of {args.block_size} tokens",
                 "Use more text or a smaller --block_size" if meta["format"] == "text" else
                 "Every example's prompt fills the block: pass a larger --block_size")
        return Blocks(folder, meta), {"path": str(folder), "reused": meta["reused"], "format": meta["format"],
                                      "blocks": meta["blocks"], "build_seconds": meta["seconds"],
                                      "skipped": meta.get("skipped", 0), "cut": meta.get("cut", 0)}

    data, facts = cached(args.dataset)
    evaluation = None
    if args.eval_dataset:
        evaluation, eval_facts = cached(args.eval_dataset)
        facts["eval"] = eval_facts
    elif args.eval_fraction:
        n_train, n_eval = TK.eval_split(data.n, args.eval_fraction)
        if n_train == 0:
            fail(f"--eval_fraction {args.eval_fraction} leaves no block of {data.n} to train on",
                 "Pass a smaller --eval_fraction or more data")
        data, evaluation = data.part(0, n_train), data.part(n_train, n_eval)
    return data, evaluation, facts


# -----------------------------------------------------------------------------

PREFLIGHT_SAMPLE_BYTES = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def preflight(args):
    """What every host checks before anything starts, in well under a second and without torch or transformers:
    the ds_config, the model directory (config.json, a tokenizer, block size within the model's positions) and
    the dataset (it exists; the first MiB of a .txt/.jsonl file parses, with the text field). The full load and
    tokenization happen once, in the ranks."""
    read_ds_config(args.deepspeed_config)
    kind, where = resolve_model(args.model)
    config = {}
    if kind != "hub":
        try:
            config = json.loads((Path(where) / "config.json").read_text())
        except (OSError, ValueError) as e:
            fail(f"cannot read {where}/config.json: {e}", "Point --model at a directory written by save_pretrained")
        if not any((Path(where) / name).is_file() for name in TOKENIZER_FILES):
            fail(f"model directory {where} has no tokenizer ({', '.join(TOKENIZER_FILES)})",
                 "Save the tokenizer with the model (tokenizer.save_pretrained(DIR))")
        check_block_size(argparse.Namespace(**{k: v for k, v in config.items() if k == "max_position_embeddings"}),
                         args.block_size)
    checked = {}
    for spec in [args.dataset] + ([args.eval_dataset] if args.eval_dataset else []):
        dkind, dwhere = resolve_dataset(spec)
        checked[spec] = {"dataset": dwhere, "dataset_kind": dkind, **sample_check(args, dkind, dwhere)}
    first = checked[args.dataset]
    print(json.dumps({"ok": True, "model": where, "model_kind": kind, **first, "vocab_size": config.get("vocab_size"),
                      **({"eval": checked[args.eval_dataset]} if args.eval_dataset else {})}), flush=True)


def sample_check(args, dkind, dwhere):
    """The first MiB of a .txt/.jsonl dataset read and checked for its format's fields (other kinds are read by
    datasets in the ranks)."""
    if dkind == "text" or (dkind == "jsonl" and args.data_format == "text"):
        return {"format": "text", "sample_documents": len(read_texts(dkind, dwhere, args.text_field,
                                                                      PREFLIGHT_SAMPLE_BYTES))}
    if dkind != "jsonl":
        return {"format": args.data_format, "sample_documents": 0}
    fields, fmt, rows = data_fields(args), args.data_format, 0
    with open(dwhere, "rb") as f:
        head = f.read(PREFLIGHT_SAMPLE_BYTES + 1)
    if len(head) > PREFLIGHT_SAMPLE_BYTES:
        head = head[:head.rfind(b"\n", 0, PREFLIGHT_SAMPLE_BYTES) + 1] or head[:PREFLIGHT_SAMPLE_BYTES]
    try:
        lines = head.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        fail(f"cannot read dataset {dwhere}: {e}", "The file must be UTF-8 text")
    for n, row in TK.jsonl_rows(lines, dwhere):
        if fmt == "auto":
            fmt = "chat" if fields["messages"] in row else "instruction" if (
                fields["prompt"] in row and fields["response"] in row) else "text"
        TK.check_row(row, n, dwhere, fmt, fields)
        rows += 1
    if not rows:
        fail(f"dataset {dwhere} holds no rows", "Point --dataset at a non-empty dataset")
    return {"format": fmt, "sample_documents": rows}


class Metrics:
    """rank 0's records of the run: metrics.jsonl (one JSON object per line, flushed per line), progress.json,
    TensorBoard events (out/tensorboard/) and the plot (out/plot.png, dsfleet_plot.py in a child process so a step
    never waits on matplotlib). Other ranks write nothing."""

    def __init__(self, path, enabled, tensorboard=True, plot_every_s=PLOT_EVERY_S):
        self.file = open(path, "a", encoding="utf-8") if enabled else None
        self.path = Path(path)
        self.plot_every_s, self.plot_proc, self.plot_at = plot_every_s, None, time.time()
        self.tb = None
        if self.file and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # an environment from before dsfleet pinned tensorboard
                print(f"dsfleet-train: no TensorBoard events ({e}); run setup.yml to install the pinned tensorboard",
                      file=sys.stderr, flush=True)
            else:
                # flushed at every logged step (scalars()), so status.yml always fetches the newest
                self.tb = SummaryWriter(log_dir=str(self.path.with_name("tensorboard")))

    def write(self, event, **fields):
        if self.file:
            self.file.write(json.dumps({"event": event, **fields, "time": time.time()}) + "\n")
            self.file.flush()

    def scalars(self, step, **values):
        """TensorBoard scalars at this step: {"train/loss": 2.3, ...}; None values are left out."""
        if self.tb is not None:
            for name, value in values.items():
                if value is not None:
                    self.tb.add_scalar(name, value, step)
            self.tb.flush()

    def plot(self, final=False):
        """Redraw out/plot.png: in the background at most every plot_every_s; final waits for it."""
        if not self.file:
            return
        import subprocess
        argv = [sys.executable, str(HERE / "dsfleet_plot.py"), str(self.path), str(self.path.with_name("plot.png"))]
        busy = self.plot_proc is not None and self.plot_proc.poll() is None
        if final:
            if busy:
                self.plot_proc.wait()
            try:
                done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                print("dsfleet-train: drawing plot.png took over 300 s; left it", file=sys.stderr, flush=True)
                return
            if done.returncode:
                print(f"dsfleet-train: plot.png not drawn: {done.stderr.strip()[-500:]}", file=sys.stderr, flush=True)
        elif self.plot_every_s and not busy and time.time() - self.plot_at >= self.plot_every_s:
            self.plot_at = time.time()
            # lowest CPU priority: on CPU ranks the drawing takes only what the ranks leave idle
            self.plot_proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              preexec_fn=lambda: os.nice(19))

    def progress(self, **fields):
        """out/progress.json: the newest progress in one small file, for the host's supervisor to report."""
        if self.file:
            path = self.path.with_name("progress.json")
            path.with_suffix(".tmp").write_text(json.dumps({**fields, "time": time.time()}))
            os.replace(path.with_suffix(".tmp"), path)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.file:
            self.file.close()
            self.file = None


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
    data, evaluation, token_cache = load_data(args, tokenizer, kind, where, getattr(config, "vocab_size", None) or
                                              len(tokenizer))
    mine = shard(range(data.n), rank, world_size)  # this rank's block indices (a range: nothing held per block)
    eval_mine = shard(range(evaluation.n), rank, world_size) if evaluation is not None else None
    if eval_mine is not None and len(eval_mine) < s["micro_batch"]:
        fail(f"the eval data gives each of {world_size} ranks {len(eval_mine)} blocks, fewer than one micro batch "
             f"of {s['micro_batch']}", "Pass a larger --eval_fraction or a larger --eval_dataset")
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

    import torch
    import torch.distributed as dist

    strategy = args.strategy
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # DeepSpeed's launcher sets LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE
    local_size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")
    if strategy == "deepspeed":
        import deepspeed
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
        from deepspeed.accelerator import get_accelerator
        device = torch.device(get_accelerator().device_name(local_rank))
        layout_kind = "deepspeed"
    else:
        check_torch_strategy(args, ds_config, s)
        device = T.device_for(local_rank)
        T.init_distributed(DIST_TIMEOUT_S, device)
        layout_kind = strategy + ("-" + args.fsdp_sharding if strategy == "fsdp" else "")
    out = Path(args.output_dir)
    ckpt_dir, export_dir = out / "checkpoint", out / "export"
    out.mkdir(parents=True, exist_ok=True)
    wrap = {}
    if strategy == "deepspeed":
        model, _zero3_config = build_model(kind, where, config, args.seed, s["precision"], ds_config,
                                           args.activation_checkpointing)
        wrapped = None
    else:
        def build(meta):  # fp32: the optimizer's master weights; 16-bit compute comes from the strategy
            return build_model(kind, where, config, args.seed, "fp32", None, args.activation_checkpointing,
                               meta=meta)[0]
        try:
            if strategy == "fsdp":
                model, wrap = T.build_fsdp(build, device, s["precision"], args.fsdp_sharding, local_size, rank)
                wrapped = model
            else:
                model, wrapped = T.build_ddp(build, device)
        except ValueError as e:
            fail(str(e), "Use -e strategy=deepspeed, or a model transformers builds with decoder layers")
    n_params = parameter_count(model)
    # what this rank holds right after building it: its ZeRO-3 partition under zero.Init or its FSDP shard, else
    # the whole model
    params_here = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else
                      p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    load_peak_rss_mib = peak_rss_mib()

    def agree(value, op):
        # every rank contributes; on the accelerator, since NCCL/RCCL/XCCL reduce only device tensors
        t = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=op)
        return t.item()

    def common_step(steps):
        """The newest step in every rank's ``steps`` (-1: none): MIN over ranks until it stops moving."""
        bound = float("inf")
        while True:
            found = int(agree(newest_at_most(steps, bound), dist.ReduceOp.MIN))
            if found < 0 or agree(found in steps, dist.ReduceOp.MIN) > 0:
                return found
            bound = found - 1 if found not in steps else found

    resume_tag = None
    if args.resume:
        # no shared filesystem: each host has its own shards; a tag written by another world is loaded from its
        # universal conversion (the launcher makes one when the hosts change; DeepSpeed only)
        exact = common_step(usable_steps(complete_layouts(ckpt_dir), rank, world_size, s["zero_stage"], layout_kind))
        universal = common_step(universal_steps(ckpt_dir)) if strategy == "deepspeed" else -1
        if exact >= 0 and exact >= universal:
            resume_tag = tag_for(exact)
        elif universal >= 0:
            resume_tag = universal_tag_for(universal)
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        else:
            print0(f"no checkpoint in {ckpt_dir} complete on every rank for {world_size} rank(s) ({layout_kind}); "
                   "starting from step 0")

    optimizer = scheduler = None
    groups = param_groups(model, s["weight_decay"] if s["has_optimizer"] else WEIGHT_DECAY)
    if strategy != "deepspeed":
        engine = T.TorchEngine(strategy, model, wrapped, torch_optimizer(groups, ds_config, args, device),
                               None, device, s["grad_accum"], float(ds_config.get("gradient_clipping") or 0),
                               s["precision"], rank, local_rank, args.fsdp_sharding if strategy == "fsdp" else None)
        engine.scheduler = torch.optim.lr_scheduler.LambdaLR(engine.optimizer, lr_lambda(args.warmup_steps, total_steps))
    else:
        if not s["has_optimizer"]:  # a hand-written config without an optimizer: client AdamW, no op to compile
            optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=BETAS)
        if not s["has_scheduler"]:
            def scheduler(opt):
                return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup_steps, total_steps))
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=None if optimizer else groups)

    start_step = 0
    if resume_tag:
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=resume_tag)
        start_step = int((client_state or {}).get("step", engine.global_steps))
        print0(f"resumed from {ckpt_dir / resume_tag} at step {start_step}"
               + (f" (universal checkpoint, now {world_size} rank(s))" if resume_tag.endswith("_universal") else ""))

    stop_requested = []
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.append(True))  # checkpoint at the next step, then exit
    heartbeat = out / "heartbeat" / f"rank-{rank}"
    heartbeat.parent.mkdir(parents=True, exist_ok=True)

    host_ranks = list(range(rank - local_rank, rank - local_rank + local_size))
    replicas = Replicas(args.replicas, rank) if local_rank == 0 else None

    def save(at_step, final=False):
        tag = tag_for(at_step)
        # universal_checkpoint_info lets ds_to_universal convert the tag when the world changes
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={
            "step": at_step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}})
        dist.barrier()  # every rank of every host has written its part
        if replicas is not None:
            mark_complete(ckpt_dir, tag, {"step": at_step, "world_size": world_size, "ranks": host_ranks,
                                          "zero_stage": s["zero_stage"], "strategy": layout_kind})
            prune(ckpt_dir, args.keep_checkpoints)
            replicas.send(tag, final)
        return tag

    orders = {}

    def get_batch(micro_index):
        """The micro batch at a global micro-step index: a pure function of (seed, index), so resume is exact."""
        epoch, k = divmod(micro_index, micro_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = epoch_order(len(mine), args.seed, epoch)
        mb = s["micro_batch"]
        return data.batch([mine[j] for j in orders[epoch][k * mb:(k + 1) * mb]])

    def forward(batch):
        x, y, mask = (None if t is None else t.to(engine.device) for t in batch)
        return engine(input_ids=x, labels=y, attention_mask=mask).loss

    def evaluate():
        """Eval loss (mean over every label token of the eval blocks, all ranks) and perplexity. Every rank runs
        the same number of micro batches (ZeRO-3 gathers parameters collectively)."""
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)
        mb = s["micro_batch"]
        with torch.no_grad():
            for k in range(len(eval_mine) // mb):
                batch = evaluation.batch(list(eval_mine[k * mb:(k + 1) * mb]))
                n = float((batch[1][:, 1:] != TK.IGNORE).sum())  # the shifted targets the loss averages over
                total += torch.tensor([forward(batch).item() * n, n], dtype=torch.float64, device=engine.device)
        dist.all_reduce(total)
        engine.train()
        value = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
        return value, math.exp(min(value, 700.0)), int(total[1].item())

    def reduce_sum(*values):
        # on the engine's device: NCCL/RCCL/XCCL reduce only device tensors (gloo takes CPU ones)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=engine.device)
        dist.all_reduce(t)
        return t.tolist()

    metrics = Metrics(out / "metrics.jsonl", enabled=rank == 0, tensorboard=not args.no_tensorboard,
                      plot_every_s=args.plot_every_s)
    metrics.write("start", world_size=world_size, strategy=strategy, **({"fsdp": {
                      "sharding": args.fsdp_sharding, **wrap}} if strategy == "fsdp" else {}),
                  model=args.model, params=n_params, block_size=args.block_size,
                  micro_batch=s["micro_batch"], grad_accum=s["grad_accum"], precision=s["precision"],
                  zero_stage=s["zero_stage"], start_step=start_step, total_steps=total_steps,
                  params_here=params_here,
                  activation_checkpointing=bool(getattr(model, "is_gradient_checkpointing", False)),
                  load_peak_rss_mib=load_peak_rss_mib, data_format=token_cache["format"], token_cache=token_cache,
                  eval_blocks=evaluation.n if evaluation is not None else 0)
    how = f"ZeRO {s['zero_stage']}" if strategy == "deepspeed" else layout_kind.upper().replace("-", " ")
    print0(f"training {args.model} ({n_params / 1e6:.2f}M params) on {world_size} rank(s): steps {start_step}..{total_steps}, "
           f"{s['precision']}, {how}, {data.n} blocks of {args.block_size} ({token_cache['format']})"
           + (f", {evaluation.n} held for eval" if evaluation is not None else ""))

    tokens_per_step = s["micro_batch"] * s["grad_accum"] * world_size * args.block_size
    first_loss = final_loss = None
    eval_result = None
    tag = None

    def run_eval(at_step):
        nonlocal eval_result
        loss, ppl, tokens = evaluate()
        eval_result = {"eval_loss": loss, "perplexity": ppl, "eval_tokens": tokens}
        metrics.write("eval", step=at_step, **eval_result)
        metrics.scalars(at_step, **{"eval/loss": loss, "eval/perplexity": ppl})
        print0(f"eval at step {at_step} | loss {loss:.4f} | perplexity {ppl:.2f} | {tokens:,} tokens")

    step = start_step
    try:
        engine.train()
        t0 = t_last = last_save = time.time()
        step_last = step
        while step < total_steps:
            lr = engine.get_lr()[0]
            loss_sum = 0.0
            for i in range(s["grad_accum"]):
                loss = forward(get_batch(step * s["grad_accum"] + i))
                engine.backward(loss)
                engine.step()
                loss_sum += loss.item()
            step += 1
            heartbeat.touch()  # the host's supervisor stops the run when no rank steps for stall_timeout
            logged = step == start_step + 1 or step == total_steps or (args.log_every and step % args.log_every == 0)
            due = step < total_steps and bool((args.save_every and step % args.save_every == 0) or (
                args.save_every_minutes and time.time() - last_save >= args.save_every_minutes * 60))
            # one all-reduce a step: the loss to log (summed over ranks), a SIGTERM on any rank, a checkpoint due
            # on any rank (the minutes are each rank's own clock)
            loss, stop, due = reduce_sum(loss_sum / s["grad_accum"] if logged else 0.0, bool(stop_requested), due)
            stop, due = stop > 0 and step < total_steps, due > 0
            if logged:
                loss /= world_size
                now = time.time()
                tps = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                first_loss = loss if first_loss is None else first_loss
                final_loss = loss
                norm = engine.get_global_grad_norm()  # the norm before clipping (None where nothing computed it)
                norm = float(norm) if norm is not None and math.isfinite(float(norm)) else None
                metrics.write("step", step=step, loss=loss, lr=lr, tokens_per_s=tps, elapsed_s=now - t0,
                              **({"grad_norm": norm} if norm is not None else {}))
                metrics.scalars(step, **{"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tps,
                                         "train/grad_norm": norm})
                metrics.plot()
                metrics.progress(event="step", step=step, total=total_steps, start_step=start_step, loss=loss, lr=lr,
                                 tokens_per_s=tps, elapsed_s=now - t0)
                print0(f"step {step}/{total_steps} | loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s")
            if evaluation is not None and args.eval_every and step % args.eval_every == 0 and step < total_steps:
                run_eval(step)
            if step < total_steps:
                if stop or due:
                    tag = save(step, final=stop)
                    last_save = time.time()
                if stop:
                    metrics.plot(final=True)
                    metrics.write("stopped", step=step, checkpoint_tag=tag, checkpoint_dir=str(ckpt_dir.resolve()))
                    metrics.progress(event="stopped", step=step, total=total_steps, start_step=start_step,
                                     loss=final_loss, elapsed_s=time.time() - t0, checkpoint_tag=tag)
                    metrics.close()
                    print0(f"stopped at step {step} on SIGTERM; checkpoint {tag} (resume continues from it)")
                    if replicas is not None:
                        replicas.wait(REPLICA_WAIT_S)
                    exit_now(143)
        elapsed = time.time() - t0
        if evaluation is not None:
            run_eval(step)

        tag = save(step, final=True)
        export(engine, tokenizer, export_dir, s["zero_stage"], rank)
        if replicas is not None:
            replicas.wait(REPLICA_WAIT_S)
        dist.barrier()
    except Exception as e:
        metrics.write("error", error=f"{type(e).__name__}: {e}")
        metrics.plot(final=True)
        metrics.close()
        raise
    metrics.plot(final=True)
    metrics.write("end", steps=step, first_loss=first_loss, final_loss=final_loss,
                  tokens_per_s=tokens_per_step * (step - start_step) / max(elapsed, 1e-9),
                  checkpoint_dir=str(ckpt_dir.resolve()), checkpoint_tag=tag, export_dir=str(export_dir.resolve()),
                  elapsed_s=elapsed, peak_rss_mib=peak_rss_mib(), **(eval_result or {}))
    metrics.progress(event="end", step=step, total=total_steps, start_step=start_step, loss=final_loss,
                     elapsed_s=elapsed, tokens_per_s=tokens_per_step * (step - start_step) / max(elapsed, 1e-9))
    metrics.close()
    print0(f"done: {step} steps in {elapsed:.1f}s, loss {first_loss} -> {final_loss}; export in {export_dir}")


def param_groups(model, weight_decay):
    """Two optimizer groups: matrices decay by ``weight_decay``, norms and biases do not (whichever optimizer
    steps them: torch's AdamW, or DeepSpeed's CPU Adam when the optimizer states are offloaded)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def export(engine, tokenizer, export_dir, zero_stage, rank):
    """save_pretrained on rank 0; under ZeRO-3 and FSDP every rank first helps gather the full weights. FSDP and
    DDP keep fp32 master weights: the export is in the training precision, as DeepSpeed's is."""
    if isinstance(engine, T.TorchEngine):
        import torch
        state_dict = engine.full_state_dict()
        if rank != 0:
            return
        state_dict = state_dict if state_dict is not None else engine.module.state_dict()
        dtype = getattr(torch, T.DTYPES.get(engine.precision, "float32"))
        state_dict = {k: v.detach().to("cpu", dtype=dtype) if v.is_floating_point() else v.cpu()
                      for k, v in state_dict.items()}
        save_pretrained_dir(engine.module, tokenizer, export_dir, state_dict)
        # save_pretrained names the module's dtype (fp32 master weights); the files hold the training precision
        config_file = Path(export_dir) / "config.json"
        written = json.loads(config_file.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in written:
                written[key] = str(dtype).replace("torch.", "")
        config_file.write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
        return
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank != 0:
        return
    save_pretrained_dir(engine.module, tokenizer, export_dir, state_dict)  # export_hf.py writes the same way


def check_torch_strategy(args, ds_config, s):
    """What a hand-written config may hold that FSDP and DDP cannot honour: ZeRO, offload, a DeepSpeed scheduler."""
    if s["zero_stage"] or ds_config.get("zero_optimization", {}).get("offload_optimizer"):
        fail(f"--strategy {args.strategy} with zero_optimization (stage {s['zero_stage']}) in the config: ZeRO is "
             "DeepSpeed's", "Set \"zero_optimization\": {\"stage\": 0} (FSDP shards by --fsdp_sharding), or use "
             "--strategy deepspeed")
    if s["has_scheduler"]:
        fail(f"--strategy {args.strategy} with a \"scheduler\" section: DeepSpeed's schedulers run only in its engine",
             "Drop the scheduler section (the linear warmup/decay of --warmup_steps is used), or use --strategy deepspeed")
    optimizer = ds_config.get("optimizer")
    if optimizer and optimizer.get("type", "").lower() not in ("adamw", "adam"):
        fail(f"--strategy {args.strategy} with optimizer {optimizer.get('type')}: only AdamW is built for it",
             "Set \"optimizer\": {\"type\": \"AdamW\", ...}, or use --strategy deepspeed")


def torch_optimizer(groups, ds_config, args, device):
    """torch's AdamW with the config's settings (the plan's lr, betas, eps; weight decay per group), fused where
    this torch fuses it for the device (CUDA, XPU, CPU since 2.4), which updates in place."""
    import torch
    params = dict((ds_config.get("optimizer") or {}).get("params") or {})
    lr = params.get("lr", args.lr)
    kwargs = {"lr": lr if isinstance(lr, (int, float)) else args.lr, "betas": tuple(params.get("betas", BETAS)),
              "eps": params.get("eps", 1e-8)}
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


REPLICA_WAIT_S = 300  # at the end (or a stop) the last checkpoint's copy to the next host may take this long


class Replicas:
    """Sends each complete tag's files of this host to the next host, in the background (dsfleet_node.py
    replicate); at most one copy at a time: a tag due while the last copy still runs is skipped (the next one
    supersedes it)."""

    def __init__(self, path, rank):
        self.argv, self.proc, self.tag = None, None, None
        if path:
            entries = json.loads(Path(path).read_text())
            mine = [e for e in entries if rank in e["ranks"]]
            self.argv = mine[0]["argv"] if mine and mine[0].get("argv") else None

    def send(self, tag, final=False):
        import subprocess
        if self.argv is None:
            return
        if final:  # the last tag of this process is always copied
            self.wait(REPLICA_WAIT_S)
        if self.proc is not None and self.proc.poll() is None:
            print(f"dsfleet-train: the copy of {self.tag} to the next host still runs; {tag} is not copied",
                  file=sys.stderr, flush=True)
            return
        self.proc, self.tag = subprocess.Popen(self.argv + ["--tag", tag], stdin=subprocess.DEVNULL), tag

    def wait(self, timeout):
        import subprocess
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"dsfleet-train: the copy of {self.tag} to the next host took over {timeout}s; left it",
                  file=sys.stderr, flush=True)


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
