"""
The run's plot: loss (train and eval), learning rate and tokens/s against the step, drawn from metrics.jsonl
into one PNG (matplotlib, headless). Rank 0 of train.py runs it in a child process while training (at most
every --plot_every_s seconds, so a step never waits on it) and once more at the end; it reads only metrics.jsonl,
so it can be run by hand on any copy of a run:

    python train/dsfleet_plot.py runs/<id>/metrics.jsonl runs/<id>/plot.png

A resumed run appends to the same metrics.jsonl: each step is drawn once, with its newest value.
"""
import json
import os
import sys
from pathlib import Path


def series(lines):
    """{'loss', 'lr', 'tokens_per_s', 'grad_norm', 'eval_loss'}: each a sorted list of (step, value), one per step
    (the newest record of a step wins, as after a resume from an earlier checkpoint)."""
    out = {k: {} for k in ("loss", "lr", "tokens_per_s", "grad_norm", "eval_loss")}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written as we read
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            continue
        if rec.get("event") == "step":
            for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
                if isinstance(rec.get(key), (int, float)):
                    out[key][rec["step"]] = float(rec[key])
        elif rec.get("event") == "eval" and isinstance(rec.get("eval_loss"), (int, float)):
            out["eval_loss"][rec["step"]] = float(rec["eval_loss"])
    return {k: sorted(v.items()) for k, v in out.items()}


def render(metrics_path, png_path, title=None):
    """Draw metrics_path into png_path (written whole: a temporary file renamed over it). Returns the number of
    train steps drawn; 0 draws nothing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = series(Path(metrics_path).read_text(encoding="utf-8", errors="replace").splitlines())
    if not s["loss"]:
        return 0
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True, constrained_layout=True)
    ax = axes[0]
    ax.plot(*zip(*s["loss"]), label="train loss", color="tab:blue", linewidth=1.2)
    if s["eval_loss"]:
        ax.plot(*zip(*s["eval_loss"]), label="eval loss", color="tab:orange", marker="o", markersize=4)
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    if s["lr"]:
        axes[1].plot(*zip(*s["lr"]), color="tab:green", linewidth=1.2)
    axes[1].set_ylabel("learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    axes[1].grid(alpha=0.3)
    if s["tokens_per_s"]:
        axes[2].plot(*zip(*s["tokens_per_s"]), color="tab:purple", linewidth=1.2)
    axes[2].set_ylabel("tokens/s (all ranks)")
    axes[2].set_xlabel("step")
    axes[2].grid(alpha=0.3)
    last_step, last_loss = s["loss"][-1]
    run = Path(metrics_path).resolve().parent
    run = run.parent if run.name == "out" else run  # a host keeps <run>/out/metrics.jsonl
    fig.suptitle(title or f"{run.name}: step {last_step}, loss {last_loss:.4f}")
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.{os.getpid()}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return len(s["loss"])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3):
        print("usage: dsfleet_plot.py METRICS_JSONL OUT_PNG [TITLE]", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file():
        print(f"dsfleet-plot: error: {argv[0]} is not a file. Pass a run's metrics.jsonl", file=sys.stderr)
        return 2
    render(*argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
