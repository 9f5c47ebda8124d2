"""playbooks/export.yml on this machine: a run without a checkpoint fails naming the fix. (Exports of a real ZeRO-3
run's final and mid-run checkpoints, rebuilt from shards scattered over three hosts, and a step that is not a
checkpoint: tests/cluster/test_failures.py, test_a_zero3_run_on_three_hosts_exports_from_its_scattered_shards.)"""
import uuid

from helpers import run_playbook


def test_export_of_a_run_without_checkpoints_says_so():
    run_id = "noexport-" + uuid.uuid4().hex[:6]
    dry = run_playbook("launch.yml", {"run_id": run_id, "dry_run": True})
    assert dry.rc == 0, dry.stdout[-3000:]
    bad = run_playbook("playbooks/export.yml", {"run_id": run_id})
    assert bad.rc != 0
    assert any("run %s has no checkpoint with every rank's files on the hosts" % run_id in f for f in bad.failures), (
        bad.failures)
