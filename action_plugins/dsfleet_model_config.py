# -*- coding: utf-8 -*-
"""Action dsfleet_model_config: the model's config.json as the controller has it (a preset, a model directory, a
hub id in the local cache), which the planner sizes memory from. Runs on the controller only; never fails: without
a config the plan says it is not sized.

    - dsfleet_model_config: {model: tiny}
      # -> config (dict or null), where (the file read, or why there is none)
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "train") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "train"))

from ansible.plugins.action import ActionBase  # noqa: E402
from dsfleet_modelinfo import config_of  # noqa: E402


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        config, where = config_of(str(self._task.args.get("model") or "tiny"), os.path.join(_ROOT, "train", "presets"))
        result.update(changed=False, config=config, where=where)
        return result
