"""The inference planner on tables of fleets and real model configs: tp per host, dtype, replicas, prompt split;
and the controller's reading of models and prompts (dsfleet_infer inputs), on real files."""
import base64
import json
import struct
import sys

import pytest
from test_plan import A100, MI250, RTX4090, V100, gpu, host, localhost

from dsfleet_core import PlanError
from dsfleet_core import infer as I


def opt(world, name):
    """The value of a world's --name=value launcher option (node_launch.py's arguments)."""
    return next(a.split("=", 1)[1] for a in world if a.startswith("--%s=" % name))


def devices(world):
    """{host: [devices]} of a world's --world_info."""
    return json.loads(base64.urlsafe_b64decode(opt(world, "world_info")))

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "action_plugins"))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "train"))
import dsfleet_modelinfo  # noqa: E402

# the published configs' numbers (config.json on the hub) and their exact parameter counts
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000, "max_position_embeddings": 4096}
LLAMA3_70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 8192}
GPT2_XL = {"model_type": "gpt2", "hidden_size": 1600, "num_hidden_layers": 48, "num_attention_heads": 25,
           "num_key_value_heads": 25, "vocab_size": 50257, "max_position_embeddings": 1024}


def model(config, params, chat=False):
    return {"source": {"kind": "controller", "path": "/models/m", "label": "m"},
            "info": {"found": True, "model": "/models/m", "config": config, "params": params, "chat_template": chat}}


def plan(hosts, mdl, count=20, max_chars=400, **knobs):
    return I.make_infer_plan(hosts, dict({"run_id": "i"}, **knobs), mdl, {"count": count, "max_chars": max_chars})


def by_name(p):
    return {h["name"]: h for h in p["hosts"]}


def test_a_7b_model_takes_one_device_where_it_fits_and_two_where_it_does_not():
    fleet = [host("ws", 11, [RTX4090(0), RTX4090(1)]), host("old", 12, [gpu(i, "Tesla V100-PCIE-16GB", 16384, "7.0")
                                                                         for i in range(4)])]
    p = plan(fleet, model(LLAMA2_7B, 6738415616))
    ws, old = by_name(p)["ws"], by_name(p)["old"]
    # 12.6 GiB of fp16/bf16 weights: whole on a 24 GiB card, split in two on a 16 GiB V100
    assert (ws["tp"], ws["replicas"], ws["dtype"]) == (1, 2, "bf16")
    assert (old["tp"], old["replicas"], old["dtype"]) == (2, 2, "fp16")
    assert ws["need_mib"] <= 24564 * I.DEVICE_USE and old["need_mib"] <= 16384 * I.DEVICE_USE
    assert old["sizing"]["weights"] == 12853  # 6,738,415,616 x 2 bytes
    # prompts in proportion to the replicas, in order, each exactly once
    assert [h["prompts"] for h in p["hosts"]] == [[0, 10], [10, 20]]
    assert ws["ds_inference_config"] == {"dtype": "bf16", "tensor_parallel": {"tp_size": 1},
                                         "replace_with_kernel_inject": False}
    argv = old["commands"]["infer"]["argv"]
    assert argv[:4] == ["timeout", "-k", "30", "3600"] and argv[argv.index("--specs") + 1] == json.dumps(
        old["commands"]["worlds"])
    # one world per replica: two worlds of two V100s each, on their own ports
    worlds = old["commands"]["worlds"]
    assert [(devices(w), opt(w, "master_port"), w[w.index("--replica") + 1]) for w in worlds] \
        == [({"localhost": [0, 1]}, "29500", "0"), ({"localhost": [2, 3]}, "29501", "1")]
    # each world is node_launch.py (DeepSpeed's launch.py without its imports), on this host alone
    assert all(w[2].endswith("/code/train/node_launch.py") and opt(w, "master_addr") == "127.0.0.1"
               and opt(w, "node_rank") == "0" and w[-1] == "2" for w in worlds)
    stage = old["commands"]["stage"]["argv"]
    assert stage[stage.index("--ports") + 1] == "29500,29501"


def test_a_70b_model_needs_four_a100s_and_no_v100_box_can_hold_it():
    fleet = [host("a100", 11, [A100(i) for i in range(4)]), host("v100", 12, [V100(i) for i in range(2)])]
    fleet[0]["gpu"]["cpu"]["memory_mib"] = 1024 * 1024
    p = plan(fleet, model(LLAMA3_70B, 70553706496))
    a = by_name(p)["a100"]
    assert (a["tp"], a["replicas"], a["ranks"]) == (2, 2, 4)  # 65.7 GiB bf16 in halves on 80 GiB cards
    assert [e["name"] for e in p["excluded"]] == ["v100"]
    assert "does not fit: tp=1 needs" in p["excluded"][0]["reason"]


def test_host_memory_limits_the_replicas_that_load_at_once():
    box = host("a100", 11, [A100(i) for i in range(4)])  # 64 GiB of host memory, 4 x 80 GiB devices
    p = plan([box], model(LLAMA2_7B, 6738415616))
    a = p["hosts"][0]
    assert a["tp"] == 1 and a["replicas"] == 4  # 4 x 12.6 GiB loads fit 64 GiB
    # tp=2 fits two 80 GiB devices, but each of the two ranks first reads the 131 GiB model into 64 GiB
    with pytest.raises(PlanError, match=r"a100: host memory 65536 MiB cannot hold 2 rank\(s\) loading the "
                                        r"134571 MiB model at once"):
        plan([box], model(LLAMA3_70B, 70553706496))
    with pytest.raises(PlanError, match=r"fits no host: small: the model does not fit: tp=1 needs \d+ MiB per "
                                        r"device, which has 81920 MiB"):
        plan([host("small", 11, [A100(0)])], model(LLAMA3_70B, 70553706496))


def test_a_family_autotp_does_not_support_runs_whole_or_says_why():
    small = [host("ws", 11, [RTX4090(0), RTX4090(1)])]
    p = plan(small, model(GPT2_XL, 1557611200))
    assert (p["hosts"][0]["tp"], p["hosts"][0]["replicas"]) == (1, 2) and p["model"]["autotp"] is False
    with pytest.raises(PlanError, match="automatic tensor parallelism does not support model type gpt2"):
        plan(small, model(GPT2_XL, 1557611200), tp=2)
    tiny_card = [host("t", 11, [gpu(0, "NVIDIA T400", 2048, "7.5"), gpu(1, "NVIDIA T400", 2048, "7.5")])]
    with pytest.raises(PlanError, match=r"AutoTP does not support gpt2: tp=1 only"):
        plan(tiny_card, model(GPT2_XL, 1557611200))


def test_a_forced_tp_the_host_cannot_take_is_an_error_naming_the_host():
    with pytest.raises(PlanError, match=r"tp=4 but host ws has 2 device\(s\)"):
        plan([host("ws", 11, [RTX4090(0), RTX4090(1)])], model(LLAMA2_7B, 6738415616), tp=4)
    with pytest.raises(PlanError, match=r"tp=4 but host localhost has 2 CPU ranks"):
        plan([localhost()], model(LLAMA2_7B, 1000), tp=4)
    odd = dict(LLAMA2_7B, num_attention_heads=6, num_key_value_heads=6)
    with pytest.raises(PlanError, match="tp=4 does not divide the model's 6 attention heads"):
        plan([host("a100", 11, [A100(i) for i in range(4)])], model(odd, 1000), tp=4)


def test_vendors_mix_and_cpu_hosts_wait_unless_alone():
    fleet = [host("nv", 11, [A100(0)]), host("amd", 12, [MI250(0), MI250(1)]), host("laptop", 20)]
    p = plan(fleet, model(LLAMA2_7B, 6738415616), count=9)
    assert [(h["name"], h["accelerator"], h["ds_accelerator"]) for h in p["hosts"]] == [
        ("nv", "nvidia", "cuda"), ("amd", "amd", "cuda")]
    assert [h["prompts"] for h in p["hosts"]] == [[0, 3], [3, 9]]
    assert p["excluded"] == [{"name": "laptop", "reason": "CPU only; the plan uses amd, nvidia"}]
    assert p["hosts"][0]["env"]["NCCL_SOCKET_IFNAME"] == "lo"
    cpu = plan([host("c1", 11, cores=8), host("c2", 12, cores=4)], model(LLAMA2_7B, 100000), count=3)
    assert [(h["name"], h["replicas"], h["prompts"], h["env"]["OMP_NUM_THREADS"]) for h in cpu["hosts"]] == [
        ("c1", 2, [0, 2], "4"), ("c2", 1, [2, 3], "4")]  # one prompt left for c2: one replica
    assert cpu["hosts"][0]["dtype"] == "fp32"


def test_fewer_prompts_than_hosts_leaves_hosts_out_and_subsets_of_devices_use_include():
    fleet = [host("a", 11, [A100(0), A100(1)], slots=1), host("b", 12, [A100(0)])]
    p = plan(fleet, model(LLAMA2_7B, 6738415616), count=1)
    assert [h["name"] for h in p["hosts"]] == ["a"]
    assert p["excluded"] == [{"name": "b", "reason": "no prompt left for it (1 prompt(s))"}]
    odd = host("g", 11, [A100(1), A100(3)])
    worlds = plan([odd], model(LLAMA2_7B, 6738415616), count=4)["hosts"][0]["commands"]["worlds"]
    assert [devices(w) for w in worlds] == [{"localhost": [1]}, {"localhost": [3]}]


def test_split_is_in_order_proportional_and_total():
    assert I.split(20, [2, 1, 1]) == [[0, 10], [10, 15], [15, 20]]
    assert I.split(7, [1, 1, 1]) == [[0, 3], [3, 5], [5, 7]]
    assert I.split(2, [1, 1, 1]) == [[0, 1], [1, 2], [2, 2]]
    for n in range(0, 30):
        parts = I.split(n, [3, 2, 1, 1])
        assert parts[0][0] == 0 and parts[-1][1] == n and all(a[1] == b[0] for a, b in zip(parts, parts[1:]))


def test_the_local_host_reads_the_model_where_it_is_and_others_get_it_shipped():
    p = plan([localhost(), host("w", 12)], model(LLAMA2_7B, 10000), count=4, accelerator="cpu")
    loc, w = by_name(p)["localhost"], by_name(p)["w"]
    assert loc["paths"]["model"] == "/models/m" and not loc["ship_model"]
    assert w["paths"]["model"] == "/home/u/.dsfleet/models/" + I.model_key("/models/m") and w["ship_model"]
    world = w["commands"]["worlds"][0]
    assert world[world.index("--model") + 1] == w["paths"]["model"] and devices(world) == {"localhost": [0]}
    stage = w["commands"]["stage"]["argv"]
    assert stage[stage.index("--ports") + 1] == "29500,29501"
    assert json.loads(stage[stage.index("--preflight") + 1])["argv"][2] == "--preflight"
    assert "left out" not in "\n".join(I.table(p))


def test_the_plan_fails_clearly_on_a_missing_model_or_no_prompt():
    with pytest.raises(PlanError, match="has no weights"):
        I.make_infer_plan([localhost()], {"run_id": "i"},
                          {"source": {}, "info": {"found": False, "error": "x has no weights"}}, {"count": 1})
    with pytest.raises(PlanError, match="there is no prompt"):
        plan([localhost()], model(LLAMA2_7B, 100), count=0)


# --- the controller side: real files ------------------------------------------------------------------------

def _safetensors(path, tensors):
    header = json.dumps({name: {"dtype": dt, "shape": shape, "data_offsets": [0, 0]} for name, (dt, shape) in
                         tensors.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def test_model_info_counts_parameters_from_safetensors_headers(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA2_7B, torch_dtype="bfloat16")))
    info = dsfleet_modelinfo.model_info(str(tmp_path))
    assert not info["found"] and "no weights" in info["error"]
    _safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": ("BF16", [4096, 32000]), "b": ("F32", [10])})
    _safetensors(tmp_path / "model-00002-of-00002.safetensors", {"c": ("BF16", [3, 5])})
    assert "no tokenizer" in dsfleet_modelinfo.model_info(str(tmp_path))["error"]
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    info = dsfleet_modelinfo.model_info(str(tmp_path))
    assert info["found"] and info["params"] == 4096 * 32000 + 10 + 15 and info["dtype"] == "BF16"
    assert info["bytes"] == 2 * (4096 * 32000 + 15) + 40 and info["chat_template"]
    assert info["config"]["num_key_value_heads"] == 32
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"\xff" * 8)
    assert "cannot read the weights" in dsfleet_modelinfo.model_info(str(tmp_path))["error"]


def test_model_info_finds_a_hub_id_in_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert "neither a directory nor a hub id in the local Hugging Face cache" in dsfleet_modelinfo.model_info(
        "org/name")["error"]
    snap = tmp_path / "models--org--name" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--name" / "refs").mkdir()
    (tmp_path / "models--org--name" / "refs" / "main").write_text("abc")
    (snap / "config.json").write_text(json.dumps(GPT2_XL))
    assert dsfleet_modelinfo.model_info("org/name")["dir"] == str(snap)


def test_prompts_are_read_in_order_and_bad_files_name_the_line(tmp_path):
    import dsfleet_infer as A
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": 7}\n{"messages": [{"role": "user", "content": "c"}]}\n')
    assert A.read_prompts("", str(good), "prompt") == [
        {"index": 0, "prompt": "a"}, {"index": 1, "prompt": "b"},
        {"index": 2, "messages": [{"role": "user", "content": "c"}]}]
    assert A.read_prompts("hi there", "", "prompt") == [{"index": 0, "prompt": "hi there"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(A.InputError, match="line 2 is not JSON"):
        A.read_prompts("", str(bad), "prompt")
    bad.write_text('{"question": "a"}\n')
    with pytest.raises(A.InputError, match=r"line 1 has no \"prompt\" string .* its fields: question. Name the field"):
        A.read_prompts("", str(bad), "prompt")
    assert A.read_prompts("", str(bad), "question") == [{"index": 0, "prompt": "a"}]
    with pytest.raises(A.InputError, match="cannot read prompts="):
        A.read_prompts("", str(tmp_path / "missing.jsonl"), "prompt")
    with pytest.raises(A.InputError, match="either prompt= or prompts="):
        A.read_prompts("x", str(good), "prompt")
    with pytest.raises(A.InputError, match="nothing to answer"):
        A.read_prompts("", "", "prompt")


def test_a_model_is_a_run_export_a_controller_directory_or_left_to_the_hosts(tmp_path):
    import dsfleet_infer as A
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "plan.json").write_text("{}")
    assert A.resolve_model("r1", str(tmp_path / "runs"))["kind"] == "run"  # no export yet: infer.yml makes it
    for step in (3, 6):
        (run / ("export-global_step%d" % step)).mkdir()
        (run / ("export-global_step%d" % step) / "model.safetensors").write_bytes(b"")
    newest = A.resolve_model("", str(tmp_path / "runs"))  # no model: the newest run
    assert (newest["kind"], newest["path"], newest["step"]) == ("controller", str(run / "export-global_step6"), 6)
    assert A.resolve_model("r1", str(tmp_path / "runs"), 3)["path"] == str(run / "export-global_step3")
    assert A.resolve_model("r1", str(tmp_path / "runs"), 4)["kind"] == "run"
    assert A.resolve_model(str(tmp_path), str(tmp_path / "runs"))["kind"] == "controller"
    assert A.resolve_model("meta-llama/Llama-3.2-1B", str(tmp_path / "runs"))["kind"] == "host"
    with pytest.raises(A.InputError, match=r"model=tiny is a bundled preset: a config and a tokenizer, no weights; "
                                           r"train it \(./dsfleet launch.yml -e model=tiny\)"):
        A.resolve_model("tiny", str(tmp_path / "runs"))
    with pytest.raises(A.InputError, match="holds no run"):
        A.resolve_model("", str(tmp_path / "empty"))


def test_a_hub_id_is_told_from_presets_and_paths_and_its_config_is_read_from_the_hub(tmp_path, monkeypatch):
    """dsfleet_inputs.hub_model: org/name is a hub model unless a directory of that name is here; modelinfo reads
    a hub model's config.json from HF_ENDPOINT (a stand-in for the hub on loopback) with the token, and says why
    not for a missing one."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "rig"))
    import dsfleet_inputs
    import fake_hub
    assert dsfleet_inputs.hub_model("Qwen/Qwen2.5-0.5B", "v2") == {"hub": "Qwen/Qwen2.5-0.5B", "revision": "v2"}
    for not_hub in ("tiny", "/models/llama", "./a/b", "a/b/c", "a/..", "../x", ""):
        assert dsfleet_inputs.hub_model(not_hub) is None, not_hub
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert dsfleet_inputs.hub_model("org/local") is None          # a directory here wins, as in from_pretrained
    repo = tmp_path / "hub" / "acme" / "m"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps(LLAMA2_7B))
    srv = fake_hub.serve(str(tmp_path / "hub"), "127.0.0.1", 0, log=open("/dev/null", "w"))
    try:
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:%d" % srv.server_address[1])
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        info = dsfleet_modelinfo.model_info("acme/m", "main")
        assert info["raw_config"] == LLAMA2_7B and not info["found"]
        assert "config.json read from the hub; the weights are downloaded at launch" in info["error"]
        missing = dsfleet_modelinfo.model_info("acme/nope", "main")
        assert missing["raw_config"] is None and "acme/nope@main on http://127.0.0.1:" in missing["error"]
        assert "not found (check the id and the revision)" in missing["error"]
        # without a revision (infer.yml's reading of the hosts' caches) nothing is fetched
        assert "neither a directory nor a hub id" in dsfleet_modelinfo.model_info("acme/m")["error"]
    finally:
        srv.shutdown()
        srv.server_close()
