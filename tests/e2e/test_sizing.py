"""The pure sizing against the real tools, in the training environment: the parameter count from config.json
against transformers' model built on the meta device, and the model-state bytes against DeepSpeed's own
estimators, for published configs (tests/fixtures/configs) x device mixes."""
import json
import subprocess

from helpers import ROOT

# name -> the published parameter count (model cards); the fixture configs hold the published sizes
PUBLISHED = {"llama-2-7b": 6.74e9, "mistral-7b": 7.24e9, "mixtral-8x7b": 46.70e9, "qwen2-7b": 7.62e9,
             "qwen3-8b": 8.19e9, "gemma-7b": 8.54e9, "gemma2-9b": 9.24e9, "phi3-mini": 3.82e9, "falcon-7b": 6.92e9,
             "falcon-40b": 41.3e9, "opt-6.7b": 6.66e9, "bloom-7b1": 7.07e9, "gpt-neox-20b": 20.55e9, "gpt2": 124.4e6,
             "phi-2": 2.78e9}
MIXES = [(1, 1), (8, 1), (4, 2), (2, 3), (1, 4)]  # (ranks per host, hosts)

CHECK = r"""
import json, pathlib, sys, torch, transformers as T
sys.path.insert(0, sys.argv[1])
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as z2
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as z3
from dsfleet_core import shape as SH, sizing as SZ
out = {}
for path in sorted(pathlib.Path(sys.argv[2]).glob("*.json")):
    cfg = json.loads(path.read_text())
    config = T.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    shape = SH.model_shape(cfg)
    rows = []
    for gpn, nodes in json.loads(sys.argv[3]):
        world = gpn * nodes
        for stage, offload in ((2, False), (2, True), (3, False), (3, True)):
            ours = SZ.model_states(shape["params"], shape["largest_layer"], stage, "cpu" if offload else "none",
                                   world, gpn, nodes, "bf16")
            if stage == 2:
                cpu, gpu = z2(shape["params"], gpn, nodes, cpu_offload=offload)
            else:
                cpu, gpu, _ = z3(shape["params"], shape["largest_layer"], gpn, nodes, cpu_offload=offload,
                                 cpu_offload_params=False, zero_init=False)
            rows.append([stage, offload, gpn, nodes, ours["device"], int(gpu), ours["host"], int(cpu)])
    out[path.stem] = {"meta": model.num_parameters(), "ours": shape["params"], "rows": rows}
print(json.dumps(out))
"""


def test_parameter_counts_and_model_states_match_transformers_and_deepspeed(train_python):
    done = subprocess.run([train_python, "-c", CHECK, str(ROOT / "lib"), str(ROOT / "tests" / "fixtures" / "configs"),
                           json.dumps(MIXES)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert sorted(out) == sorted(PUBLISHED)
    for name, got in out.items():
        assert got["ours"] == got["meta"], name
        assert abs(got["meta"] - PUBLISHED[name]) <= 0.005 * PUBLISHED[name], (name, got["meta"])  # published size
        assert len(got["rows"]) == 4 * len(MIXES)
        for stage, offload, gpn, nodes, ours_dev, ds_dev, ours_host, ds_host in got["rows"]:
            assert (ours_dev, ours_host) == (ds_dev, ds_host), (name, stage, offload, gpn, nodes)
