"""The knob checks through the real playbooks: a typo or a wrong type from -e or the inventory stops the play
before anything is planned or started, naming the closest knob; a dry run renders the plan and starts nothing."""
import json
import uuid

from helpers import RUNS, run_playbook


def _failure(result):
    return " ".join(result.failures)


def _inventory(tmp_path, group_vars=None, host_vars=None):
    inv = tmp_path / "inv"
    (inv / "group_vars").mkdir(parents=True)
    (inv / "host_vars").mkdir()
    (inv / "hosts.yml").write_text(
        "all:\n  children:\n    dsfleet:\n      hosts:\n        localhost:\n          ansible_connection: local\n"
        "          ansible_python_interpreter: \"{{ ansible_playbook_python }}\"\n")
    if group_vars:
        (inv / "group_vars" / "all.yml").write_text(json.dumps(group_vars))
    if host_vars:
        (inv / "host_vars" / "localhost.yml").write_text(json.dumps(host_vars))
    return inv / "hosts.yml"


def test_a_misspelt_knob_on_the_command_line_stops_before_planning():
    run_id = "knob-%s" % uuid.uuid4().hex[:6]
    result = run_playbook("launch.yml", {"modle": "/data/llama", "run_id": run_id})
    assert result.rc != 0
    assert "unknown variable 'modle' in what was passed with -e; did you mean 'model'?" in _failure(result)
    assert not (RUNS / run_id).exists()


def test_a_mistyped_boolean_does_not_start_a_run():
    run_id = "knob-%s" % uuid.uuid4().hex[:6]
    result = run_playbook("launch.yml", {"dry_run": "ture", "run_id": run_id})
    assert result.rc != 0
    assert "knob dry_run='ture' must be true or false" in _failure(result)
    assert not (RUNS / run_id).exists()


def test_setup_rejects_a_misspelt_role_option():
    result = run_playbook("setup.yml", {"python_env_pyhton": "/usr/bin/python3"})
    assert result.rc != 0 and "did you mean 'python_env_python'?" in _failure(result)


def test_inventory_group_vars_and_host_vars_are_checked(tmp_path):
    result = run_playbook("launch.yml", {"dry_run": True}, inventory=_inventory(tmp_path, {"max_step": 5}))
    assert result.rc != 0 and "unknown variable 'max_step' in group_vars of all; did you mean 'max_steps'?" in \
        _failure(result)
    result = run_playbook("launch.yml", {"dry_run": True},
                          inventory=_inventory(tmp_path / "b", host_vars={"zero_stage": 3}))
    assert result.rc != 0 and "zero_stage is set in host_vars of localhost, but it is one value for the whole run" \
        in _failure(result)


def test_dry_run_renders_the_plan_from_inventory_knobs_and_starts_nothing(tmp_path):
    run_id = "dry-%s" % uuid.uuid4().hex[:6]
    inv = _inventory(tmp_path, {"zero_stage": 3, "offload": "cpu", "other_vars": ["site_*"], "site_name": "lab"},
                     {"slots": 1})
    result = run_playbook("launch.yml", {"dry_run": "true", "run_id": run_id, "max_steps": "7"}, inventory=inv)
    assert result.rc == 0, result.stdout[-3000:]
    plan = json.loads((RUNS / run_id / "plan.json").read_text())
    ds_config = json.loads((RUNS / run_id / "ds_config.json").read_text())
    assert plan["dry_run"] is True and plan["training"]["max_steps"] == 7 and plan["world_size"] == 1
    assert ds_config == plan["ds_config"] and ds_config["zero_optimization"]["stage"] == 3
    assert ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    env = dict(line.split("=", 1) for line in (RUNS / run_id / ".deepspeed_env").read_text().splitlines())
    assert env == plan["deepspeed_env"]
    assert not (RUNS / run_id / "metrics.jsonl").exists() and not (RUNS / run_id / "summary.json").exists()
    started = result.stdout[result.stdout.find("Stage the run and start the ranks"):][:300]
    assert "skipping: [localhost]" in started


def test_an_inventory_without_group_dsfleet_fails_naming_the_group(tmp_path):
    inv = tmp_path / "hosts.yml"
    inv.write_text("all:\n  hosts:\n    localhost:\n      ansible_connection: local\n")
    for playbook in ("launch.yml", "setup.yml", "playbooks/status.yml"):
        result = run_playbook(playbook, {"dry_run": True} if playbook == "launch.yml" else {}, inventory=inv)
        assert result.rc != 0, playbook
        assert "the inventory has no host in group dsfleet (its hosts: localhost)" in _failure(result), playbook


def test_resume_of_an_unknown_run_fails_before_anything_starts():
    result = run_playbook("launch.yml", {"resume": "no-such-run-%s" % uuid.uuid4().hex[:6]})
    assert result.rc != 0 and "there is no run no-such-run-" in _failure(result)
