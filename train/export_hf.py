"""
A Hugging Face model directory (safetensors, config, tokenizer) from a DeepSpeed checkpoint of any ZeRO stage, or
from train.py's FSDP shards or DDP state (--strategy fsdp|ddp).

    python train/export_hf.py --checkpoint OUT/checkpoint --tag global_step200 --model tiny --output DIR

--checkpoint is a folder holding <tag>/ with every rank's files in one place (playbooks/export.yml gathers them
there from the hosts first: there is no shared filesystem). The fp32 master weights are rebuilt from the ZeRO
partitions with DeepSpeed's zero_to_fp32, put into the model built from --model's config (a preset name or a
model directory, as train.py takes it), written with save_pretrained, then loaded back with
AutoModelForCausalLM.from_pretrained and compared tensor for tensor. Prints one JSON line
{"ok", "output", "tag", "params", "dtype", "files"} and exits 0; bad input exits 2 with one line on stderr.

The end of a training run writes its export with the same save_pretrained_dir (train.py).
"""
import argparse
import inspect
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from dsfleet_config import UsageError, fail  # noqa: E402
from dsfleet_data import resolve_model  # noqa: E402


def save_pretrained_dir(module, tokenizer, output, state_dict=None):
    """save_pretrained (safetensors) and the tokenizer: what AutoModelForCausalLM.from_pretrained loads."""
    extra = {"safe_serialization": True} if "safe_serialization" in inspect.signature(module.save_pretrained).parameters else {}
    module.save_pretrained(str(output), state_dict=state_dict, **extra)  # transformers 5 always writes safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(str(output))


def export(checkpoint, tag, model, output, dtype="fp32"):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, where = resolve_model(model)
    if kind == "hub":
        fail(f"--model {model} is a hub id; the export needs the model's config and tokenizer on disk",
             "Pass the local model directory the run trained from")
    if not (Path(checkpoint) / tag).is_dir():
        fail(f"checkpoint {Path(checkpoint) / tag} does not exist", "Pass --checkpoint DIR holding the tag folder")
    config = AutoConfig.from_pretrained(where)
    tokenizer = AutoTokenizer.from_pretrained(where)
    import dsfleet_torch
    try:
        state = dsfleet_torch.full_weights(Path(checkpoint) / tag)  # an FSDP or DDP tag (train.py --strategy)
        if state is None:
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    except (ValueError, FileNotFoundError, AssertionError) as e:
        fail(f"cannot rebuild the weights from {Path(checkpoint) / tag}: {e}",
             "Every rank's *_optim_states.pt (FSDP: fsdp_rank_*.pt) must be in that folder (playbooks/export.yml "
             "gathers them)")
    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    module = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = set(getattr(module, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        fail(f"the checkpoint does not match the model {model}: missing {missing[:5]}, unexpected {unexpected[:5]}",
             "Export with the --model the run trained")
    module = module.to(target)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained_dir(module, tokenizer, out)
    # verify: what from_pretrained loads is what was written, tensor for tensor
    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=target)
    theirs = back.state_dict()
    for name, tensor in module.state_dict().items():
        if name not in theirs or not torch.equal(theirs[name], tensor):
            fail(f"{out} does not load back as written ({name} differs)", "Check the disk; export again")
    return {"ok": True, "output": str(out.resolve()), "tag": tag, "params": sum(p.numel() for p in module.parameters()),
            "dtype": dtype, "files": sorted(os.listdir(out))}


def main(argv=None):
    p = argparse.ArgumentParser(prog="dsfleet-export", description=__doc__.strip().splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="folder holding <tag>/ with every rank's files")
    p.add_argument("--tag", required=True, help="e.g. global_step200")
    p.add_argument("--model", required=True, help="the preset name or model directory the run trained")
    p.add_argument("--output", required=True, help="the Hugging Face directory to write")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = p.parse_args(argv)
    try:
        print(json.dumps(export(args.checkpoint, args.tag, args.model, args.output, args.dtype)), flush=True)
    except UsageError as e:
        print(f"dsfleet-export: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
