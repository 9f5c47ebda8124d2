# -*- coding: utf-8 -*-
"""One progress line per poll while a dsfleet run is followed (step/total, loss, tokens/s, elapsed, ETA).

The follow loop is one status task retried until the run ends (roles/launch/tasks/follow.yml); every retry of the
master's status (marked "report") becomes one line, formatted by lib/dsfleet_core/run.py follow_line.
"""

import os
import sys

from ansible.plugins.callback import CallbackBase

_LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
if _LIB not in sys.path:
    sys.path.insert(0, _LIB)

from dsfleet_core import run as _run  # noqa: E402

DOCUMENTATION = """
name: dsfleet_progress
type: aggregate
short_description: print one progress line per poll of a followed dsfleet run
description:
  - Turns each retry of the follow loop's status task on the reporting host into a progress line.
requirements:
  - enable in ansible.cfg (callbacks_enabled = dsfleet_progress)
"""


def dsfleet_status(result):
    """The supervisor's status JSON carried by a task result, or None."""
    text = (result or {}).get("stdout") or ""
    if '"dsfleet_status"' not in text:
        return None
    status = _run.status_json(text)
    return status if status and status.get("dsfleet_status") else None


class CallbackModule(CallbackBase):
    """Print the follow loop's progress."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "dsfleet_progress"
    CALLBACK_NEEDS_ENABLED = True

    def v2_runner_retry(self, result):
        status = dsfleet_status(getattr(result, "_result", None) or getattr(result, "result", None))
        if status and status.get("report"):
            self._display.display("[%s] %s" % (result._host.get_name(), _run.follow_line(status)))
