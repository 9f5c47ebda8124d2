# -*- coding: utf-8 -*-
"""Action dsfleet_render: write a run's files (plan.json, hostfile, ds_config.json, .deepspeed_env, replicas.json)
into its directory on the controller, rendered from the plan by lib/dsfleet_core/render.py.

One in-process action instead of a template task per file (each of which costs a module run on the controller).
A file whose content is unchanged is not rewritten. Runs on the controller only.

    - dsfleet_render:
        plan: "{{ dsfleet_plan }}"
        dest: runs/<id>
        started: true       # instead: only started.json, the layout whose ranks started (a resume reads it)
        code: train         # with node: also the bundle and runs/<id>/nodes/<host>.sh (each host started by hand),
                            # and runs/<id>/job.sbatch with launcher=slurm
        node: roles/launch/files/<the supervisor>
"""

import base64
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "lib") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "lib"))

from ansible.errors import AnsibleActionFail  # noqa: E402
from ansible.plugins.action import ActionBase  # noqa: E402

from dsfleet_core import render  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsfleet_bundle import bundle  # noqa: E402


def write(dest, plan, started=False, code=None, node=None):
    """Write every file (or only started.json); with ``code`` and ``node`` also the nodes/ scripts, which carry the
    bundle of the code and those files. Returns the names that changed."""
    os.makedirs(dest, exist_ok=True)
    todo = {"started.json": render.started(plan)} if started else render.files(plan)
    changed = _write_all(dest, todo)
    if code and node and not started:
        path = os.path.join(dest, "nodes", "bundle.tar.gz")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        bundle(path, plan["run_id"], dest, code, node, list(render.FILES))
        with open(path, "rb") as f:
            payload = base64.b64encode(f.read()).decode()
        os.remove(path)
        scripts = render.node_scripts(plan, payload)
        changed += _write_all(dest, scripts, mode=0o755)
        # launcher=slurm: the whole run as one batch script, carrying the same bundle
        if plan.get("slurm"):
            changed += _write_all(dest, {"job.sbatch": render.sbatch_script(plan, payload)}, mode=0o755)
        elif os.path.exists(os.path.join(dest, "job.sbatch")):
            os.remove(os.path.join(dest, "job.sbatch"))
            changed.append("job.sbatch")
        # a host the plan no longer has (a replan of the same run id) keeps no script of the old layout
        for name in sorted(os.listdir(os.path.dirname(path))):
            if name.endswith(".sh") and "nodes/" + name not in scripts:
                os.remove(os.path.join(os.path.dirname(path), name))
                changed.append("nodes/" + name)
    return changed


def _write_all(dest, todo, mode=None):
    changed = []
    for name, text in todo.items():
        path = os.path.join(dest, name)
        try:
            with open(path) as f:
                if f.read() == text:
                    continue
        except OSError:
            pass
        with open(path + ".tmp", "w") as f:
            f.write(text)
        if mode is not None:
            os.chmod(path + ".tmp", mode)
        os.replace(path + ".tmp", path)
        changed.append(name)
    return changed


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        plan, dest = self._task.args.get("plan"), self._task.args.get("dest")
        if not isinstance(plan, dict) or not dest:
            raise AnsibleActionFail("dsfleet_render needs plan (the dsfleet plan) and dest (the run directory)")
        try:
            changed = write(dest, plan, bool(self._task.args.get("started")), self._task.args.get("code"),
                            self._task.args.get("node"))
        except (OSError, ValueError) as exc:
            raise AnsibleActionFail("cannot write the run's files into %s: %s" % (dest, exc)) from exc
        result.update(changed=bool(changed), written=changed, dest=dest)
        return result
