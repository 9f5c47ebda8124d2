"""The step-time estimate and the devices the plan leaves out of mixed clusters (pure; the model configs are the
published ones in tests/fixtures/configs)."""
import pytest
from test_plan import A100, RTX4090, V100, gpu, host
from test_sizing import big, config, plan

from dsfleet_core import PlanError
from dsfleet_core import run as R
from dsfleet_core import shape as SH
from dsfleet_core import speed as SP

RTX2080 = lambda i: gpu(i, "NVIDIA GeForce RTX 2080", 8192, "7.5")  # noqa: E731
RTX2080TI = lambda i: gpu(i, "NVIDIA GeForce RTX 2080 Ti", 11264, "7.5")  # noqa: E731


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "bf16", 835.5),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0), ("Tesla V100-PCIE-16GB", "fp16", 112.0), ("Tesla T4", "fp16", 65.0),
    ("NVIDIA GeForce RTX 2080 Ti", "fp16", 53.8), ("NVIDIA GeForce RTX 2080", "fp16", 40.3),
    ("NVIDIA GeForce RTX 3090 Ti", "bf16", 80.0), ("NVIDIA GeForce RTX 3090", "bf16", 71.0),
    ("NVIDIA L40S", "bf16", 362.05), ("NVIDIA L40", "bf16", 181.05), ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA A10", "bf16", 125.0), ("NVIDIA A40", "bf16", 149.7),
    ("AMD Instinct MI250X", "bf16", 191.5), ("AMD Instinct MI300X", "bf16", 1307.4)])
def test_device_peaks_by_the_names_the_tools_report(name, precision, tflops):
    assert SP.device_peak(name, precision)[0] == tflops


def test_an_unknown_device_has_no_peak():
    assert SP.device_peak("NVIDIA RTX 5880 Ada Generation", "bf16") is None


def test_the_step_time_follows_the_slowest_device_the_stage_and_the_offload():
    shape = SH.model_shape(config("llama-2-7b"))
    hosts = [{"name": "a", "slots": 2, "device_names": ["NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"]}]
    two = SP.step_time(shape, 2, "none", 2, 1, 128, "bf16", False, hosts)
    assert two["slowest"] == "NVIDIA GeForce RTX 4090"
    flops = (6 * shape["params"] + 12 * 32 * 4096 * 128) * 2 * 128
    assert two["compute"] == pytest.approx(flops / (165.2e12 * 0.4))
    # one host: PCIe; ZeRO-2 moves 2 x P x 2 bytes x (n-1)/n per rank, ZeRO-3 half as much again
    assert two["communication"] == pytest.approx(2 * shape["params"] * 2 * 0.5 * 8 / 128e9)
    three = SP.step_time(shape, 3, "none", 2, 1, 128, "bf16", False, hosts)
    assert three["communication"] == pytest.approx(1.5 * two["communication"])
    assert SP.step_time(shape, 2, "none", 2, 1, 128, "bf16", True, hosts)["compute"] == pytest.approx(
        two["compute"] * 4 / 3)
    offloaded = SP.step_time(shape, 2, "cpu", 2, 1, 128, "bf16", False, hosts)
    assert offloaded["offload"] > 0 and offloaded["step"] > two["step"]
    # across hosts the network carries it: 10 Gbit/s when the facts give no speed
    apart = [{"name": "a", "slots": 1, "device_names": ["NVIDIA A100-SXM4-80GB"]},
             {"name": "b", "slots": 1, "device_names": ["NVIDIA A100-SXM4-80GB"]}]
    assert SP.step_time(shape, 2, "none", 2, 1, 128, "bf16", False, apart)["communication"] == pytest.approx(
        two["communication"] * 128 / 10)
    assert SP.step_time(shape, 2, "none", 2, 1, 128, "bf16", False, apart, 100.0)["communication"] == \
        pytest.approx(two["communication"] * 128 / 100)
    assert SP.step_time(shape, 2, "none", 2, 1, 128, "bf16", False,
                        [{"name": "a", "slots": 1, "device_names": ["Mystery GPU"]}]) is None


def test_two_rtx_2080s_beside_four_a100s_are_left_out_and_the_plan_says_why():
    """The issue's case: with the 2080s (8 GB, no bf16) all six ranks would train in fp16 under ZeRO-3 with offload
    and wait for the 2080s every step; without them the A100s run bf16 ZeRO-2."""
    fleet = [big("srv", 11, [A100(i) for i in range(4)], 512), big("ws", 12, [RTX2080(0), RTX2080(1)], 512)]
    kept = plan(fleet, "llama-2-7b", use_all_devices=True)
    assert (kept["precision"], kept["zero"], kept["world_size"]) == ("fp16", {"stage": 3, "offload": "cpu"}, 6)
    assert kept["speed"]["slowest_device"] == "NVIDIA GeForce RTX 2080"
    assert "without NVIDIA GeForce RTX 2080 (8192 MiB) the estimate is" in kept["speed"]["note"]
    p = plan(fleet, "llama-2-7b")
    assert [h["name"] for h in p["hosts"]] == ["srv"] and p["world_size"] == 4
    assert (p["precision"], p["zero"]) == ("bf16", {"stage": 2, "offload": "none"})
    assert p["speed"]["tokens_per_s"] > kept["speed"]["tokens_per_s"] * 5
    reason = dict((e["name"], e["reason"]) for e in p["excluded"])["ws"]
    assert reason.startswith("its NVIDIA GeForce RTX 2080: with them every step waits for the slowest device; the "
                             "smallest device forces a more sharded configuration or a smaller micro batch; their "
                             "host adds communication over the network: estimated %d tokens/s on 6 devices (fp16, "
                             "ZeRO-3 + offload, micro batch " % kept["speed"]["tokens_per_s"]), reason
    assert "against %d tokens/s on 4 without them (bf16, ZeRO-2, micro batch 4)" % p["speed"]["tokens_per_s"] in reason
    assert reason.endswith("; -e use_all_devices=true keeps them")
    table = "\n".join(R.plan_table(p))
    assert "left out: ws — its NVIDIA GeForce RTX 2080: with them every step waits for the slowest" in table
    assert "speed (estimate from datasheet peaks at 40% utilization): " in table
    assert "compute" in table and "on the slowest, NVIDIA A100-SXM4-80GB; communication" in table


def test_a_slow_card_in_the_same_workstation_is_left_out_by_its_index():
    """A 2080 Ti (device 0) beside a 4090 (device 1) in one host: one 4090 outruns both at the 2080 Ti's pace; the
    plan keeps device 1 only and DeepSpeed's --include names it."""
    ws = host("ws", 12, [RTX2080TI(0), RTX4090(1)])
    p = plan([ws], "gpt2")
    assert p["hosts"][0]["devices"] == [1] and p["world_size"] == 1 and p["excluded"] == []
    assert p["include"] == "10.1.0.12:1" or p["include"] == "localhost:1"
    left = p["left_out_devices"]
    assert [(e["name"], e["devices"], e["device_name"]) for e in left] == [("ws", [0], "NVIDIA GeForce RTX 2080 Ti")]
    assert "left out: ws's NVIDIA GeForce RTX 2080 Ti (device 0) — with them every step waits" in \
        "\n".join(R.plan_table(p))
    assert plan([ws], "gpt2", use_all_devices=True)["hosts"][0]["devices"] == [0, 1]


def test_devices_with_which_a_forced_configuration_cannot_fit_are_left_out():
    fleet = [big("srv", 11, [A100(i) for i in range(4)], 512), big("ws", 12, [RTX4090(0), RTX4090(1)], 512)]
    p = plan(fleet, "llama-2-7b", zero_stage=2, offload="none", micro_batch=4)
    assert [h["name"] for h in p["hosts"]] == ["srv"]
    reason = dict((e["name"], e["reason"]) for e in p["excluded"])["ws"]
    assert reason.startswith("its NVIDIA GeForce RTX 4090: with them: the model does not fit: 6,738,415,616 "
                             "parameters (llama), ZeRO-2"), reason
    with pytest.raises(PlanError, match="does not fit"):
        plan(fleet, "llama-2-7b", zero_stage=2, offload="none", micro_batch=4, use_all_devices=True)


def test_equal_cards_keep_everything_and_get_an_estimate():
    p = plan([host("a", 11, [V100(0), V100(1)]), host("b", 12, [V100(0), V100(1)])], "gpt2")
    assert p["world_size"] == 4 and p["excluded"] == [] and p["left_out_devices"] == []
    assert p["speed"]["slowest_device"] == "Tesla V100-SXM2-32GB" and p["speed"]["network_assumed"] is True
    assert "over 10 Gbit/s (assumed where the facts give no link speed)" in "\n".join(R.plan_table(p))


def test_the_network_speed_comes_from_the_facts():
    a, b = host("a", 11, [V100(0)]), host("b", 12, [V100(0)])
    for h in (a, b):
        h["interfaces"][1]["speed_mbps"] = 100000
    s = plan([a, b], "gpt2")["speed"]
    assert (s["network_gbps"], s["network_assumed"]) == (100.0, False)


def test_a_device_without_a_datasheet_figure_is_kept_and_said():
    odd = gpu(1, "NVIDIA RTX 5880 Ada Generation", 49152, "8.9")
    p = plan([host("ws", 12, [RTX4090(0), odd])], "gpt2")
    assert p["world_size"] == 2 and p["left_out_devices"] == []
    assert p["speed"]["tokens_per_s"] is None
    assert ("speed: no step-time estimate: no datasheet figure for NVIDIA RTX 5880 Ada Generation in "
            "lib/dsfleet_core/speed.py") in "\n".join(R.plan_table(p))


def test_the_chosen_master_is_never_left_out():
    fleet = [big("srv", 11, [A100(i) for i in range(4)], 512), big("ws", 12, [RTX2080(0), RTX2080(1)], 512)]
    p = plan(fleet, "llama-2-7b", master="ws")
    assert p["master"]["name"] == "ws" and p["world_size"] == 6


def test_a_fast_card_is_never_left_out_to_keep_a_slow_one():
    """A V100 (device 0) beside two A100s in one host: dropping the A100s would leave one rank with no
    communication, but the plan only ever leaves out kinds slower or smaller than all it keeps."""
    p = plan([host("srv", 11, [V100(0), A100(1), A100(2)])], "gpt2")
    assert 1 in p["hosts"][0]["devices"] and 2 in p["hosts"][0]["devices"]
    # the user's master on the V100 host keeps that host: the A100 host is not traded for it
    fleet = [host("m", 11, [V100(0)]), host("a", 12, [A100(0), A100(1)])]
    p = plan(fleet, "gpt2", master="m")
    assert [h["name"] for h in p["hosts"]] == ["m", "a"] and p["world_size"] == 3


def test_each_candidate_is_priced_over_its_own_slowest_link():
    """Two 100 Gbit/s A100 hosts and one V100 host on 1 Gbit/s: without the V100 host the A100s talk at 100."""
    a, b, v = (host("a", 11, [A100(0), A100(1)]), host("b", 12, [A100(0), A100(1)]), host("v", 13, [V100(0)]))
    for h, mbps in ((a, 100000), (b, 100000), (v, 1000)):
        h["interfaces"][1]["speed_mbps"] = mbps
    p = plan([a, b, v], "gpt2")
    assert [h["name"] for h in p["hosts"]] == ["a", "b"]
    assert (p["speed"]["network_gbps"], p["speed"]["network_assumed"]) == (100.0, False)
    reason = dict((e["name"], e["reason"]) for e in p["excluded"])["v"]
    assert "every step waits for the slowest device" in reason and "over the network" in reason


def test_errors_that_are_not_memory_still_stop_the_plan():
    fleet = [host("srv", 11, [A100(i) for i in range(4)]), host("old", 12, [V100(0), V100(1)])]
    with pytest.raises(PlanError, match="global_batch=8 does not divide over the plan's 6 ranks"):
        plan(fleet, "gpt2", global_batch=8)
    with pytest.raises(PlanError, match="precision=bf16 but old cannot run bf16"):
        plan(fleet, "gpt2", precision="bf16")


def test_a_smaller_card_of_the_same_speed_is_left_out_only_when_it_costs():
    small = lambda i: gpu(i, "NVIDIA A100-SXM4-40GB", 40960, "8.0")  # noqa: E731
    p = plan([host("srv", 11, [A100(0), A100(1), small(2), small(3)])], "gpt2")
    assert p["world_size"] == 4 and p["left_out_devices"] == []   # gpt2 fits 40 GB as it fits 80: all kept
    s = plan([big("srv", 11, [A100(0), A100(1), small(2), small(3)], 512)], "llama-2-7b", zero_stage=2,
             offload="none")
    assert s["world_size"] == 2 and s["left_out_devices"][0]["devices"] == [2, 3]
    assert "with them: the model does not fit" in s["left_out_devices"][0]["reason"]
