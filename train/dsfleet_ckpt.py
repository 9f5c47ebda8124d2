"""Checkpoint bookkeeping on one host's disk (torch-free; the unit tests import it directly).

There is no shared filesystem: each host keeps its own ranks' shards under OUTPUT_DIR/checkpoint/<tag>/, and a tag
counts as complete on a host only once every rank there has finished writing it (the host's local rank 0 then
writes <tag>/.dsfleet-complete after a barrier). On resume every rank looks for the newest complete tag on its own
disk; the ranks agree on the newest tag complete everywhere.
"""
import re
import shutil
from pathlib import Path

MARKER = ".dsfleet-complete"
TAG = re.compile(r"global_step(\d+)")


def tag_for(step):
    return f"global_step{step}"


def mark_complete(ckpt_dir, tag):
    (Path(ckpt_dir) / tag / MARKER).write_text(tag + "\n")


def complete_steps(ckpt_dir):
    """Steps of the complete checkpoints on this disk, oldest first."""
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return []
    steps = []
    for child in folder.iterdir():
        match = TAG.fullmatch(child.name)
        if match and child.is_dir() and (child / MARKER).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def prune(ckpt_dir, keep):
    """Delete all but the newest ``keep`` complete checkpoints (and incomplete ones older than the newest kept).
    Returns the tags removed."""
    steps = complete_steps(ckpt_dir)
    if keep <= 0 or len(steps) <= keep:
        return []
    oldest_kept = steps[-keep]
    removed = []
    for child in sorted(Path(ckpt_dir).iterdir()):
        match = TAG.fullmatch(child.name)
        if match and child.is_dir() and int(match.group(1)) < oldest_kept:
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed
