"""The one knob spec: every name a user may set, its type, default, allowed values and meaning.

Knobs are passed with ``-e name=value`` or set in the inventory (``group_vars/all/``; the host knobs in
``host_vars/<host>``). Everything that reads or documents them reads this table:

- ``normalize(values)`` types and range-checks the run knobs for the planner (``plan.make_plan``);
- ``check_user_vars(...)`` is run by ``action_plugins/dsfleet_check_vars.py`` at the start of every play book and
  turns a misspelt or unknown name, from the command line or the inventory, into an error naming the closest
  known one, and a value of the wrong type (``-e dry_run=ture``) into an error naming the type;
- ``readme_table()`` and ``example_group_vars()`` generate the README's knob table and
  ``inventory/example/group_vars/all/dsfleet.yml`` (``tools/gen_docs.py``; a unit test fails when they drift).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
import textwrap
from dataclasses import dataclass

from . import PlanError

GROUPS = (
    ("train", "What to train"),
    ("deepspeed", "How the ranks share the model (DeepSpeed, FSDP, DDP)"),
    ("hosts", "Which hosts and devices"),
    ("run", "How the run is started and watched"),
    ("export", "Exporting a checkpoint (playbooks/export.yml)"),
    ("infer", "Inference (playbooks/infer.yml)"),
    ("host", "Per-host variables"),
)
TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", list: "a list (or a,b,c)",
              dict: "a mapping", str: "a string"}
# Names that belong to Ansible itself or to the test harness that drives playbooks (molecule), never to dsfleet.
FOREIGN_PREFIXES = ("ansible_", "molecule_")
# Set by Ansible's inventory itself on every host, or magic variables: never the user's.
ANSIBLE_NAMES = frozenset({"inventory_dir", "inventory_file", "inventory_hostname", "inventory_hostname_short",
                           "group_names", "groups", "hostvars", "omit", "playbook_dir", "role_path"})
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Knob:
    name: str
    kind: type
    default: object
    group: str
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    scope: str = "run"          # "run": one value for the whole run; "host": per host
    shown: str | None = None    # the default as the README shows it, when the value itself says little

    @property
    def default_text(self):
        if self.shown is not None:
            return self.shown
        return json.dumps(self.default) if not isinstance(self.default, str) else self.default


KNOB_LIST = (
    Knob("model", str, "tiny", "train", "`tiny` (bundled preset: small Llama config, random init, offline "
         "tokenizer), a local model directory, or a hub id (`org/name`); for `infer.yml` also a run id (its "
         "export)"),
    Knob("model_revision", str, "main", "train", "hub models: the branch, tag or commit to download; the master "
         "downloads it once (with the controller's `HF_TOKEN`/`HF_ENDPOINT`) and ships it to the other hosts"),
    Knob("dataset", str, "bundled", "train", "`bundled` (train/data/corpus.txt, CC0), a "
         "`.txt`/`.jsonl`/`.json`/`.csv`/`.parquet` file, a `datasets` directory or name"),
    Knob("text_field", str, "text", "train", "field holding the text in jsonl/datasets records"),
    Knob("data_format", str, "auto", "train", "`text`: documents packed into blocks; `instruction`: prompt/response "
         "records, loss on the response only, one example per block; `chat`: a list of {role, content} messages "
         "rendered with the tokenizer's chat template, loss on the assistant turns; `auto`: from the first record",
         choices=("auto", "text", "instruction", "chat")),
    Knob("prompt_field", str, "prompt", "train", "instruction data: the prompt field"),
    Knob("response_field", str, "response", "train", "instruction data: the response field"),
    Knob("messages_field", str, "messages", "train", "chat data: the field holding the list of messages"),
    Knob("eval_fraction", float, 0.0, "train", "hold out this fraction of the blocks (the last ones) for eval loss "
         "and perplexity (0: none)", minimum=0, maximum=0.5),
    Knob("eval_dataset", str, "", "train", "eval on this dataset instead (same kinds and formats as `dataset`)",
         shown="none"),
    Knob("eval_every", int, 0, "train", "eval every N steps as well as at the end (0: at the end)", minimum=0),
    Knob("max_steps", int, 50, "train", "optimizer steps", minimum=1),
    Knob("epochs", int, 0, "train", "stop after this many epochs as well (0: only `max_steps`)", minimum=0),
    Knob("block_size", int, 128, "train", "tokens per packed training block", minimum=8),
    Knob("micro_batch", int, 4, "train", "`train_micro_batch_size_per_gpu`; unset: 4, or with `global_batch` the "
         "largest that fits the smallest device", minimum=1, shown="auto (4)"),
    Knob("grad_accum", int, 1, "train", "`gradient_accumulation_steps` (global batch = micro x accum x world size)",
         minimum=1),
    Knob("global_batch", int, 0, "train", "sequences per optimizer step over all ranks: the plan picks the largest "
         "micro batch that fits and the accumulation that reaches it (0: micro x accum x world size)", minimum=0),
    Knob("activation_checkpointing", bool, False, "train", "recompute each layer's activations in the backward "
         "pass; unset: only when nothing fits without it", shown="auto (false)"),
    Knob("lr", float, 3e-4, "train", "peak learning rate (AdamW, linear warmup then linear decay to 10%)",
         minimum=0.0),
    Knob("warmup_steps", int, 0, "train", "linear warmup steps", minimum=0),
    Knob("seed", int, 1234, "train", "model init and data order; `infer.yml`: the sampling seed"),
    Knob("log_every", int, 1, "train", "rank 0 writes a metrics line (and TensorBoard scalars) every N steps",
         minimum=1),
    Knob("plot_every_s", float, 60.0, "train", "rank 0 redraws plot.png (loss, eval loss, lr, tokens/s) at most this "
         "often while training, and always at the end; `status.yml` and the end of the run bring it, metrics.jsonl and "
         "the TensorBoard events to `runs/<id>/` (0: only at the end)", minimum=0.0),
    Knob("save_every", int, 0, "train", "intermediate checkpoints every N steps (0: only at the end)", minimum=0),
    Knob("save_every_minutes", float, 30.0, "train", "also checkpoint whenever this many minutes passed since the "
         "last checkpoint (0: off); a rank that gets SIGTERM checkpoints too", minimum=0.0),
    Knob("keep_checkpoints", int, 2, "train", "complete checkpoints kept on each host (0: all)", minimum=0),
    Knob("resume", str, "", "train", "a run id: continue that run from its newest checkpoint (same layout: exactly "
         "where it stopped; a host gone or added, other slots: through a universal checkpoint gathered from the "
         "hosts' shards and their copies)", shown="none"),
    Knob("strategy", str, "deepspeed", "deepspeed", "`deepspeed`: DeepSpeed's engine and ZeRO; `fsdp`: torch's FSDP2 "
         "(`fully_shard` per decoder layer); `ddp`: torch's DistributedDataParallel, for models that fit whole on "
         "each device (the plan refuses it otherwise). fsdp and ddp start with `torchrun` on every host",
         choices=("deepspeed", "fsdp", "ddp")),
    Knob("fsdp_sharding", str, "auto", "deepspeed", "strategy=fsdp: `full` shards over every rank; `hybrid` within "
         "each host, replicated across hosts (less traffic between hosts; needs the same ranks on every host); "
         "`auto`: hybrid when the model fits one host's shards, else full", choices=("auto", "full", "hybrid")),
    Knob("zero_stage", int, 2, "deepspeed", "ZeRO stage; unset: the least sharded that fits the model on the "
         "smallest device (2, then 3; CPU ranks: 2; 2 when the model is not sized)", choices=(0, 1, 2, 3), shown="auto (2)"),
    Knob("offload", str, "none", "deepspeed", "`cpu`: optimizer states on the CPU (DeepSpeed's CPU Adam, same "
         "AdamW settings as without offload); unset: only when nothing fits without it", choices=("none", "cpu"),
         shown="auto (none)"),
    Knob("precision", str, "auto", "deepspeed", "`auto`: bf16 if every chosen device supports it, else fp16 on "
         "GPUs / fp32 on CPUs", choices=("auto", "bf16", "fp16", "fp32")),
    Knob("accelerator", str, "auto", "hosts", "`auto`: the vendor group with the most accelerator memory",
         choices=("auto", "nvidia", "amd", "intel", "cpu")),
    Knob("cpu_ranks", int, 2, "hosts", "ranks per CPU-only host", minimum=1),
    Knob("exclude", list, [], "hosts", "host names to leave out (`-e exclude=a,b`)"),
    Knob("use_all_devices", bool, False, "hosts", "keep every device; `false`: the plan leaves out the devices "
         "with which the model does not fit or whose inclusion lowers the estimated tokens/s (every step waits for "
         "the slowest), and names them and why"),
    Knob("require_all_hosts", bool, True, "hosts", "fail if a host is unreachable; `false`: leave it out and "
         "say so"),
    Knob("master", str, "", "hosts", "host for rank 0 (checkpoints and the export are written there)",
         shown="first host"),
    Knob("master_port", int, 29500, "hosts", "rendezvous port (checked free before launch)", minimum=1024,
         maximum=65535),
    Knob("extra_env", dict, {}, "hosts", "extra environment for every rank, e.g. "
         "`-e '{\"extra_env\": {\"NCCL_DEBUG\": \"INFO\"}}'`"),
    Knob("launcher", str, "ansible", "run", "`ansible`: Ansible starts each host's ranks as DeepSpeed's node "
         "launcher would (what `deepspeed --no_ssh --node_rank N` runs, through `train/node_launch.py`: launch.py's "
         "arguments and environment without its imports of deepspeed and torch; fsdp, ddp: `torchrun --node_rank "
         "N`) on every host and watches each; `pdsh`: DeepSpeed's own multi-node runner from the master (strategy=deepspeed); `slurm`: an sbatch script rendered from the plan "
         "(`runs/<id>/job.sbatch`), submitted on the master and followed with `squeue`; each node's step runs what "
         "the ansible launcher runs there",
         choices=("ansible", "pdsh", "slurm")),
    Knob("slurm_submit", bool, True, "run", "launcher=slurm: submit the job; `false`: only render "
         "`runs/<id>/job.sbatch` (it carries the code: `sbatch job.sbatch` on any SLURM node submits it)"),
    Knob("slurm_partition", str, "", "run", "launcher=slurm: `--partition`", shown="the cluster's default"),
    Knob("slurm_account", str, "", "run", "launcher=slurm: `--account`", shown="none"),
    Knob("slurm_time", str, "", "run", "launcher=slurm: `--time` limit (`HH:MM:SS`, `D-HH:MM:SS`); the ranks get "
         "SIGTERM and checkpoint before SLURM kills them", shown="the partition's"),
    Knob("slurm_options", list, [], "run", "launcher=slurm: more `sbatch` options, one `--name=value` each "
         "(e.g. `--qos=high`)"),
    Knob("follow", bool, True, "run", "follow the run until it ends; `false`: return once every host's ranks started "
         "(then `playbooks/status.yml`, `follow.yml`, `stop.yml` with `-e run_id=...`)"),
    Knob("poll_interval", int, 5, "run", "seconds between progress lines", minimum=0),
    Knob("stall_timeout", int, 300, "run", "no new step for this long: stop every rank and fail (catches a hung "
         "rank)", minimum=10),
    Knob("startup_timeout", int, 600, "run", "no first step within this long: stop and fail", minimum=10),
    Knob("stop_grace", int, 10, "run", "seconds a rank may take to exit after SIGTERM before it is killed",
         minimum=0),
    Knob("checkpoint", bool, True, "run", "`stop.yml`: let every rank write a checkpoint before it exits "
         "(`false`: stop at once)"),
    Knob("checkpoint_grace", int, 300, "run", "seconds `stop.yml` waits for that checkpoint before it kills the ranks",
         minimum=10),
    Knob("run_id", str, "", "run", "name of `runs/<id>` (letters, digits, `.`, `_`, `-`); a finished run id "
         "is not trained again", shown="timestamp"),
    Knob("dry_run", bool, False, "run", "compute and render the plan, start nothing"),
    Knob("other_vars", list, [], "run", "inventory variables that belong to other projects (names or "
         "`prefix*`), which dsfleet then does not report as unknown"),
    Knob("step", int, 0, "export", "the checkpoint step to export (0: the newest one whose every rank's shards are "
         "found on the hosts, their own or a copy; `infer.yml` with a run id: that step's export)", minimum=0),
    Knob("export_to", str, "controller", "export", "`controller`: fetch the Hugging Face directory into "
         "`runs/<id>/export-global_step<N>/`; `host`: leave it on the host that gathered the shards (the master)",
         choices=("controller", "host")),
    Knob("prompt", str, "", "infer", "one prompt to complete", shown="none"),
    Knob("prompts", str, "", "infer", "a JSON lines file on the controller, one prompt per line, in the "
         "`prompt_field` (a string) or `messages` (a chat, a list of {role, content}); split across hosts and "
         "replicas, results in input order", shown="none"),
    Knob("prompt_field", str, "prompt", "infer", "field of each `prompts` line holding the prompt text"),
    Knob("max_new_tokens", int, 64, "infer", "tokens generated per prompt at most (fewer when EOS comes)",
         minimum=1),
    Knob("temperature", float, 0.0, "infer", "0: greedy; above 0: sampling at this temperature", minimum=0.0),
    Knob("top_p", float, 1.0, "infer", "nucleus sampling mass (with temperature > 0)", minimum=0.01, maximum=1.0),
    Knob("tp", int, 0, "infer", "tensor-parallel degree on every host (0: per host, the smallest whose shards "
         "fit its devices)", minimum=0),
    Knob("infer_batch", int, 8, "infer", "prompts per generate() call of a replica", minimum=1),
    Knob("chat", str, "auto", "infer", "`auto`: wrap a prompt in the tokenizer's chat template when it has one; "
         "`on`: require one; `off`: send the text as is", choices=("auto", "on", "off")),
    Knob("infer_timeout", int, 3600, "infer", "seconds a host may take to load the model and answer its prompts "
         "before its ranks are stopped", minimum=10),
    Knob("gpus", str, "", "host", "devices this host may use, like `CUDA_VISIBLE_DEVICES` (`\"0,2\"`)",
         scope="host", shown="every device"),
    Knob("slots", int, None, "host", "at most N ranks on this host", minimum=1, scope="host", shown="one per "
         "device"),
    Knob("ifname", str, "", "host", "interface for NCCL/gloo traffic", scope="host", shown="the one facing "
         "the master"),
    Knob("slurm_node", str, "", "host", "launcher=slurm: this host's SLURM node name", scope="host",
         shown="its hostname"),
)
KNOBS = {k.name: k for k in KNOB_LIST}
RUN_KNOBS = {k.name: k for k in KNOB_LIST if k.scope == "run"}
HOST_KNOBS = {k.name: k for k in KNOB_LIST if k.scope == "host"}


def _fail(msg):
    raise PlanError("dsfleet: " + msg)


def closest(name, known):
    """The known name nearest to ``name``, or None."""
    match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if match:
        return match[0]
    squashed = {k.replace("_", ""): k for k in known}
    return squashed.get(name.replace("_", "").replace("-", "").lower())


def coerce(name, value):
    """Turn a knob's value (extra vars arrive as strings: -e max_steps=10) into its type, or fail naming it."""
    kind = KNOBS[name].kind
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
    elif kind is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is list:
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    return coerce(name, json.loads(value))
                except ValueError:
                    pass
            return [v.strip() for v in value.split(",") if v.strip()]
    elif kind is dict:
        if isinstance(value, dict):
            return {str(k): str(v) for k, v in value.items()}
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                return coerce(name, json.loads(value))
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    _fail("knob %s=%r must be %s; fix the value passed with -e %s=... or in the inventory"
          % (name, value, TYPE_NAMES[kind], name))


def check_value(name, value):
    """The typed value of one knob, range- and choice-checked."""
    knob = KNOBS[name]
    if value is None:
        return knob.default
    value = coerce(name, value)
    if knob.choices and value not in knob.choices:
        _fail("%s=%r is not one of %s; pass one of them, e.g. -e %s=%s"
              % (name, value, ", ".join(map(str, knob.choices)), name, knob.choices[0]))
    if knob.minimum is not None and value < knob.minimum:
        _fail("%s=%s must be >= %s; pass a larger value (-e %s=...)" % (name, value, knob.minimum, name))
    if knob.maximum is not None and value > knob.maximum:
        _fail("%s=%s must be <= %s; pass a smaller value (-e %s=...)" % (name, value, knob.maximum, name))
    if name in ("run_id", "resume") and value and not RUN_ID.fullmatch(value):
        _fail("%s=%r may hold only letters, digits, '.', '_' and '-' (and not start with '.' or '-'): it names a "
              "directory under runs/; pass e.g. -e %s=llama-ft-1" % (name, value, name))
    return value


def normalize(values):
    """Every run knob, typed and checked, from the user's values (None or absent: the default)."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(RUN_KNOBS))
    if unknown:
        _fail("unknown knob(s) %s; %s" % (", ".join(unknown), "; ".join(_hint(n) for n in unknown)))
    out = {name: check_value(name, values.get(name)) for name in RUN_KNOBS}
    if out["lr"] <= 0:
        _fail("lr=%s must be > 0" % out["lr"])
    if out["resume"] and out["run_id"] and out["resume"] != out["run_id"]:
        _fail("resume=%s continues that run under its own id, but run_id=%s was passed too; drop run_id"
              % (out["resume"], out["run_id"]))
    if not out["model"].strip():
        _fail("model is empty; pass -e model=tiny, a local directory or a hub id")
    return out


def _hint(name):
    near = closest(name, KNOBS)
    return ("did you mean %s?" % near) if near else "known knobs: %s" % ", ".join(sorted(KNOBS))


def _foreign(name, patterns):
    if name.startswith(FOREIGN_PREFIXES) or name in ANSIBLE_NAMES:
        return True
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_template(value):
    return isinstance(value, str) and ("{{" in value or "{%" in value)


# what each argument-spec type of a role option accepts as the user wrote it (a value from -e arrives as a string)
_ROLE_TYPES = {
    "str": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    "path": lambda v: isinstance(v, str),
    "int": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, str) and v.strip().lstrip("-").isdigit()),
    "float": lambda v: not isinstance(v, bool) and _is_number(v),
    "bool": lambda v: isinstance(v, bool) or str(v).lower() in ("1", "0", "true", "false", "yes", "no", "on", "off"),
    "list": lambda v: isinstance(v, (list, str)),
    "dict": lambda v: isinstance(v, dict) or (isinstance(v, str) and v.strip().startswith("{")),
}


def _is_number(value):
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def check_role_option(name, spec, value):
    """The error (a string) for a role option's value of the wrong type or outside its choices, else None. The
    roles' own argument-spec validation is not run on the launch path (a task per role, 0.2 s each); this is."""
    if value is None or _is_template(value):
        return None
    kind = (spec or {}).get("type", "str")
    accepts = _ROLE_TYPES.get(kind)
    if accepts and not accepts(value):
        return "%s=%r is not of type %s (its role's meta/argument_specs.yml); pass a %s value" % (
            name, value, kind, kind)
    choices = (spec or {}).get("choices")
    if choices and str(value) not in [str(c) for c in choices]:
        return "%s=%r is not one of %s; pass one of them" % (name, value, ", ".join(map(str, choices)))
    return None


def check_user_vars(extra_vars, sources, role_options=(), ansible_names=()):
    """Errors (strings) for what the user set: unknown names, misplaced run knobs and values of the wrong type.

    ``extra_vars`` is what was passed with -e; ``sources`` is a list of ``(label, scope, variables)`` read from
    the inventory, where label says where the names were found ("group_vars of all", "host_vars of gpu1") and
    scope is "group" or "host". ``role_options`` are the options the roles' argument specs declare (setup.yml's
    options: python_env_*, dsfleet_home, ...): names, or a dict of name -> spec whose types and choices are checked
    too; ``ansible_names`` are Ansible's own reserved names, never flagged.
    """
    specs = role_options if isinstance(role_options, dict) else {}
    known = set(KNOBS) | set(role_options)
    patterns = [str(n) for n in ansible_names]
    patterns += coerce("other_vars", extra_vars.get("other_vars") or [])
    for _, _, variables in sources:
        if "other_vars" in variables and not _is_template(variables["other_vars"]):
            patterns += coerce("other_vars", variables["other_vars"])
    errors = []
    places = [("what was passed with -e", "extra", extra_vars)] + [(label, scope, v) for label, scope, v in sources]
    for label, scope, variables in places:
        for name in sorted(variables):
            value = variables[name]
            if _foreign(name, patterns):
                continue
            if name == "_raw_params" and scope == "extra":
                # -e prompt="a b c" reaches Ansible as prompt=a plus loose words it cannot assign
                errors.append("-e got words that belong to no name (%r): Ansible splits -e key=value at spaces, so "
                              "a value with spaces needs quotes Ansible sees, e.g. -e 'prompt=\"Once upon a time\"' "
                              "or -e '{\"prompt\": \"Once upon a time\"}'" % str(value))
                continue
            if name not in known:
                near = closest(name, known)
                errors.append("unknown variable %r in %s%s" % (
                    name, label, ("; did you mean %r?" % near) if near else
                    "; dsfleet's knobs are listed in README.md (or add it to other_vars if it belongs to another "
                    "project)"))
                continue
            if name in RUN_KNOBS and scope == "host":
                errors.append("%s is set in %s, but it is one value for the whole run; set it in group_vars/all or "
                              "pass -e %s=..." % (name, label, name))
                continue
            if name in KNOBS and not _is_template(value):
                try:
                    check_value(name, value)
                except PlanError as exc:
                    errors.append("in %s: %s" % (label, str(exc).replace("dsfleet: ", "", 1)))
            elif name in specs:
                error = check_role_option(name, specs[name], value)
                if error:
                    errors.append("in %s: %s" % (label, error))
    return errors


# -----------------------------------------------------------------------------------------------------------
# generated documentation

def readme_table():
    """The README's knob table (markdown lines)."""
    lines = ["| knob | default | meaning |", "|---|---|---|"]
    for knob in KNOB_LIST:
        choices = (" One of " + ", ".join("`%s`" % c for c in knob.choices) + ".") if knob.choices else ""
        lines.append("| `%s` | `%s` | %s.%s |" % (knob.name, knob.default_text, knob.help, choices))
    return lines


def _yaml_scalar(value):
    if isinstance(value, str):
        return '""' if value == "" else value
    if value is None:
        return "null"
    return json.dumps(value)


def example_group_vars(role_options=()):
    """inventory/example/group_vars/all/dsfleet.yml: every knob with its default, commented out.

    ``role_options`` is a list of (name, default text, description) for setup.yml's role options.
    """
    out = ["---",
           "# Generated by tools/gen_docs.py from lib/dsfleet_core/knobs.py (the one knob spec); do not edit.",
           "# Every launch.yml knob with its default. Uncomment to change; -e on the command line wins. An unknown",
           "# name or a wrong type is an error naming the closest knob."]
    for group, title in GROUPS:
        knobs = [k for k in KNOB_LIST if k.group == group]
        if group == "host":
            out += ["", "# --- %s " % title + "-" * max(3, 100 - len(title) - 7)]
            out.append("# (not here: in host_vars/<host>.yml or on the host's line in hosts.yml)")
            for k in knobs:
                text = "%s (default: %s)" % (_plain(k.help), k.default_text)
                wrapped = textwrap.wrap(text, 104)
                out += ["#   %s  %s" % (k.name.ljust(8), wrapped[0])] + ["#   %s  %s" % (" " * 8, w) for w in wrapped[1:]]
            continue
        out += ["", "# --- %s " % title + "-" * max(3, 100 - len(title) - 7)]
        for k in knobs:
            help_text = _plain(k.help) + (" (" + ", ".join(map(str, k.choices)) + ")" if k.choices else "")
            out += _commented("# %s: %s" % (k.name, _yaml_scalar(k.default)), help_text, 34)
    if role_options:
        out += ["", "# --- setup.yml (role options; see roles/*/meta/argument_specs.yml) " + "-" * 32]
        for name, default, description in role_options:
            out += _commented("# %s: %s" % (name, default), description, 44)
    return "\n".join(out) + "\n"


def _commented(setting, text, column, width=118):
    """``setting  # text``, the text wrapped under itself so no line passes ``width``."""
    pad = max(column, len(setting) + 1)
    lines = textwrap.wrap(text, width - pad - 4) or [""]
    return ["%s  # %s" % (setting.ljust(pad), lines[0])] + ["#%s  # %s" % (" " * (pad - 1), ln) for ln in lines[1:]]


def _plain(text):
    return text.replace("`", "")
