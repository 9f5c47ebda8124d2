"""playbooks/export.yml on this machine: a Hugging Face directory from any complete checkpoint of a real ZeRO-3 run,
rebuilt from the ranks' shards, loads with from_pretrained and gives the same logits as the training engine's own
end-of-run export; bad input fails naming the fix."""
import json
import subprocess
import uuid

from helpers import RUNS, run_playbook

LOGITS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
x = torch.arange(64).reshape(2, 32) % 1000
out = []
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out.append(model(input_ids=x).logits)
print(json.dumps({"max_diff": float((out[0] - out[1]).abs().max()), "scale": float(out[0].abs().max())}))
"""


def test_export_any_checkpoint_of_a_zero3_run(train_python):
    run_id = "export-" + uuid.uuid4().hex[:6]
    knobs = {"run_id": run_id, "max_steps": 6, "save_every": 3, "keep_checkpoints": 0, "zero_stage": 3,
             "precision": "fp32", "block_size": 32, "micro_batch": 2, "poll_interval": 1}
    trained = run_playbook("launch.yml", knobs)
    assert trained.rc == 0, trained.stdout[-4000:]
    plan = json.loads((RUNS / run_id / "plan.json").read_text())
    end_of_run = plan["hosts"][0]["paths"]["out"] + "/export"

    exported = run_playbook("playbooks/export.yml", {"run_id": run_id})
    assert exported.rc == 0, exported.stdout[-4000:]
    assert "run %s: exporting step 6 on localhost from 2 rank(s)' files" % run_id in exported.stdout
    here = RUNS / run_id / "export-global_step6"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in here.iterdir()}
    same = subprocess.run([train_python, "-c", LOGITS, str(here), end_of_run], capture_output=True, text=True,
                          check=True)
    diff = json.loads(same.stdout.splitlines()[-1])
    assert diff["scale"] > 0 and diff["max_diff"] <= 1e-5 * diff["scale"], diff

    # a mid-run checkpoint, left on the host
    mid = run_playbook("playbooks/export.yml", {"run_id": run_id, "step": 3, "export_to": "host"})
    assert mid.rc == 0, mid.stdout[-4000:]
    assert "not fetched (export_to=host)" in mid.stdout
    on_host = plan["hosts"][0]["paths"]["out"] + "/export-global_step3"
    differs = subprocess.run([train_python, "-c", LOGITS, on_host, end_of_run], capture_output=True, text=True,
                             check=True)
    assert json.loads(differs.stdout.splitlines()[-1])["max_diff"] > 1e-4   # three steps before the end

    bad = run_playbook("playbooks/export.yml", {"run_id": run_id, "step": 4})
    assert bad.rc != 0
    assert any("step 4 is not a checkpoint whose every rank's files are on the hosts (complete: 3, 6)" in f
               for f in bad.failures), bad.failures


def test_export_of_a_run_without_checkpoints_says_so():
    run_id = "noexport-" + uuid.uuid4().hex[:6]
    dry = run_playbook("launch.yml", {"run_id": run_id, "dry_run": True})
    assert dry.rc == 0, dry.stdout[-3000:]
    bad = run_playbook("playbooks/export.yml", {"run_id": run_id})
    assert bad.rc != 0
    assert any("run %s has no checkpoint with every rank's files on the hosts" % run_id in f for f in bad.failures), (
        bad.failures)
