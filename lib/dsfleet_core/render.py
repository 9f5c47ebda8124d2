"""The files a run's hosts read, rendered from the one plan (pure; the dsfleet_render action writes them).

    files(plan) -> {"plan.json", "hostfile", "ds_config.json", ".deepspeed_env", "replicas.json": text}
    node_scripts(plan, bundle_b64) -> {"nodes/<host>.sh": text}: each host's part started by hand
    sbatch_script(plan, bundle_b64) -> text of job.sbatch (launcher=slurm): the whole run as one SLURM job
"""
from __future__ import annotations

import json
import shlex

FILES = ("plan.json", "hostfile", "ds_config.json", ".deepspeed_env", "replicas.json")


def _json(value):
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def hostfile(plan):
    """DeepSpeed's hostfile: one `address slots=N` line per host, rank 0's host first."""
    lines = ["# DeepSpeed hostfile for dsfleet run %s: %d rank(s) on %d host(s), %s"
             % (plan["run_id"], plan["world_size"], plan["nodes"], plan["accelerator"]),
             "# Rank 0 lives on the first host (%s); hosts are named as the launcher reaches them."
             % plan["master"]["name"]]
    # DeepSpeed's runner takes a host's devices as 0..slots-1 and lets --include only pick among them: a host whose
    # devices are not 0..n-1 (gpus: [0, 2]) is listed up to its highest index, and --include keeps the planned ones
    lines += ["%s slots=%d" % (h["address"], max(h["devices"]) + 1 if plan["include"] else h["slots"])
              for h in plan["hosts"]]
    return "\n".join(lines) + "\n"


def deepspeed_env(plan):
    """What DeepSpeed's pdsh runner exports on every worker. One KEY=VALUE a line, no comments or blank lines: the
    runner splits each line once at "=" and would break on anything else."""
    for key, value in plan["deepspeed_env"].items():
        if "\n" in str(value) or "=" in key:
            raise ValueError("deepspeed_env %s cannot be written as one KEY=VALUE line" % key)
    return "".join("%s=%s\n" % (k, v) for k, v in sorted(plan["deepspeed_env"].items()))


def files(plan):
    return {"plan.json": _json(plan), "hostfile": hostfile(plan), "ds_config.json": _json(plan["ds_config"]),
            ".deepspeed_env": deepspeed_env(plan), "replicas.json": _json(plan["replicas"])}


def started(plan):
    """started.json: the layout whose ranks started; a later resume on another layout converts the checkpoint."""
    return _json(plan["layout"])


# the script's own unpacking of the bundle it carries (the same layout launch.yml's staging unpacks)
_UNPACK = ("import base64, io, sys, tarfile; "
           "tar = tarfile.open(fileobj=io.BytesIO(base64.b64decode(sys.stdin.read()))); "
           "tar.extractall(sys.argv[1], **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))")


def node_script(plan, host, bundle_b64):
    """runs/<id>/nodes/<host>.sh: on ``host``, by hand, exactly the DeepSpeed launcher the ansible launcher starts
    there (its node rank, the master's address and port, the environment, the working directory), after
    unpacking the code and the run's files it carries. For hosts the controller cannot reach over SSH."""
    q = shlex.quote
    paths, proc = host["paths"], host["node_process"]
    master = plan["hosts"][0]
    lines = [
        "#!/bin/sh",
        "# dsfleet run %s: node %d of %d, %s (%s): %d rank(s), %s, %s." % (
            plan["run_id"], host["node_rank"], plan["nodes"], host["name"], host["address"], host["slots"],
            plan["accelerator"], plan["precision"]),
        "# Starts on this host exactly what launch.yml's ansible launcher starts here, for starting the run by hand.",
        "# Copy it to %s and run it there (sh %s.sh); run every host's script (nodes/*.sh), in any order: the" % (
            host["name"], host["name"]),
        "# master, %s (%s:%d), waits for the others. Ctrl-C stops this node; the other nodes then stop too." % (
            master["name"], plan["master"]["address"], plan["master"]["port"]),
        "# It needs the dsfleet python environment at %s (setup.yml, or as setup.yml builds it)." % paths["venv"],
        "set -eu",
    ]
    lines += _checks(host, "%s.sh" % host["name"])
    lines += [
        "# the training module, the supervisor and the run's files (plan.json, hostfile, ds_config.json, ...)",
        "%s -c %s %s <<'DSFLEET_BUNDLE'" % (q(paths["python"]), q(_UNPACK), q(paths["home"])),
    ]
    lines += [bundle_b64[i:i + 100] for i in range(0, len(bundle_b64), 100)]
    lines += ["DSFLEET_BUNDLE", "cd %s" % q(proc["cwd"])]
    lines += ["export %s=%s" % (k, q(str(v))) for k, v in sorted(proc["env"].items())]
    lines += ["exec " + " ".join(q(a) for a in proc["argv"])]
    return "\n".join(lines) + "\n"


def node_scripts(plan, bundle_b64):
    return {"nodes/%s.sh" % h["name"]: node_script(plan, h, bundle_b64) for h in plan["hosts"]}


def _checks(host, name):
    """Shell lines that stop a node's part early, naming the fix: no dsfleet venv, an input not there."""
    q = shlex.quote
    paths = host["paths"]
    lines = ["if [ ! -x %s ]; then" % q(paths["python"]),
             "  echo %s >&2" % q("%s: no dsfleet python environment at %s; run setup.yml for this host first (or "
                                "build it as roles/python_env does)" % (name, paths["venv"])),
             "  exit 2",
             "fi"]
    for item in host.get("inputs") or []:
        if item.get("hub"):
            fix = ("download it there first: %s/bin/hf download %s --revision %s --local-dir %s"
                   % (paths["venv"], item["hub"], item["revision"], item["dest"]))
        else:
            fix = "copy %s from the controller to %s first" % (item["src"], item["dest"])
        lines += ["if [ ! -e %s ]; then" % q(item["dest"]),
                  "  echo %s >&2" % q("%s: the %s is not at %s: %s" % (name, item["name"], item["dest"], fix)),
                  "  exit 2",
                  "fi"]
    return lines


def sbatch_script(plan, bundle_b64):
    """runs/<id>/job.sbatch (launcher=slurm): the run as one SLURM job. The batch part, on the first node of the
    allocation, checks that SLURM gave the planned nodes and starts one step task a node (srun --bcast sends this
    script to each); each node's part unpacks the code and the run's files this script carries, then runs under
    the supervisor exactly what the ansible launcher runs on that host (its node rank, the master's address, the
    environment). Ranks keep the plan's order: node rank 0 is the plan's master, whatever order SLURM lists them."""
    q = shlex.quote
    slurm = plan["slurm"]
    master = plan["hosts"][0]
    home = master["paths"]["home"]
    nodes = slurm["nodes"]
    output = "%s/slurm-%s-%%j.out" % (home, plan["run_id"])
    head = [
        "#!/bin/bash",
        "# dsfleet run %s as one SLURM job: %d node(s), %d rank(s), %s, %s, strategy %s." % (
            plan["run_id"], plan["nodes"], plan["world_size"], plan["accelerator"], plan["precision"],
            plan["strategy"]),
        "# Rendered from the plan (plan.json beside it): each node's step runs, under dsfleet's supervisor, what the",
        "# ansible launcher runs on that host (nodes/<host>.sh: the same without SLURM). It carries the code and the",
        "# run's files, so `sbatch job.sbatch` on any host of the cluster submits it; launch.yml -e launcher=slurm",
        "# submits it on %s and follows it (squeue; every host's progress), then collects the results." % (
            master["name"]),
        "# Output of this batch part: %s on the first node of the allocation; each node's ranks log to" % output,
        "# <run dir>/node.log there.",
    ]
    sb = []
    for i, comp in enumerate(slurm["components"]):
        if i:
            sb.append("#SBATCH hetjob")
        sb += ["#SBATCH --nodes=%d" % len(comp["nodes"]), "#SBATCH --nodelist=%s" % ",".join(comp["nodes"]),
               "#SBATCH --ntasks-per-node=%d" % comp["tasks_per_node"], "#SBATCH --exclusive"]
        if comp["gres"]:
            sb.append("#SBATCH --gres=%s" % comp["gres"])
        if i == 0:
            sb += ["#SBATCH --job-name=%s" % slurm["job_name"], "#SBATCH --output=%s" % output,
                   "#SBATCH --chdir=%s" % home]
            sb += ["#SBATCH %s" % o for o in slurm["options"]]
    body = ["set -euo pipefail", "", "unpack() {  # the code and the run's files, into the dsfleet home",
            "  %s -c %s %s <<'DSFLEET_BUNDLE'" % ('"$1"', q(_UNPACK), '"$2"')]
    body += [bundle_b64[i:i + 100] for i in range(0, len(bundle_b64), 100)]
    body += ["DSFLEET_BUNDLE", "}", "", "node() {  # this node's part of the run (a step task)",
             '  case "${SLURMD_NODENAME:-$(hostname -s)}" in']
    for host in plan["hosts"]:
        step, paths = host["slurm_step"], host["paths"]
        body.append("    %s)  # node rank %d, %s: %d rank(s) from rank %d" % (
            host["slurm_node"], host["node_rank"], host["name"], host["slots"], host["first_rank"]))
        body += ["      " + line for line in _checks(host, "job.sbatch on %s" % host["slurm_node"])]
        body.append("      unpack %s %s" % (q(paths["python"]), q(paths["home"])))
        body.append("      cd %s" % q(step["cwd"]))
        body += ["      export %s=%s" % (k, q(str(v))) for k, v in sorted(step["env"].items())]
        body.append("      exec " + " ".join(q(a) for a in step["argv"]))
        body.append("      ;;")
    body += ['    *) echo "job.sbatch: node ${SLURMD_NODENAME:-?} is not in the plan (%s)" >&2; exit 2 ;;' % " ".join(
        nodes), "  esac", "}", "",
             'if [ "${1:-}" = --dsfleet-node ]; then node; fi', "",
             "# the batch part: the planned nodes, then one step task on each",
             # a heterogeneous job lists each component's nodes in SLURM_JOB_NODELIST_HET_GROUP_<i>
             "set -f  # node lists like h[1-3] are not file patterns",
             'lists=$(env | sed -n "s/^SLURM_JOB_NODELIST_HET_GROUP_[0-9]*=//p")',
             'allocated=$(for list in ${lists:-${SLURM_JOB_NODELIST:?run with sbatch}}; do scontrol show hostnames '
             '"$list"; done | sort | xargs)',
             "planned=%s" % q(" ".join(sorted(nodes))),
             'if [ "$allocated" != "$planned" ]; then',
             '  echo "job.sbatch: SLURM allocated $allocated; the plan is for $planned (run launch.yml again to '
             'plan for these nodes)" >&2',
             "  exit 2",
             "fi",
             "export MASTER_ADDR=%s MASTER_PORT=%d" % (q(plan["master"]["address"]), plan["master"]["port"]),
             'echo "dsfleet run %s: SLURM job $SLURM_JOB_ID on $allocated; rank 0 on %s ($MASTER_ADDR:$MASTER_PORT)"'
             % (plan["run_id"], master["slurm_node"]),
             # every node's step in one srun; a node whose step fails ends the others (its peers would hang)
             # one task a node (its launcher starts the node's ranks), in every component
             "srun " + " : ".join(
                 "%s--nodes=%d --ntasks=%d --ntasks-per-node=1 --kill-on-bad-exit=1 --bcast=/tmp/dsfleet-%s-"
                 '"$SLURM_JOB_ID".sbatch "$0" --dsfleet-node' % (
                     "--het-group=%d " % i if len(slurm["components"]) > 1 else "", len(c["nodes"]), len(c["nodes"]),
                     plan["run_id"]) for i, c in enumerate(slurm["components"]))]
    return "\n".join(head + sb + [""] + body) + "\n"
