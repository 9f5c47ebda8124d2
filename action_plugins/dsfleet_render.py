# -*- coding: utf-8 -*-
"""Action dsfleet_render: write a run's files (plan.json, hostfile, ds_config.json, .deepspeed_env, replicas.json)
into its directory on the controller, rendered from the plan by lib/dsfleet_core/render.py.

One in-process action instead of a template task per file (each of which costs a module run on the controller).
A file whose content is unchanged is not rewritten. Runs on the controller only.

    - dsfleet_render:
        plan: "{{ dsfleet_plan }}"
        dest: runs/<id>
        started: true       # instead: only started.json, the layout whose ranks started (a resume reads it)
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "lib") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "lib"))

from ansible.errors import AnsibleActionFail  # noqa: E402
from ansible.plugins.action import ActionBase  # noqa: E402

from dsfleet_core import render  # noqa: E402


def write(dest, plan, started=False):
    """Write every file (or only started.json); returns the names that changed."""
    os.makedirs(dest, exist_ok=True)
    changed = []
    todo = {"started.json": render.started(plan)} if started else render.files(plan)
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
            changed = write(dest, plan, bool(self._task.args.get("started")))
        except (OSError, ValueError) as exc:
            raise AnsibleActionFail("cannot write the run's files into %s: %s" % (dest, exc)) from exc
        result.update(changed=bool(changed), written=changed, dest=dest)
        return result
