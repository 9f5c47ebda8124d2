"""The DeepSpeed config as the training module reads it, and the client learning-rate schedule.

Torch-free (stdlib only): the unit tests import it directly. train/train.py re-exports everything here.
"""
import json
from pathlib import Path

MIN_LR_RATIO = 0.1         # client schedule decays linearly to LR * MIN_LR_RATIO at the last step
AUTO_FILLABLE = {"train_batch_size", "optimizer.params.lr", "scheduler.params.warmup_max_lr",
                 "scheduler.params.warmup_min_lr", "scheduler.params.warmup_num_steps",
                 "scheduler.params.total_num_steps"}


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2, no traceback."""


def fail(what, fix):
    raise UsageError(f"{what}. {fix}")



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
                "has_optimizer": "optimizer" in cfg, "has_scheduler": "scheduler" in cfg,
                "weight_decay": _section(cfg.get("optimizer", {}), "params").get("weight_decay", 0.0)}
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



def lr_lambda(warmup_steps, total_steps):
    """Client schedule: linear warmup to 1, then linear decay to MIN_LR_RATIO at the last step."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
        return max(MIN_LR_RATIO, 1.0 - (1.0 - MIN_LR_RATIO) * progress)
    return factor


