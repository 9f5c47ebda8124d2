"""dsfleet's pure core: the knob spec, the plan, the run's judgement. No I/O, no clock, no Ansible needed.

- ``knobs``: every user-settable name, its type, default, choices and meaning; validation and typo detection.
- ``plan``: the cluster plan, with every process each host runs (argv, environment, directories) and the
  DeepSpeed config as data.
- ``run``: progress, summary and the tables a person reads.

The Ansible plugins under ``filter_plugins/`` and ``action_plugins/`` are thin adapters over these modules, and
the unit tests import them directly.
"""


class PlanError(Exception):
    """Bad input or an impossible cluster; the message says what to change."""


def raising(exc_type, fn):
    """``fn`` raising ``exc_type`` (e.g. Ansible's AnsibleFilterError) with the same message instead of PlanError."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PlanError as exc:
            raise exc_type(str(exc)) from None
    return wrapper
