# -*- coding: utf-8 -*-
"""Per-task wall time, printed after the play recap (the slowest tasks first)."""

import time

from ansible.plugins.callback import CallbackBase

DOCUMENTATION = """
name: dsfleet_profile
type: aggregate
short_description: print the wall time of the slowest tasks at the end of a run
description:
  - Records when each task starts and ends and prints the ten slowest after the recap.
requirements:
  - enable in ansible.cfg (callbacks_enabled = dsfleet_profile)
"""


class CallbackModule(CallbackBase):
    """Time every task; report the slowest."""

    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "dsfleet_profile"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self._times = {}
        self._current = None

    def _start(self, task):
        self._stop()
        # keyed by name: a task included many times (the watch loop) adds up to one line
        self._current = (task.get_name(), task.get_name(), time.monotonic())

    def _stop(self):
        if self._current:
            key, name, start = self._current
            total = self._times.get(key, (name, 0.0))[1] + time.monotonic() - start
            self._times[key] = (name, total)
            self._current = None

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._start(task)

    def v2_playbook_on_handler_task_start(self, task):
        self._start(task)

    def v2_playbook_on_stats(self, stats):
        self._stop()
        slowest = sorted(self._times.values(), key=lambda item: -item[1])[:10]
        if not slowest:
            return
        self._display.banner("TASK TIMES (slowest first)")
        for name, seconds in slowest:
            self._display.display("%-70s %7.2fs" % (name[:70], seconds))
