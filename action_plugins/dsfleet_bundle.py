# -*- coding: utf-8 -*-
"""Action dsfleet_bundle: pack what a run needs on every host into one tar.gz on the controller.

One bundle, handed to one command per host on its stdin (the plan's ``commands.stage``): the training module
(``code/train/``), the host supervisor (``code/`` + the node file's name) and the run's rendered files
(``runs/<run_id>/``: plan.json, hostfile, ds_config.json, .deepspeed_env, replicas.json, and an empty ``out/``),
laid out as they lie under each host's dsfleet home. Runs on the controller only.

    - dsfleet_bundle:
        dest: runs/<id>/bundle.tar.gz
        run_id: <id>
        run_files: runs/<id>          # the rendered files
        code: train                   # the training module
        node: roles/launch/files/<the supervisor>
        files: [plan.json, hostfile, ds_config.json, .deepspeed_env, replicas.json]
"""

import base64
import gzip
import io
import os
import tarfile

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase


def _skip(name):
    return name == "__pycache__" or name.endswith(".pyc")


def bundle(dest, run_id, run_files, code, node, files):
    """Write the bundle atomically; returns its size in bytes."""
    tmp = dest + ".tmp"
    # gzip's header without a timestamp: the same inputs give the same bytes (runs/<id>/nodes/*.sh carry them)
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tar:
        for root, dirs, names in os.walk(code):
            dirs[:] = sorted(d for d in dirs if not _skip(d))
            for name in sorted(n for n in names if not _skip(n)):
                path = os.path.join(root, name)
                tar.add(path, arcname="code/train/" + os.path.relpath(path, code))
        tar.add(node, arcname="code/" + os.path.basename(node))
        for name in files:
            tar.add(os.path.join(run_files, name), arcname="runs/%s/%s" % (run_id, name))
        out = tarfile.TarInfo("runs/%s/out" % run_id)
        out.type, out.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(out, io.BytesIO())
    os.replace(tmp, dest)
    return os.path.getsize(dest)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        a = self._task.args
        missing = [k for k in ("dest", "run_id", "run_files", "code", "node", "files") if k not in a]
        if missing:
            raise AnsibleActionFail("dsfleet_bundle needs %s" % ", ".join(missing))
        try:
            size = bundle(a["dest"], a["run_id"], a["run_files"], a["code"], a["node"], list(a["files"]))
        except OSError as exc:
            raise AnsibleActionFail("cannot write the run bundle %s: %s" % (a["dest"], exc)) from exc
        with open(a["dest"], "rb") as f:
            content = base64.b64encode(f.read()).decode("ascii")
        result.update(changed=True, dest=a["dest"], size=size, content_b64=content)
        return result
