# -*- coding: utf-8 -*-
"""dsfleet's stdout callback: Ansible's default output, without a "FAILED - RETRYING" line for every poll of a
followed run (the dsfleet_progress callback prints one progress line per poll instead)."""

import os
import sys

from ansible.plugins.callback.default import CallbackModule as DefaultCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsfleet_progress import dsfleet_status  # noqa: E402

DOCUMENTATION = """
name: dsfleet
type: stdout
short_description: the default output, with the follow loop's polls shown as progress lines
description:
  - Ansible's default stdout callback; retries of a dsfleet status task are not printed (dsfleet_progress prints
    them as progress lines).
extends_documentation_fragment:
  - default_callback
  - result_format_callback
requirements:
  - set as stdout callback in ansible.cfg (stdout_callback = dsfleet)
"""


class CallbackModule(DefaultCallback):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "dsfleet"

    def v2_runner_retry(self, result):
        if dsfleet_status(getattr(result, "_result", None) or getattr(result, "result", None)) is None:
            super().v2_runner_retry(result)
