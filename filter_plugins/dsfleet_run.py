# -*- coding: utf-8 -*-
"""dsfleet run filters: progress, failure blame, summary and tables (lib/dsfleet_core/run.py)."""

import os
import sys

_LIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
if _LIB not in sys.path:
    sys.path.insert(0, _LIB)

from ansible.errors import AnsibleFilterError  # noqa: E402

from dsfleet_core import raising  # noqa: E402
from dsfleet_core import run as _run  # noqa: E402


def _adapt(fn):
    return raising(AnsibleFilterError, fn)


def hub_env(home):
    """The environment of the hub tasks on the master whose dsfleet home is ``home`` (filters run on the
    controller): the controller's HF_ENDPOINT, and HF_TOKEN_PATH naming the 0600 copy of the controller's HF_TOKEN
    that the plan role keeps there (a token in the environment would show on the remote command line)."""
    env = {"HF_ENDPOINT": os.environ["HF_ENDPOINT"]} if os.environ.get("HF_ENDPOINT") else {}
    if os.environ.get("HF_TOKEN"):
        env["HF_TOKEN_PATH"] = str(home).rstrip("/") + "/hf_token"
    return env


class FilterModule(object):
    """dsfleet run filters."""

    def filters(self):
        return {
            "dsfleet_plan_table": _adapt(_run.plan_table),
            "dsfleet_progress": _adapt(_run.progress),
            "dsfleet_summary": _adapt(_run.summary),
            "dsfleet_summary_table": _adapt(_run.summary_table),
            "dsfleet_status_table": _adapt(_run.status_table),
            "dsfleet_status_json": _adapt(_run.status_json),
            "dsfleet_stop_report": _adapt(_run.stop_report),
            "dsfleet_common_checkpoint": _adapt(_run.common_checkpoint),
            "dsfleet_resume_source": _adapt(_run.resume_source),
            "dsfleet_export_source": _adapt(_run.export_source),
            "dsfleet_hub_env": hub_env,
        }
