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
        for stage, offload, zero_init in ((2, False, False), (2, True, False), (3, False, False), (3, True, False),
                                          (3, False, True), (3, True, True)):
            ours = SZ.model_states(shape["params"], shape["largest_layer"], stage, "cpu" if offload else "none",
                                   world, gpn, nodes, "bf16", zero_init=zero_init)
            if stage == 2:
                cpu, gpu = z2(shape["params"], gpn, nodes, cpu_offload=offload)
            else:
                cpu, gpu, _ = z3(shape["params"], shape["largest_layer"], gpn, nodes, cpu_offload=offload,
                                 cpu_offload_params=False, zero_init=zero_init)
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
        assert len(got["rows"]) == 6 * len(MIXES)   # ZeRO-3 also as the plan sizes it: built under zero.Init
        for stage, offload, gpn, nodes, ours_dev, ds_dev, ours_host, ds_host in got["rows"]:
            assert (ours_dev, ours_host) == (ds_dev, ds_host), (name, stage, offload, gpn, nodes)


PARSE = r"""
import itertools, json, sys
sys.path.insert(0, sys.argv[1])
import deepspeed.runtime.config as C
from dsfleet_core import plan as P
def host(name, octet, bf16):  # a one-GPU host record as the plan role builds it from facts
    gpu = {"index": 0, "vendor": "nvidia", "name": "A100" if bf16 else "V100", "memory_mib": 81920,
           "compute_capability": "8.0" if bf16 else "7.0", "bf16": bf16}
    return {"name": name, "address": "10.1.0.%d" % octet, "reachable": True, "local": False,
            "gpu": {"accelerator": "nvidia", "gpus": [gpu], "cpu": {"cores": 8, "memory_mib": 65536}},
            "interfaces": [{"name": "eth0", "ipv4": ["10.1.0.%d/24" % octet]}], "home": "/h", "venv": "/h/venv"}
gpt2 = json.loads(open(sys.argv[2]).read())  # a model: its buckets are rendered scaled to hidden 768
checked = []
for world, stage, offload, precision, accum in itertools.product((1, 2, 3, 6, 8), (0, 1, 2, 3), ("none", "cpu"),
                                                                 ("fp32", "bf16", "fp16"), (1, 4)):
    if stage == 0 and offload == "cpu":
        continue
    hosts = [host("h%d" % i, 11 + i, precision != "fp16") for i in range(world)]
    plan = P.make_plan(hosts, {"run_id": "r", "zero_stage": stage, "offload": offload, "precision": precision,
                               "grad_accum": accum, "micro_batch": 2}, None, gpt2)
    C.dist.get_rank = lambda *a, **k: 0
    C.dist.get_world_size = lambda *a, world=plan["world_size"], **k: world
    parsed = C.DeepSpeedConfig(plan["ds_config"])
    assert parsed.world_size == world and parsed.train_batch_size == 2 * accum * world, plan["ds_config"]
    assert parsed.zero_optimization_stage == stage
    assert (parsed.zero_config.offload_optimizer is not None) == (offload == "cpu")
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.float16_config.enabled == (precision == "fp16")
    zc = parsed.zero_config
    if stage:
        assert zc.reduce_bucket_size == 768 * 768, plan["ds_config"]
    if stage in (1, 2):
        assert zc.allgather_bucket_size == 768 * 768
    if stage == 3:
        assert (zc.prefetch_bucket_size, zc.param_persistence_threshold) == (int(0.9 * 768 * 768), 7680)
    checked.append([world, stage, offload, precision, accum])
print(json.dumps(checked))
"""


def test_every_ds_config_the_plan_renders_parses_with_deepspeeds_own_config_class(train_python):
    done = subprocess.run([train_python, "-c", PARSE, str(ROOT / "lib"), str(ROOT / "tests" / "fixtures" / "configs" / "gpt2.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checked = json.loads(done.stdout.splitlines()[-1])
    assert len(checked) == 5 * 7 * 3 * 2  # world sizes x (stage, offload) x precision x accumulation
