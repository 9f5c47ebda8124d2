"""Checkpoint bookkeeping on one host's disk (stdlib only: the unit tests and the host supervisor import it too).

There is no shared filesystem: each host keeps its own ranks' shards under OUTPUT_DIR/checkpoint/<tag>/, and a tag
counts as complete on a host only once every rank there has finished writing it (the host's local rank 0 then
writes <tag>/.dsfleet-complete after a barrier). The marker records the layout that wrote the tag: world size, the
global ranks whose shards this host holds, the ZeRO stage. On resume every rank looks for the newest complete tag
on its own disk; the ranks agree on the newest tag complete everywhere.

A host's shards die with its disk, so after each complete tag the host sends a copy of its own files to the next
host of the plan (OUTPUT_DIR/checkpoint-replicas/<from host>/<tag>/ there). When the world changes (a host gone,
one added, other slots) the launcher gathers one copy of every rank's files on the new master, converts them with
DeepSpeed's ds_to_universal into OUTPUT_DIR/checkpoint/<tag>_universal/ and ships that to every host; a rank then
loads it with ``checkpoint.load_universal`` at any world size.
"""
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

MARKER = ".dsfleet-complete"
TAG = re.compile(r"global_step(\d+)")
UNIVERSAL = re.compile(r"global_step(\d+)_universal")
REPLICAS = "checkpoint-replicas"       # beside checkpoint/ in the output dir
# DeepSpeed's ZeRO partitions, and train.py's FSDP shards (dsfleet_torch.py)
RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_.*\.pt|fsdp_rank_(\d+)\.pt")


def tag_for(step):
    return f"global_step{step}"


def universal_tag_for(step):
    return f"global_step{step}_universal"


def mark_complete(ckpt_dir, tag, layout=None):
    """Mark ``tag`` complete on this disk; ``layout`` is {"world_size", "ranks", "zero_stage", ...}."""
    (Path(ckpt_dir) / tag / MARKER).write_text(json.dumps({"tag": tag, **(layout or {})}) + "\n")


def read_marker(tag_dir):
    """The marker of a tag folder as a dict, or None if the tag is not complete (old plain-text markers: {"tag"})."""
    try:
        text = (Path(tag_dir) / MARKER).read_text()
    except OSError:
        return None
    try:
        found = json.loads(text)
        return found if isinstance(found, dict) else {"tag": text.strip()}
    except ValueError:
        return {"tag": text.strip()}


def _complete(folder, pattern):
    found = {}
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for child in folder.iterdir():
        match = pattern.fullmatch(child.name)
        if match and child.is_dir():
            marker = read_marker(child)
            if marker is not None:
                found[int(match.group(1))] = marker
    return dict(sorted(found.items()))


def complete_steps(ckpt_dir):
    """Steps of the complete checkpoints on this disk, oldest first."""
    return list(_complete(ckpt_dir, TAG))


def complete_layouts(ckpt_dir):
    """{step: marker} of the complete checkpoints on this disk, oldest first."""
    return _complete(ckpt_dir, TAG)


def universal_steps(ckpt_dir):
    """Steps of the complete universal checkpoints on this disk, oldest first."""
    return list(_complete(ckpt_dir, UNIVERSAL))


def usable_steps(layouts, rank, world_size, zero_stage, strategy="deepspeed"):
    """Steps this rank can load as they are: written by the same world, strategy (``deepspeed``, ``fsdp-full``,
    ``fsdp-hybrid``, ``ddp``: train.py's layout kind) and ZeRO stage, with its shard here. A marker without a
    layout (older dsfleet) is trusted; one without a strategy was written by DeepSpeed."""
    return [step for step, m in layouts.items()
            if "world_size" not in m or (m["world_size"] == world_size and rank in m.get("ranks", [])
                                         and m.get("zero_stage", zero_stage) == zero_stage
                                         and m.get("strategy", "deepspeed") == strategy)]


def newest_at_most(steps, bound):
    """The newest of ``steps`` not after ``bound`` (-1: none). The ranks agree on a common step by repeating
    MIN over ranks of this until it stops moving."""
    below = [s for s in steps if s <= bound]
    return max(below) if below else -1


def rank_of_file(name):
    """The data-parallel rank a checkpoint file belongs to, or None for a file every rank shares."""
    match = RANK_FILE.fullmatch(name)
    return int(match.group(1) or match.group(2)) if match else None


def prune(ckpt_dir, keep):
    """Delete all but the newest ``keep`` complete checkpoints (and incomplete or universal ones older than the
    newest kept). Returns the tags removed."""
    steps = complete_steps(ckpt_dir)
    if keep <= 0 or len(steps) <= keep:
        return []
    oldest_kept = steps[-keep]
    removed = []
    for child in sorted(Path(ckpt_dir).iterdir()):
        match = TAG.fullmatch(child.name) or UNIVERSAL.fullmatch(child.name)
        if match and child.is_dir() and int(match.group(1)) < oldest_kept:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def listing(out_dir):
    """What this host holds for a resume, as JSON-able data:
    {"complete": [steps], "layouts": {step: marker}, "universal": [steps], "replicas": {host: {step: marker}}}."""
    out = Path(out_dir)
    layouts = complete_layouts(out / "checkpoint")
    replicas = {}
    if (out / REPLICAS).is_dir():
        for host in sorted((out / REPLICAS).iterdir()):
            found = _complete(host, TAG)
            if found:
                replicas[host.name] = {str(k): v for k, v in found.items()}
    return {"complete": list(layouts), "layouts": {str(k): v for k, v in layouts.items()},
            "universal": universal_steps(out / "checkpoint"), "replicas": replicas}


def tag_dir(out_dir, step, holder=None):
    """Where a host keeps a tag: its own (holder None) or the replica it received from ``holder``."""
    out = Path(out_dir)
    return out / "checkpoint" / tag_for(step) if holder is None else out / REPLICAS / holder / tag_for(step)


def write_tar(stream, folder, names, arcdir):
    """Stream ``names`` of ``folder`` (and its marker, last: it completes the copy) as a tar under ``arcdir``."""
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for name in names:
            tar.add(os.path.join(folder, name), arcname=f"{arcdir}/{name}")


def _safe_members(tar, root):
    root = os.path.realpath(root)
    for member in tar:
        target = os.path.realpath(os.path.join(root, member.name))
        if not (member.isfile() or member.isdir()) or not target.startswith(root + os.sep):
            raise ValueError(f"refusing tar member {member.name!r}")
        yield member


def read_tar(stream, dest_parent, arcdir):
    """Unpack a stream from write_tar into dest_parent/arcdir atomically: into a .partial folder, renamed when
    complete (an interrupted copy leaves no folder that looks complete)."""
    dest_parent = Path(dest_parent)
    dest_parent.mkdir(parents=True, exist_ok=True)
    partial = dest_parent / (arcdir + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in _safe_members(tar, str(partial)):
            member.name = member.name.split("/", 1)[1] if "/" in member.name else member.name
            if member.isfile():
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extract(member, str(partial), set_attrs=False, **extra)
    final = dest_parent / arcdir
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    return final
