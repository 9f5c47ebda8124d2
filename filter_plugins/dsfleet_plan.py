# -*- coding: utf-8 -*-
"""dsfleet plan filters: host records from facts, and the one cluster plan (lib/dsfleet_core/plan.py).

Thin adapters: the decisions, process specs and the DeepSpeed config are computed by the pure functions in
lib/dsfleet_core, which the unit tests import directly.
"""

import os
import sys

_LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
if _LIB not in sys.path:
    sys.path.insert(0, _LIB)

from ansible.errors import AnsibleFilterError  # noqa: E402

from dsfleet_core import drivers as _drivers  # noqa: E402
from dsfleet_core import infer as _infer  # noqa: E402
from dsfleet_core import knobs as _knobs  # noqa: E402
from dsfleet_core import plan as _plan  # noqa: E402
from dsfleet_core import raising  # noqa: E402


def _adapt(fn):
    return raising(AnsibleFilterError, fn)


def dsfleet_knob_regex(_=None):
    """A regex matching every run knob's name, for lookup('ansible.builtin.varnames', ...)."""
    return "^(%s)$" % "|".join(sorted(_knobs.RUN_KNOBS))


class FilterModule(object):
    """dsfleet plan filters."""

    def filters(self):
        return {
            "dsfleet_plan": _adapt(_plan.make_plan),
            "dsfleet_interfaces": _adapt(_plan.interfaces),
            "dsfleet_records": _adapt(_plan.records),
            "dsfleet_knob_regex": dsfleet_knob_regex,
            "dsfleet_infer_plan": _adapt(_infer.make_infer_plan),
            "dsfleet_infer_table": _adapt(_infer.table),
            "dsfleet_infer_summary": _adapt(_infer.summary_lines),
            "dsfleet_driver_plan": _adapt(_drivers.driver_plan),
        }
