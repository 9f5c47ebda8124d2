# -*- coding: utf-8 -*-
"""Action dsfleet_check_vars: fail on an unknown, misspelt or mistyped variable the user set.

Reads what was passed with -e and what the inventory sets (inline host/group vars, group_vars/ and host_vars/
next to the inventory or the playbook), checks every name against the one knob spec
(lib/dsfleet_core/knobs.py) and the options the roles declare in meta/argument_specs.yml (their types and choices
too), and fails naming the closest known name: ``-e modle=/data/llama`` does not silently train ``tiny``,
``-e dry_run=ture`` does not start a run. Runs on the controller only; changes nothing.
"""

import glob
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(_ROOT, "lib") not in sys.path:
    sys.path.insert(0, os.path.join(_ROOT, "lib"))

import yaml  # noqa: E402
from ansible.plugins.action import ActionBase  # noqa: E402
from ansible.vars.plugins import get_vars_from_inventory_sources, get_vars_from_path  # noqa: E402
from ansible.vars.reserved import get_reserved_names  # noqa: E402

from dsfleet_core import knobs  # noqa: E402


def role_options(roles_dir=None):
    """Every option the roles' argument specs declare: name -> its spec (type, choices). Their types are checked
    here, once, for what the user set: the launch path skips the roles' own validation tasks."""
    roles_dir = roles_dir or os.path.join(_ROOT, "roles")
    options = {}
    for path in sorted(glob.glob(os.path.join(roles_dir, "*", "meta", "argument_specs.yml"))):
        with open(path) as f:
            specs = (yaml.safe_load(f) or {}).get("argument_specs") or {}
        for entry in specs.values():
            for name, spec in ((entry or {}).get("options") or {}).items():
                options.setdefault(name, spec or {})
    return options


def _plain(data):
    return {str(k): v for k, v in (data or {}).items()}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        hostvars = task_vars["hostvars"]
        inventory, loader = hostvars._inventory, hostvars._loader
        extra = _plain(hostvars._variable_manager.extra_vars)
        bases = [loader.get_basedir()]
        sources = []
        for group in sorted(inventory.groups.values(), key=lambda g: g.name):
            where = "group %s" % group.name
            sources.append(("the inventory's vars of %s" % where, "group", _plain(group.vars)))
            sources.append(("group_vars of %s" % group.name, "group",
                            _plain(get_vars_from_inventory_sources(loader, inventory._sources, [group], "task"))))
            for base in bases:
                sources.append(("group_vars of %s next to the playbook" % group.name, "group",
                                _plain(get_vars_from_path(loader, base, [group], "task"))))
        for host in sorted(inventory.hosts.values(), key=lambda h: h.name):
            sources.append(("the inventory's vars of host %s" % host.name, "host", _plain(host.vars)))
            sources.append(("host_vars of %s" % host.name, "host",
                            _plain(get_vars_from_inventory_sources(loader, inventory._sources, [host], "task"))))
            for base in bases:
                sources.append(("host_vars of %s next to the playbook" % host.name, "host",
                                _plain(get_vars_from_path(loader, base, [host], "task"))))
        errors = knobs.check_user_vars(extra, [s for s in sources if s[2]], role_options(), get_reserved_names())
        result["changed"] = False
        result["checked"] = sorted(set(extra) | set(n for s in sources for n in s[2]))
        if errors:
            result["failed"] = True
            result["msg"] = "dsfleet: " + "; ".join(errors)
        else:
            result["msg"] = "%d variable(s) checked" % len(result["checked"])
        return result
