# -*- coding: utf-8 -*-
"""Action dsfleet_inputs: what the controller has of the run's inputs. Runs on the controller only; never fails.

- the model's config.json (a preset, a model directory, a hub id in the local cache), which the planner sizes
  memory from; without one the plan says it is not sized;
- which of the model, the dataset and the eval dataset are paths on the controller: the plan copies those to every host (there is no
  shared filesystem) instead of expecting them at the same path there;
- whether the model is a hub id (``org/name``, not a path here): the master downloads it once and ships it to the
  other hosts (roles/launch/tasks/stage.yml, the supervisor's `hub` verb).

    - dsfleet_inputs: {model: /data/llama, dataset: /data/corpus.jsonl, eval_dataset: /data/held-out.jsonl}
      # -> config (dict or null), where (the file read, or why there is none),
      #    inputs {model: {path, dir} or {hub, revision} or null, dataset: ..., eval_dataset: ...}
"""

import os
import re
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "train") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "train"))

from ansible.plugins.action import ActionBase  # noqa: E402
from dsfleet_modelinfo import config_of  # noqa: E402

PRESETS = os.path.join(_ROOT, "train", "presets")


def on_controller(value, kind):
    """{path (absolute), dir} of a model directory or dataset file/directory that lies on the controller, else None
    (a preset, the bundled corpus, a hub id, or a path only the hosts have)."""
    value = str(value or "")
    if not value or (kind == "dataset" and value == "bundled"):
        return None
    if kind == "model" and "/" not in value and os.path.isdir(os.path.join(PRESETS, value)):
        return None
    path = os.path.abspath(os.path.expanduser(value))
    if kind == "model":
        return {"path": path, "dir": True} if os.path.isdir(path) else None
    return {"path": path, "dir": os.path.isdir(path)} if os.path.exists(path) else None


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_model(value, revision="main"):
    """{hub, revision} when ``value`` names a hub repository (``org/name``) rather than a preset or a path on the
    controller, else None. A directory of that relative name on the controller wins, as in from_pretrained."""
    value = str(value or "")
    if not HUB_ID.match(value) or ".." in value or os.path.exists(os.path.expanduser(value)):
        return None
    return {"hub": value, "revision": str(revision or "main")}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        model = str(self._task.args.get("model") or "tiny")
        config, where = config_of(model, PRESETS)
        result.update(changed=False, config=config, where=where,
                      inputs={"model": on_controller(model, "model")
                              or hub_model(model, self._task.args.get("revision")),
                              "dataset": on_controller(self._task.args.get("dataset"), "dataset"),
                              "eval_dataset": on_controller(self._task.args.get("eval_dataset"), "dataset")})
        return result
