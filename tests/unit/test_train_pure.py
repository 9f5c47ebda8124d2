"""The training module's torch-free pieces, imported directly (train/dsfleet_config.py, train/dsfleet_data.py):
packing, sharding, ordering, the lr schedule, ds_config reading and "auto" filling, model/dataset resolution and
reading text/jsonl. What needs torch, transformers or DeepSpeed is in tests/e2e/test_train.py."""
import json
import os
from pathlib import Path

import pytest

import dsfleet_ckpt as K
import dsfleet_config as C
import dsfleet_data as D

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "train" / "presets" / "tiny"
CORPUS = REPO / "train" / "data" / "corpus.txt"


def err(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except C.UsageError as e:
        return str(e)
    return None


def resolved(fn, spec):
    message = err(fn, spec)
    return list(fn(spec)) if message is None else "error: " + message


@pytest.mark.parametrize("docs, block, expected", [
    ([[1, 2], [3]], 2, [[1, 2], [0, 3]]),                 # stream 1 2 0 3 0: the trailing eos is dropped
    ([[1, 2, 3]], 2, [[1, 2], [3, 0]]),
    ([[1, 2, 3, 4, 5]], 3, [[1, 2, 3], [4, 5, 0]]),
    ([[1]], 4, []),                                       # too short for one block
    ([], 2, []),
])
def test_pack_joins_documents_with_eos_and_keeps_full_blocks(docs, block, expected):
    assert D.pack(docs, 0, block) == expected


def test_shard_gives_disjoint_equal_slices_by_rank():
    assert [D.shard(list(range(11)), r, 3) for r in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert D.shard(list(range(5)), 0, 1) == [0, 1, 2, 3, 4]


def test_epoch_order_is_a_seeded_permutation():
    a, b, c, d = (D.epoch_order(50, 1234, 0), D.epoch_order(50, 1234, 0), D.epoch_order(50, 1234, 1),
                  D.epoch_order(50, 7, 0))
    assert sorted(a) == list(range(50))
    assert a == b and a != c and a != d


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = C.lr_lambda(2, 10)
    factors = [f(s) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors == sorted(factors[:2]) + sorted(factors[2:], reverse=True)
    assert factors[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("config, expected", [
    ({"train_micro_batch_size_per_gpu": 4},
     {"micro_batch": 4, "grad_accum": 1, "zero_stage": 0, "precision": "fp32",
      "has_optimizer": False, "has_scheduler": False, "weight_decay": 0.0}),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8, "bf16": {"enabled": True},
      "zero_optimization": {"stage": 3}, "train_batch_size": "auto"},
     {"micro_batch": 2, "grad_accum": 8, "zero_stage": 3, "precision": "bf16",
      "has_optimizer": False, "has_scheduler": False, "weight_decay": 0.0}),
    ({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}, "zero_optimization": {"stage": 1},
      "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}},
      "scheduler": {"type": "WarmupLR", "params": {}}},
     {"micro_batch": 1, "grad_accum": 1, "zero_stage": 1, "precision": "fp16",
      "has_optimizer": True, "has_scheduler": True, "weight_decay": 0.1}),
])
def test_read_ds_config_settings(tmp_path, config, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    assert C.read_ds_config(path)[1] == expected


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ("{}", "train_micro_batch_size_per_gpu is missing"),
    ('{"train_micro_batch_size_per_gpu": 0}', "must be a positive integer"),
    ('{"train_micro_batch_size_per_gpu": "auto"}', 'is "auto"'),
    ('{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1.5}', "gradient_accumulation_steps"),
    ('{"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": true}, "fp16": {"enabled": true}}', "both enabled"),
    ('{"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": "yes"}}', "bf16.enabled must be true or false"),
    ('{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 4}}', "stage must be 0, 1, 2 or 3"),
    ('{"train_micro_batch_size_per_gpu": 1, "zero_optimization": []}', "zero_optimization must be an object"),
    ('{"train_micro_batch_size_per_gpu": 1, "optimizer": {"params": {}}}', "optimizer.type is missing"),
    ('{"train_micro_batch_size_per_gpu": 1, "gradient_clipping": "auto"}',
     '"auto" is not supported for gradient_clipping'),
    ('{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}',
     "offload_optimizer needs"),
])
def test_read_ds_config_rejects_bad_configs(tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_text(text)
    error = err(C.read_ds_config, path)
    assert error and message in error, error


def test_read_ds_config_missing_file(tmp_path):
    assert "does not exist" in err(C.read_ds_config, tmp_path / "nope.json")


def test_the_planned_ds_config_reads_back(tmp_path):
    """What the plan renders is what the training module accepts (and it names the optimizer)."""
    from dsfleet_core import plan as P
    record = {"name": "c", "address": "10.1.0.2", "reachable": True, "local": False, "home": "/h", "venv": "/h/venv",
              "gpu": {"accelerator": "cpu", "gpus": [], "cpu": {"cores": 4, "memory_mib": 8000, "bf16": True}},
              "interfaces": [{"name": "eth0", "ipv4": ["10.1.0.2/24"]}]}
    for offload in ("none", "cpu"):
        path = tmp_path / ("ds-%s.json" % offload)
        path.write_text(json.dumps(P.make_plan([record], {"run_id": "r", "offload": offload})["ds_config"]))
        _, settings = C.read_ds_config(path)
        assert settings["has_optimizer"] and settings["weight_decay"] == P.OPTIMIZER["weight_decay"]
        assert settings["precision"] == "bf16" and settings["zero_stage"] == 2


def test_fill_auto_fills_batch_and_lr_and_checks_the_product():
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "train_batch_size": "auto",
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "eps": 1e-8}},
           "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                               "warmup_max_lr": "auto", "warmup_min_lr": "auto"}}}
    filled = C.fill_auto(cfg, world_size=2, lr=1e-3, warmup_steps=5, total_steps=50)
    assert filled["train_batch_size"] == 12 and cfg["train_batch_size"] == "auto"
    assert filled["optimizer"]["params"] == {"lr": 1e-3, "eps": 1e-8}
    assert filled["scheduler"]["params"] == {"warmup_num_steps": 5, "total_num_steps": 50,
                                             "warmup_max_lr": 1e-3, "warmup_min_lr": 0.0}
    error = err(C.fill_auto, dict(cfg, train_batch_size=7), world_size=2, lr=1e-3, warmup_steps=5, total_steps=50)
    assert "train_batch_size 7 != micro batch x grad accum x world size = 12" in error


def test_resolve_model(tmp_path):
    (tmp_path / "withconfig").mkdir()
    (tmp_path / "withconfig" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_text("x")
    specs = ["tiny", str(tmp_path / "withconfig"), str(tmp_path / "empty"), str(tmp_path / "file.bin"),
             "meta-llama/Llama-3.2-1B", "nope", "./missing", "/abs/missing", "a/b/c"]
    result = {spec: resolved(D.resolve_model, spec) for spec in specs}
    assert result["tiny"] == ["preset", str(PRESET)]
    assert result[str(tmp_path / "withconfig")] == ["local", str(tmp_path / "withconfig")]
    assert "has no config.json" in result[str(tmp_path / "empty")]
    assert "is a file, not a model directory" in result[str(tmp_path / "file.bin")]
    assert result["meta-llama/Llama-3.2-1B"] == ["hub", "meta-llama/Llama-3.2-1B"]
    assert result["nope"].startswith("error: unknown model preset 'nope'") and "(tiny)" in result["nope"]
    for spec in ("./missing", "/abs/missing", "a/b/c"):
        assert "does not exist" in result[spec], spec


def test_resolve_dataset(tmp_path, monkeypatch):
    for name in ("a.txt", "b.jsonl", "c.csv", "d.bin"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    monkeypatch.chdir(tmp_path)
    specs = ["bundled", "a.txt", "b.jsonl", "c.csv", "d.bin", "saved", "plain", "missing.txt", "./nothing", "wikitext"]
    result = {spec: resolved(D.resolve_dataset, spec) for spec in specs}
    assert result["bundled"] == ["text", str(CORPUS)]
    assert result["a.txt"] == ["text", str(tmp_path / "a.txt")]
    assert result["b.jsonl"] == ["jsonl", str(tmp_path / "b.jsonl")]
    assert result["c.csv"] == ["file", str(tmp_path / "c.csv")]
    assert "unsupported extension .bin" in result["d.bin"]
    assert result["saved"] == ["disk", str(tmp_path / "saved")]
    assert result["plain"] == ["dir", str(tmp_path / "plain")]
    assert "does not exist" in result["missing.txt"] and "does not exist" in result["./nothing"]
    assert result["wikitext"] == ["hub", "wikitext"]


def test_read_texts_txt_paragraphs_lines_and_jsonl(tmp_path):
    (tmp_path / "para.txt").write_text("one a\none b\n\n\ntwo\n\n  \nthree\n")
    (tmp_path / "lines.txt").write_text("alpha\nbeta\ngamma\n")
    (tmp_path / "rows.jsonl").write_text('{"body": "first"}\n\n{"body": "second", "n": 2}\n{"body": "  "}\n')
    assert D.read_texts("text", str(tmp_path / "para.txt")) == ["one a\none b", "two", "three"]
    assert D.read_texts("text", str(tmp_path / "lines.txt")) == ["alpha", "beta", "gamma"]
    assert D.read_texts("jsonl", str(tmp_path / "rows.jsonl"), "body") == ["first", "second"]


@pytest.mark.parametrize("name, content, field, message", [
    ("empty.txt", "\n  \n", "text", "holds no text"),
    ("bad.txt", b"\xff\xfe\x00bad", "text", "cannot read dataset"),
    ("rows.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "text", "line 2 has no field 'text'"),
    ("rows.jsonl", '{"text": "ok"}\nnot json\n', "text", "line 2 is not JSON"),
    ("rows.jsonl", '{"text": 5}\n', "text", "is not a string"),
    ("rows.jsonl", "", "text", "holds no text"),
])
def test_read_texts_errors(tmp_path, name, content, field, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    kind = "jsonl" if name.endswith(".jsonl") else "text"
    error = err(D.read_texts, kind, str(path), field)
    assert error and message in error, error


def test_bundled_corpus_reads_as_many_documents():
    texts = D.read_texts("text", str(CORPUS))
    assert len(texts) > 50 and all(t.strip() for t in texts)
    assert os.path.getsize(CORPUS) > 20000


def test_checkpoint_bookkeeping_counts_only_complete_tags_and_keeps_the_newest(tmp_path):
    ckpt = tmp_path / "checkpoint"
    for step in (10, 20, 30, 40):
        (ckpt / K.tag_for(step)).mkdir(parents=True)
    for step in (10, 20, 30):
        K.mark_complete(ckpt, K.tag_for(step))
    (ckpt / "latest").write_text("global_step40")
    assert K.complete_steps(ckpt) == [10, 20, 30]          # 40 was still being written
    assert K.prune(ckpt, 2) == ["global_step10"]
    assert sorted(p.name for p in ckpt.iterdir()) == ["global_step20", "global_step30", "global_step40", "latest"]
    assert K.prune(ckpt, 0) == [] and K.prune(ckpt, 5) == []
    assert K.complete_steps(tmp_path / "nothing") == []


def test_markers_record_the_layout_and_decide_what_a_rank_can_load(tmp_path):
    ckpt = tmp_path / "checkpoint"
    for step, world, ranks in ((10, 4, [0, 1]), (20, 2, [0]), (30, 4, [2, 3])):
        (ckpt / K.tag_for(step)).mkdir(parents=True)
        K.mark_complete(ckpt, K.tag_for(step), {"world_size": world, "ranks": ranks, "zero_stage": 2})
    (ckpt / K.universal_tag_for(20)).mkdir()
    K.mark_complete(ckpt, K.universal_tag_for(20), {"universal": True})
    layouts = K.complete_layouts(ckpt)
    assert list(layouts) == [10, 20, 30] and layouts[20]["world_size"] == 2
    assert K.usable_steps(layouts, 1, 4, 2) == [10]            # 30 holds ranks 2, 3; 20 another world
    assert K.usable_steps(layouts, 0, 2, 2) == [20] and K.usable_steps(layouts, 0, 2, 3) == []
    assert K.universal_steps(ckpt) == [20]
    assert K.newest_at_most([10, 20, 30], 25) == 20 and K.newest_at_most([10], 5) == -1
    assert K.rank_of_file("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert K.rank_of_file("zero_pp_rank_3_mp_rank_00_model_states.pt") == 3
    assert K.rank_of_file("mp_rank_00_model_states.pt") is None
    # FSDP's shards are per rank too; DDP's state and the client state are the host's
    assert K.rank_of_file("fsdp_rank_7.pt") == 7 and K.rank_of_file("ddp_state.pt") is None
    assert K.rank_of_file("client_state.pt") is None
    # a tag written by another strategy (or FSDP sharding) is not loaded; a marker without one is DeepSpeed's
    assert K.usable_steps(layouts, 1, 4, 2, "fsdp-full") == []
    fsdp = {40: {"world_size": 4, "ranks": [0, 1], "zero_stage": 0, "strategy": "fsdp-hybrid"}}
    assert K.usable_steps(fsdp, 1, 4, 0, "fsdp-hybrid") == [40] and K.usable_steps(fsdp, 1, 4, 0, "fsdp-full") == []
    assert K.usable_steps(fsdp, 1, 4, 0, "deepspeed") == []
    # the universal conversion of a pruned step goes with it
    assert K.prune(ckpt, 1) == ["global_step10", "global_step20", "global_step20_universal"]


# --- the run's plot (dsfleet_plot.py): what it draws, from metrics.jsonl ---------------------------------------

def test_plot_series_take_each_steps_newest_record_and_skip_what_is_not_a_step():
    import dsfleet_plot as P
    lines = [json.dumps(x) for x in (
        {"event": "start", "world_size": 2},
        {"event": "step", "step": 1, "loss": 5.0, "lr": 1e-4, "tokens_per_s": 100.0, "grad_norm": 2.0},
        {"event": "step", "step": 2, "loss": 4.0, "lr": 2e-4, "tokens_per_s": 120.0},
        {"event": "eval", "step": 2, "eval_loss": 4.5, "perplexity": 90.0},
        {"event": "start", "world_size": 2, "start_step": 1},          # resumed from step 1: step 2 again
        {"event": "step", "step": 2, "loss": 3.9, "lr": 2e-4, "tokens_per_s": 130.0},
        {"event": "step", "step": 3, "loss": "nan?", "lr": 3e-4},       # not a number: not drawn
        {"event": "end", "steps": 3},
    )] + ['{"event": "step", "step": 4, "lo']                            # the line being written as it is read
    s = P.series(lines)
    assert s["loss"] == [(1, 5.0), (2, 3.9)]
    assert s["lr"] == [(1, 1e-4), (2, 2e-4), (3, 3e-4)]
    assert s["tokens_per_s"] == [(1, 100.0), (2, 130.0)]
    assert s["grad_norm"] == [(1, 2.0)] and s["eval_loss"] == [(2, 4.5)]


def test_plot_cli_names_a_missing_metrics_file(tmp_path, capsys):
    import dsfleet_plot as P
    assert P.main([str(tmp_path / "none.jsonl"), str(tmp_path / "p.png")]) == 2
    assert "is not a file. Pass a run's metrics.jsonl" in capsys.readouterr().err
    assert P.main([]) == 2 and not (tmp_path / "p.png").exists()
