"""The model's shape from config.json and the memory check of the plan, on published model configs and device
mixes (tests/fixtures/configs; the counts below are what transformers builds, checked on the meta device by
tests/e2e/test_sizing_against_tools.py)."""
import json
import pathlib
import re

import pytest
from test_plan import A100, RTX4090, gpu, host

from dsfleet_core import PlanError
from dsfleet_core import plan as P
from dsfleet_core import run as R
from dsfleet_core import shape as SH
from dsfleet_core import sizing as SZ

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "configs"
COUNTS = {"llama-2-7b": 6738415616, "mistral-7b": 7241732096, "mixtral-8x7b": 46702792704, "qwen2-7b": 7615616512,
          "qwen3-8b": 8190735360, "gemma-7b": 8537680896, "gemma2-9b": 9241705984, "phi3-mini": 3821079552,
          "falcon-7b": 6921720704, "falcon-40b": 41303293952, "opt-6.7b": 6658473984, "bloom-7b1": 7069016064,
          "gpt-neox-20b": 20554567680, "gpt2": 124439808, "phi-2": 2779683840}


def config(name):
    return json.loads((CONFIGS / ("%s.json" % name)).read_text())


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameters_from_the_config_alone(name):
    shape = SH.model_shape(config(name))
    assert shape["params"] == COUNTS[name]
    assert shape["largest_layer"] >= shape["hidden"] ** 2 // 4 and shape["largest_layer"] < shape["params"]


def test_mixtral_counts_its_active_parameters_apart():
    shape = SH.model_shape(config("mixtral-8x7b"))
    assert (shape["experts"], shape["params_active"]) == (8, 12879925248)  # two of eight experts per token
    assert SH.model_shape(config("llama-2-7b"))["params_active"] == COUNTS["llama-2-7b"]


def test_an_unknown_family_says_which_are_known():
    with pytest.raises(SH.ShapeError, match="cannot size model_type 't5'.*known: bloom, falcon"):
        SH.model_shape({"model_type": "t5", "vocab_size": 10})


def test_model_states_are_deepspeeds_formulas():
    p, ll = 6738415616, 131072000
    # stage 2: 2P + 18P/N on the device; offload: 2P, and P * max(4N, 16) * 1.5 on the host
    assert SZ.model_states(p, ll, 2, "none", 4, 4, 1, "bf16") == {"device": 2 * p + 18 * p // 4,
                                                                    "host": int(p * 4 * 4 * 1.5)}
    assert SZ.model_states(p, ll, 2, "cpu", 4, 4, 1, "bf16") == {"device": 2 * p, "host": int(p * 16 * 1.5)}
    # stage 3: 4 x largest layer + 18P/N; offload: + 2P/N
    assert SZ.model_states(p, ll, 3, "none", 8, 8, 1, "bf16")["device"] == 4 * ll + 18 * p // 8
    assert SZ.model_states(p, ll, 3, "cpu", 8, 4, 2, "bf16") == {"device": 4 * ll + 2 * p // 8,
                                                                   "host": int(p * max(16, 16 / 2) * 1.5)}
    # fp32: under ZeRO the same components in 4 bytes (DeepSpeed clones the master partition and flattens the
    # gradients even for an fp32 model): 4 + 20, the 20 partitioned from ZeRO-2 on; without ZeRO torch's optimizer
    # steps the model itself: 4 + 4 + 8
    assert SZ.model_states(p, ll, 0, "none", 2, 2, 1, "fp32")["device"] == 16 * p
    assert SZ.model_states(p, ll, 0, "none", 2, 2, 1, "bf16")["device"] == 20 * p
    assert SZ.model_states(p, ll, 2, "none", 2, 2, 1, "fp32")["device"] == 4 * p + 20 * p // 2


def plan(hosts, name, **knobs):
    return P.make_plan(hosts, dict({"run_id": "r"}, **knobs), None, config(name))


def big(name, octet, gpus, ram_gib):
    record = host(name, octet, gpus)
    record["gpu"]["cpu"]["memory_mib"] = ram_gib * 1024
    return record


def test_a_7b_model_on_four_a100s_fits_and_the_table_says_by_how_much():
    p = plan([big("srv", 11, [A100(i) for i in range(4)], 512)], "llama-2-7b", precision="bf16")
    s = p["sizing"]
    assert s["fits"] and s["params"] == COUNTS["llama-2-7b"] and s["zero_stage"] == 2
    assert s["model_states_mib"] == SZ.mib(2 * COUNTS["llama-2-7b"] + 18 * COUNTS["llama-2-7b"] // 4)
    assert s["device_mib"] == s["model_states_mib"] + s["activations_mib"] + s["buffers_mib"] + s["runtime_mib"] <= 81920 * 0.9
    line = [ln for ln in R.plan_table(p) if ln.startswith("memory:")][0]
    assert "6,738,415,616 parameters (llama); ZeRO-2 bf16, micro batch 4 x 128 tokens" in line
    assert "of 81920 on the smallest (srv, NVIDIA A100-SXM4-80GB)" in line


def test_a_configuration_that_cannot_fit_stops_the_plan_naming_the_nearest_that_does():
    fleet = [big("srv", 11, [A100(i) for i in range(4)], 512), big("ws", 12, [RTX4090(0), RTX4090(1)], 512)]
    # ZeRO-2 over 6 ranks is 5 bytes a parameter on every device: 31.4 GiB, more than a 24 GiB card holds
    with pytest.raises(PlanError, match=r"does not fit: 6,738,415,616 parameters \(llama\), ZeRO-2, bf16, micro batch "
                                        r"4 x 128 tokens needs \d+ MiB per device .* the smallest, NVIDIA GeForce RTX "
                                        r"4090 on ws, has 24564 MiB. The nearest configuration that fits: "
                                        r"-e zero_stage=2 -e offload=cpu -e micro_batch=4"):
        plan(fleet, "llama-2-7b", zero_stage=2, offload="none", micro_batch=4, use_all_devices=True)  # stage kept
    with pytest.raises(PlanError, match=r"ZeRO-0, bf16, micro batch 4 .* nearest configuration that fits: "
                                        r"-e zero_stage=3 -e offload=none -e micro_batch=2 \("):
        plan(fleet, "llama-2-7b", zero_stage=0)   # nothing fits at ZeRO-0 (with or without the 4090s)
    assert plan(fleet, "llama-2-7b", offload="cpu", use_all_devices=True)["sizing"]["zero_stage"] == 2


def test_left_unset_the_plan_picks_the_least_sharded_configuration_that_fits_and_says_why():
    """Mixed cards: ZeRO-2 cannot fit the 24 GB cards at any micro batch, ZeRO-3 can at micro batch 2, so every rank
    gets ZeRO-3 and micro batch 2; the sizing keeps what it passed over and why (use_all_devices: the plan would
    otherwise leave the 4090s out, test_speed.py)."""
    fleet = [big("srv", 11, [A100(i) for i in range(4)], 512), big("ws", 12, [RTX4090(0), RTX4090(1)], 512)]
    p = plan(fleet, "llama-2-7b", use_all_devices=True)
    s = p["sizing"]
    assert (s["zero_stage"], s["offload"], s["micro_batch"], s["grad_accum"], s["activation_checkpointing"]) == \
        (3, "none", 2, 1, False)
    assert (p["zero"], p["batch"]["micro"], p["batch"]["global"]) == ({"stage": 3, "offload": "none"}, 2, 12)
    assert p["ds_config"]["zero_optimization"]["stage"] == 3 and p["ds_config"]["train_micro_batch_size_per_gpu"] == 2
    assert s["device_mib"] <= 24564 * SZ.DEVICE_USE and s["zero_init"] is True
    assert s["chosen_by_plan"] == ["zero_stage", "offload", "micro_batch", "activation_checkpointing"]
    rejected = [(c["zero_stage"], c["activation_checkpointing"], c["micro_batch"]) for c in s["considered"]
                if c["rejected"]]
    assert rejected == [(2, False, 1), (2, True, 1)]   # ZeRO-2 fails even at micro batch 1, with checkpointing
    assert all("over the 22107 MiB" in c["rejected"] for c in s["considered"] if c["rejected"])
    table = "\n".join(R.plan_table(p))
    assert "ZeRO-3 bf16, micro batch 2 x 128 tokens" in table
    assert ("chosen by the plan (zero_stage, offload, micro_batch, activation_checkpointing): ZeRO-2 needs 33518 MiB "
            "per device even at micro batch 1 with activation checkpointing; so ZeRO-3, micro batch 2 x 1 "
            "accumulated") in table, table


def test_host_memory_counts_every_rank_loading_the_whole_model():
    # four ranks each read the 7B model in bf16 before ZeRO-2 partitions it: 77 GiB on a 64 GiB host; ZeRO-3 builds
    # it partitioned (deepspeed.zero.Init) and fits
    fleet = [big("srv", 11, [A100(i) for i in range(4)], 64)]
    with pytest.raises(PlanError, match=r"needs 77116 MiB of host memory on srv to load it"):
        plan(fleet, "llama-2-7b", precision="bf16", zero_stage=2)
    s = plan(fleet, "llama-2-7b", precision="bf16")["sizing"]
    assert (s["zero_stage"], s["micro_batch"]) == (3, 4)
    assert s["considered"][0]["rejected"] == "needs 77116 MiB of host memory on srv"


def test_a_global_batch_takes_the_largest_micro_batch_that_fits_and_accumulates_the_rest():
    fleet = [big("srv", 11, [A100(i) for i in range(4)], 512)]
    p = plan(fleet, "llama-2-7b", precision="bf16", global_batch=256)
    s = p["sizing"]
    assert (s["zero_stage"], s["micro_batch"], s["grad_accum"]) == (2, 32, 2)
    assert p["batch"] == {"micro": 32, "grad_accum": 2, "global": 256}
    assert p["ds_config"]["train_batch_size"] == 256 and p["ds_config"]["gradient_accumulation_steps"] == 2
    # 64 per rank would not fit: the plan says so in what it considered first
    assert s["considered"][0]["micro_batch"] == 32 and s["considered"][0]["rejected"] is None
    too_big = SZ.need(SH.model_shape(config("llama-2-7b")), 2, "none", 64, 128, "bf16", 4, 4, 1, "gpu",
                      load_bytes=2)
    assert SZ.mib(too_big["device"]) > 81920 * SZ.DEVICE_USE
    # the user's micro batch is kept when it divides
    assert plan(fleet, "llama-2-7b", precision="bf16", global_batch=256, micro_batch=8)["batch"] == \
        {"micro": 8, "grad_accum": 8, "global": 256}


@pytest.mark.parametrize("knobs,message", [
    ({"global_batch": 6}, "global_batch=6 does not divide over the plan's 4 ranks; pass a multiple of 4 "
                          "(e.g. -e global_batch=4)"),
    ({"global_batch": 64, "grad_accum": 2}, "global_batch=64 and grad_accum=2 were both passed; pass one"),
    ({"global_batch": 64, "micro_batch": 3}, "global_batch=64 is 16 sequences per rank over 4 ranks, which "
                                             "micro_batch=3 does not divide; pass a micro_batch among 16, 8, 4, 2, 1"),
])
def test_a_global_batch_that_cannot_be_met_is_refused_naming_the_fix(knobs, message):
    with pytest.raises(PlanError, match=re.escape(message)):
        plan([big("srv", 11, [A100(i) for i in range(4)], 512)], "llama-2-7b", **knobs)


def test_activation_checkpointing_only_when_nothing_fits_without_it():
    fleet = [big("ws", 12, [RTX4090(0), RTX4090(1)], 512)]
    s = plan(fleet, "llama-2-7b", block_size=4096)["sizing"]
    assert (s["zero_stage"], s["offload"], s["micro_batch"], s["activation_checkpointing"]) == (2, "cpu", 2, True)
    assert s["considered"][-1]["rejected"] is None and s["considered"][-1]["activation_checkpointing"]
    assert all(c["rejected"] for c in s["considered"] if not c["activation_checkpointing"])
    p = plan(fleet, "llama-2-7b", block_size=4096)
    assert p["training"]["activation_checkpointing"] is True and "--activation_checkpointing" in json.dumps(p)
    assert "--activation_checkpointing" not in json.dumps(plan(fleet, "llama-2-7b"))
    assert plan(fleet, "llama-2-7b", block_size=128)["sizing"]["activation_checkpointing"] is False
    with pytest.raises(PlanError, match="nearest configuration that fits: .* -e activation_checkpointing=true"):
        plan(fleet, "llama-2-7b", block_size=4096, activation_checkpointing=False)


def test_the_bundled_tiny_model_keeps_todays_plan():
    p = P.make_plan([host("cpu1", 11, cores=8)], {"run_id": "r"}, None,
                    json.loads((CONFIGS.parents[2] / "train" / "presets" / "tiny" / "config.json").read_text()))
    assert (p["zero"], p["batch"]) == ({"stage": 2, "offload": "none"}, {"micro": 4, "grad_accum": 1, "global": 8})
    assert p["sizing"]["known"] and p["sizing"]["chosen_by_plan"]


def test_not_sized_a_global_batch_still_sets_micro_batch_and_accumulation():
    p = P.make_plan([host("srv", 11, [A100(i) for i in range(4)])], {"run_id": "r", "global_batch": 48})
    assert p["sizing"] is None and p["batch"] == {"micro": 4, "grad_accum": 3, "global": 48}
    p = P.make_plan([host("srv", 11, [A100(i) for i in range(4)])], {"run_id": "r", "global_batch": 24})
    assert p["batch"] == {"micro": 3, "grad_accum": 2, "global": 24}


def test_nothing_fits_says_what_would_help():
    with pytest.raises(PlanError, match="neither does any ZeRO stage with or without offload at micro batch 1. Add "
                                        "devices or hosts with more memory, shorten block_size"):
        plan([big("tiny", 11, [gpu(0, "NVIDIA T400", 2048, "7.5")], 8)], "llama-2-7b")


def test_a_model_the_sizing_does_not_know_is_planned_and_says_so():
    p = P.make_plan([host("srv", 11, [A100(0)])], {"run_id": "r"}, None, {"model_type": "t5", "vocab_size": 3})
    assert p["sizing"] == {"known": False, "note": "not sized: cannot size model_type 't5' from its config (known: "
                                                   "%s)" % ", ".join(SH.FAMILIES)}
    assert "memory: not sized: cannot size model_type 't5'" in "\n".join(R.plan_table(p))
    assert P.make_plan([host("srv", 11, [A100(0)])], {"run_id": "r"})["sizing"] is None


def test_cpu_ranks_reduce_the_whole_small_model_in_one_bucket_and_gpus_keep_hidden_squared():
    """gloo's fixed cost per collective dominates small buckets on CPU ranks (bench/vs_trainer.py): there a ZeRO-1/2
    bucket holds the whole model up to CPU_BUCKET_MAX elements, and the buffers the plan counts grow with it."""
    small = {"hidden": 512, "params": 26_354_176, "largest_layer": 524_288}
    big = {"hidden": 4096, "params": 6_738_415_616, "largest_layer": 131_072_000}
    assert SZ.buckets(small, 2, "cpu") == {"reduce_bucket_size": 26_354_176, "allgather_bucket_size": 26_354_176}
    assert SZ.buckets(small, 2, "gpu") == {"reduce_bucket_size": 512 * 512, "allgather_bucket_size": 512 * 512}
    assert SZ.buckets(big, 1, "cpu")["reduce_bucket_size"] == SZ.CPU_BUCKET_MAX == 1 << 25
    odd = dict(small, params=26_354_177)
    assert SZ.buckets(odd, 2, "cpu")["allgather_bucket_size"] % 2 == 0   # ZeRO-1/2 assert an even bucket
    assert SZ.buckets(small, 3, "cpu") == SZ.buckets(small, 3, "gpu")     # ZeRO-3's prefetch stays hidden-scaled
    assert SZ.buffers(small, 2, "bf16", "cpu") == 26_354_176 * 2 > SZ.buffers(small, 2, "bf16", "gpu")
