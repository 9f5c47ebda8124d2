"""The one knob spec: typos and wrong types are errors naming the closest knob; the docs are generated from it;
no command line or environment is assembled outside the plan."""
import pathlib
import re
import subprocess
import sys

import pytest

from dsfleet_core import PlanError
from dsfleet_core import knobs as K

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROLE_OPTIONS = {"python_env_python", "python_env_wheelhouse", "dsfleet_home", "ssh_mesh_key_path"}


@pytest.mark.parametrize("extra, sources, expected", [
    ({"modle": "/data/llama"}, [], ["unknown variable 'modle' in what was passed with -e; did you mean 'model'?"]),
    ({"dry_run": "ture"}, [], ["knob dry_run='ture' must be true or false"]),
    ({"dryrun": "true"}, [], ["did you mean 'dry_run'?"]),
    ({"max_steps": "ten"}, [], ["knob max_steps='ten' must be an integer"]),
    ({"zero_stage": "4"}, [], ["zero_stage=4 is not one of 0, 1, 2, 3"]),
    ({"master_port": "70000"}, [], ["master_port=70000 must be <= 65535"]),
    ({"run_id": "../../elsewhere"}, [], ["run_id='../../elsewhere' may hold only letters"]),
    ({}, [("group_vars of all", "group", {"max_step": 5})], ["unknown variable 'max_step' in group_vars of all; did "
                                                             "you mean 'max_steps'?"]),
    ({}, [("host_vars of gpu1", "host", {"max_steps": 5})], ["max_steps is set in host_vars of gpu1, but it is one "
                                                             "value for the whole run"]),
    ({}, [("host_vars of gpu1", "host", {"slot": 2})], ["did you mean 'slots'?"]),
    ({}, [("host_vars of gpu1", "host", {"slots": "two"})], ["in host_vars of gpu1: knob slots='two' must be an "
                                                             "integer"]),
    ({"python_env_pyhton": "/usr/bin/python3"}, [], ["did you mean 'python_env_python'?"]),
    ({"completely_unrelated_thing": 1}, [], ["unknown variable 'completely_unrelated_thing'", "other_vars"]),
])
def test_user_vars_errors_name_the_closest_knob(extra, sources, expected):
    errors = K.check_user_vars(extra, sources, ROLE_OPTIONS)
    assert len(errors) == 1, errors
    for fragment in expected:
        assert fragment in errors[0], errors[0]


def test_what_is_known_or_foreign_passes():
    extra = {"model": "/data/llama", "max_steps": "10", "dry_run": "true", "exclude": "a,b", "python_env_python":
             "python3", "ansible_user": "me", "molecule_yml": {}, "other_vars": "rig_*,site"}
    sources = [("group_vars of all", "group", {"zero_stage": 3, "offload": "cpu", "ansible_host": "10.0.0.1",
                                               "rig_netns": "x", "site": "lab", "lr": "{{ base_lr * 2 }}"}),
               ("host_vars of gpu1", "host", {"gpus": "0,2", "slots": 2, "ifname": "ens1", "inventory_dir": "/i"})]
    assert K.check_user_vars(extra, sources, ROLE_OPTIONS, ("inventory_dir",)) == []


def test_role_options_are_checked_against_their_argument_spec_types():
    """The launch path skips the roles' own validation tasks; the same types are checked once, up front."""
    sys.path.insert(0, str(ROOT / "action_plugins"))
    import dsfleet_check_vars
    options = dsfleet_check_vars.role_options()
    errors = K.check_user_vars({"gpu_facts_timeout": "soon", "python_env_wheelhouse_build": "maybe"},
                               [("host_vars of gpu1", "host", {"gpu_facts_gather_subset": {"a": 1}})], options)
    assert len(errors) == 3, errors
    text = "\n".join(errors)
    assert "what was passed with -e: gpu_facts_timeout='soon' is not of type int" in text
    assert "what was passed with -e: python_env_wheelhouse_build='maybe' is not of type bool" in text
    assert "host_vars of gpu1: gpu_facts_gather_subset={'a': 1} is not of type list" in text
    good = {"gpu_facts_timeout": "30", "python_env_wheelhouse_build": "true", "dsfleet_home": "/srv/dsfleet",
            "gpu_facts_visible": "{{ gpus }}"}
    assert K.check_user_vars(good, [("group_vars of all", "group", {"gpu_facts_timeout": 5})], options) == []
    choice = next(n for n, spec in options.items() if spec.get("choices"))
    assert "is not one of" in K.check_user_vars({choice: "no-such-choice"}, [], options)[0]


def test_other_vars_from_the_inventory_silence_that_projects_names():
    sources = [("group_vars of all", "group", {"other_vars": ["backup_*"], "backup_dir": "/b"})]
    assert K.check_user_vars({}, sources) == []
    assert K.check_user_vars({}, [("group_vars of all", "group", {"backup_dir": "/b"})])


def test_normalize_types_every_run_knob():
    k = K.normalize({"max_steps": "10", "lr": "1e-3", "exclude": "a, b", "require_all_hosts": "no",
                     "extra_env": '{"NCCL_DEBUG": "INFO"}', "dry_run": "yes"})
    assert (k["max_steps"], k["lr"], k["exclude"], k["require_all_hosts"], k["dry_run"]) == (10, 1e-3, ["a", "b"],
                                                                                             False, True)
    assert k["extra_env"] == {"NCCL_DEBUG": "INFO"} and k["model"] == "tiny" and k["stop_grace"] == 10
    assert set(k) == set(K.RUN_KNOBS)
    with pytest.raises(PlanError, match="did you mean model"):
        K.normalize({"modle": "x"})
    with pytest.raises(PlanError, match="must be true or false"):
        K.normalize({"dry_run": "ture"})


def test_every_knob_has_a_group_help_and_a_default_of_its_type():
    groups = {g for g, _ in K.GROUPS}
    for knob in K.KNOB_LIST:
        assert knob.group in groups and knob.help, knob.name
        if knob.default is not None:
            assert isinstance(knob.default, knob.kind), knob.name
            assert K.check_value(knob.name, knob.default) == knob.default
        if knob.choices:
            assert knob.default in knob.choices, knob.name


def test_readme_table_and_example_group_vars_are_generated_from_the_spec():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "inventory" / "example" / "group_vars" / "all" / "dsfleet.yml").read_text()
    for knob in K.KNOB_LIST:
        assert "| `%s` |" % knob.name in readme, knob.name
        assert re.search(r"^#\s+%s[: ]" % knob.name, example, re.M), knob.name


def test_the_drift_check_fails_when_a_file_differs(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import gen_docs
    copy = tmp_path / "dsfleet.yml"
    copy.write_text(gen_docs.example_text().replace("max_steps: 50", "max_steps: 60"))
    monkeypatch.setattr(gen_docs, "EXAMPLE", copy)
    assert gen_docs.main(["--check"]) == 1
    assert gen_docs.main([]) == 0 and gen_docs.main(["--check"]) == 0
    assert "max_steps: 50" in copy.read_text()


def test_the_action_plugin_knows_every_role_option():
    sys.path.insert(0, str(ROOT / "action_plugins"))
    import dsfleet_check_vars
    options = dsfleet_check_vars.role_options()
    assert {"python_env_python", "python_env_wheelhouse", "dsfleet_home", "dsfleet_venv", "gpu_facts_timeout",
            "ssh_mesh_key_path", "plan_runs_dir"} <= set(options)
    assert options["gpu_facts_timeout"]["type"] == "int"


# --- one place for command lines and environments -------------------------------------------------------------

LAUNCH_TASKS = sorted((ROOT / "roles" / "launch" / "tasks").glob("*.yml"))
PROCESS_WORDS = ("--node_rank", "--master_addr", "--no_ssh", "deepspeed.launcher", "node_launch", "--hostfile", "--deepspeed_config",
                 "PYTHONUNBUFFERED", "DS_ACCELERATOR", "PDSH_RCMD_TYPE", "OMP_NUM_THREADS", "SOCKET_IFNAME", "dsfleet_node.py",
                 "bin/deepspeed", "train.py")


def test_launch_tasks_run_only_the_plans_commands():
    assert LAUNCH_TASKS
    for path in LAUNCH_TASKS:
        text = path.read_text()
        for key in ("argv", "environment", "chdir"):
            for value in re.findall(r"^\s*%s:\s*(.*)$" % key, text, re.M):
                # the hub download's secrets: from the controller's environment, never written into the plan
                if key == "environment" and value.strip() == '"{{ __launch_me.paths.home | dsfleet_hub_env }}"':
                    continue
                # the resume gather's command is the pure resume_source's, built from the plan's commands
                assert re.fullmatch(r'"\{\{ (__launch_me\.commands\.\w+\.(argv|env|cwd)|__launch_(resume|export)\.argv) \}\}"',
                                    value.strip()), (
                    "%s: %s: %s is not the plan's" % (path.name, key, value))
        for value in re.findall(r"^\s*ansible\.builtin\.raw:\s*(.*)$", text, re.M):
            assert value.strip() == '"{{ __launch_me.commands.status.argv | map(\'quote\') | join(\' \') }}"', (
                "%s: raw: %s is not the plan's argv, quoted" % (path.name, value))
        assert "cmd:" not in text and "ansible.builtin.shell" not in text, path.name


def test_no_command_line_or_environment_is_assembled_outside_the_plan():
    places = [p for p in ROOT.glob("roles/**/*") if p.is_file() and p.suffix in (".yml", ".j2")]
    places += list((ROOT / "playbooks").glob("*.yml")) + list((ROOT / "filter_plugins").glob("*.py"))
    places += list((ROOT / "action_plugins").glob("*.py")) + [ROOT / "launch.yml", ROOT / "setup.yml"]
    offenders = []
    for path in places:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            # comments; the copy (src:) and the bundle (node:) that ship the supervisor file
            if stripped.startswith(("#", "{#", "src:", "node:")):
                continue
            offenders += ["%s:%d: %s" % (path.relative_to(ROOT), n, w) for w in PROCESS_WORDS if w in line]
    assert offenders == []


def test_one_license_and_every_file_agrees():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    for meta in ROOT.glob("roles/*/meta/main.yml"):
        assert re.search(r"^\s*license: Apache-2.0\s*$", meta.read_text(), re.M), meta
    for path in list(ROOT.glob("**/*.py")) + list(ROOT.glob("**/*.yml")):
        if ".venv" in path.parts or ".work" in path.parts:
            continue
        for spdx in re.findall(r"^# SPDX-License-Identifier: (\S+)$", path.read_text(errors="replace"), re.M):
            assert spdx == "Apache-2.0", path
