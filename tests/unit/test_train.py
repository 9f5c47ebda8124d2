"""Tests for train/train.py, the bundled tiny preset and the bundled corpus.

The test runner's python has no torch, so everything here runs train.py's code in a subprocess with the
training interpreter: $DSFLEET_TRAIN_PYTHON (default ~/.dsfleet/venv/bin/python, read per test; with torch, deepspeed,
transformers, datasets). The pieces are loaded from the file with importlib and called directly; the CLI
contract is checked by running the script. test_deepspeed_run (marked slow) launches a real
2-rank CPU DeepSpeed run with the gloo backend.
"""
import json
import os
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train" / "train.py"
PRESET = REPO / "train" / "presets" / "tiny"
CORPUS = REPO / "train" / "data" / "corpus.txt"
DEFAULT_PY = os.path.expanduser("~/.dsfleet/venv/bin/python")


def python():
    """The training interpreter, read when a test runs (a session fixture may set the variable)."""
    return os.environ.get("DSFLEET_TRAIN_PYTHON", DEFAULT_PY)


@pytest.fixture(autouse=True)
def _training_python():
    if not os.access(python(), os.X_OK):
        pytest.skip(f"training python {python()} not found; set DSFLEET_TRAIN_PYTHON")

PRELUDE = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dsfleet_train", {str(TRAIN)!r})
T = importlib.util.module_from_spec(spec)
spec.loader.exec_module(T)

def err(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except T.UsageError as e:
        return str(e)
    return None

def out(value):
    print(json.dumps(value))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", **extra)
    return env


def run_py(code, timeout=120):
    """Run code with the training python (after PRELUDE); return the JSON it printed last with out()."""
    proc = subprocess.run([python(), "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_cli(*argv, timeout=120):
    return subprocess.run([python(), str(TRAIN), *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=_env())


@pytest.fixture
def ds_config(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}))
    return path


# --- tokenize + pack, shard, order ------------------------------------------------------------------

@pytest.mark.parametrize("docs, block, expected", [
    ([[1, 2], [3]], 2, [[1, 2], [0, 3]]),                 # stream 1 2 0 3 0: the trailing eos is dropped
    ([[1, 2, 3]], 2, [[1, 2], [3, 0]]),
    ([[1, 2, 3, 4, 5]], 3, [[1, 2, 3], [4, 5, 0]]),
    ([[1]], 4, []),                                       # too short for one block
    ([], 2, []),
])
def test_pack_joins_documents_with_eos_and_keeps_full_blocks(docs, block, expected):
    assert run_py(f"out(T.pack({docs!r}, 0, {block}))") == expected


def test_shard_gives_disjoint_equal_slices_by_rank():
    result = run_py("out([T.shard(list(range(11)), r, 3) for r in range(3)])")
    assert result == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]   # 11 -> 9 blocks so every rank gets 3


def test_shard_single_rank_keeps_everything():
    assert run_py("out(T.shard(list(range(5)), 0, 1))") == [0, 1, 2, 3, 4]


def test_epoch_order_is_a_seeded_permutation():
    a, b, c, d = run_py("out([T.epoch_order(50, 1234, 0), T.epoch_order(50, 1234, 0), "
                        "T.epoch_order(50, 1234, 1), T.epoch_order(50, 7, 0)])")
    assert sorted(a) == list(range(50))
    assert a == b and a != c and a != d


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    factors = run_py("f = T.lr_lambda(2, 10); out([f(s) for s in range(10)])")
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors == sorted(factors[:2]) + sorted(factors[2:], reverse=True)
    assert factors[-1] == pytest.approx(0.1)


def test_tokenize_and_pack_the_bundled_corpus_with_the_tiny_tokenizer():
    result = run_py(f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(PRESET)!r})
        texts = T.read_texts("text", {str(CORPUS)!r})
        ids = T.tokenize(texts, tok)
        blocks = T.pack(ids, tok.eos_token_id, 128)
        out({{"docs": len(texts), "tokens": sum(map(len, ids)), "blocks": len(blocks),
              "sizes": sorted({{len(b) for b in blocks}}), "eos": sum(b.count(tok.eos_token_id) for b in blocks),
              "first": tok.decode(ids[0][:5])}})
    """)
    assert result["docs"] > 50
    assert result["blocks"] == (result["tokens"] + result["docs"]) // 128
    assert result["sizes"] == [128]
    assert result["eos"] >= result["docs"] - 2   # one eos per document (the last ones may be cut off)
    assert result["first"] == CORPUS.read_text()[:len(result["first"])]


# --- ds_config reading --------------------------------------------------------------------------------

@pytest.mark.parametrize("config, expected", [
    ({"train_micro_batch_size_per_gpu": 4},
     {"micro_batch": 4, "grad_accum": 1, "zero_stage": 0, "precision": "fp32",
      "has_optimizer": False, "has_scheduler": False}),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 8, "bf16": {"enabled": True},
      "zero_optimization": {"stage": 3}, "train_batch_size": "auto"},
     {"micro_batch": 2, "grad_accum": 8, "zero_stage": 3, "precision": "bf16",
      "has_optimizer": False, "has_scheduler": False}),
    ({"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}, "zero_optimization": {"stage": 1},
      "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "scheduler": {"type": "WarmupLR", "params": {}}},
     {"micro_batch": 1, "grad_accum": 1, "zero_stage": 1, "precision": "fp16",
      "has_optimizer": True, "has_scheduler": True}),
])
def test_read_ds_config_settings(tmp_path, config, expected):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    assert run_py(f"out(T.read_ds_config({str(path)!r})[1])") == expected


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
    ('{"train_micro_batch_size_per_gpu": 1, "gradient_clipping": "auto"}', '"auto" is not supported for gradient_clipping'),
    ('{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}',
     "offload_optimizer needs"),
])
def test_read_ds_config_rejects_bad_configs(tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_text(text)
    error = run_py(f"out(err(T.read_ds_config, {str(path)!r}))")
    assert error and message in error, error


def test_read_ds_config_missing_file(tmp_path):
    error = run_py(f"out(err(T.read_ds_config, {str(tmp_path / 'nope.json')!r}))")
    assert "does not exist" in error


def test_fill_auto_fills_batch_and_lr_and_checks_the_product():
    result = run_py("""
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "train_batch_size": "auto",
               "optimizer": {"type": "AdamW", "params": {"lr": "auto", "eps": 1e-8}},
               "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                                   "warmup_max_lr": "auto", "warmup_min_lr": "auto"}}}
        filled = T.fill_auto(cfg, world_size=2, lr=1e-3, warmup_steps=5, total_steps=50)
        bad = dict(cfg, train_batch_size=7)
        out([filled, cfg["train_batch_size"], err(T.fill_auto, bad, world_size=2, lr=1e-3, warmup_steps=5, total_steps=50)])
    """)
    filled, original, error = result
    assert filled["train_batch_size"] == 12 and original == "auto"
    assert filled["optimizer"]["params"] == {"lr": 1e-3, "eps": 1e-8}
    assert filled["scheduler"]["params"] == {"warmup_num_steps": 5, "total_num_steps": 50,
                                             "warmup_max_lr": 1e-3, "warmup_min_lr": 0.0}
    assert "train_batch_size 7 != micro batch x grad accum x world size = 12" in error


# --- model and dataset resolution -------------------------------------------------------------------

def test_resolve_model(tmp_path):
    (tmp_path / "withconfig").mkdir()
    (tmp_path / "withconfig" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_text("x")
    result = run_py(f"""
        out({{spec: (list(T.resolve_model(spec)) if err(T.resolve_model, spec) is None else "error: " + err(T.resolve_model, spec))
             for spec in ["tiny", {str(tmp_path / 'withconfig')!r}, {str(tmp_path / 'empty')!r}, {str(tmp_path / 'file.bin')!r},
                          "meta-llama/Llama-3.2-1B", "nope", "./missing", "/abs/missing", "a/b/c"]}})
    """)
    assert result["tiny"] == ["preset", str(PRESET)]
    assert result[str(tmp_path / "withconfig")] == ["local", str(tmp_path / "withconfig")]
    assert "has no config.json" in result[str(tmp_path / "empty")]
    assert "is a file, not a model directory" in result[str(tmp_path / "file.bin")]
    assert result["meta-llama/Llama-3.2-1B"] == ["hub", "meta-llama/Llama-3.2-1B"]
    assert result["nope"].startswith("error: unknown model preset 'nope'") and "(tiny)" in result["nope"]
    for spec in ("./missing", "/abs/missing", "a/b/c"):
        assert "does not exist" in result[spec], spec


def test_resolve_dataset(tmp_path):
    for name in ("a.txt", "b.jsonl", "c.csv", "d.bin"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    (tmp_path / "plain").mkdir()
    specs = ["bundled", "a.txt", "b.jsonl", "c.csv", "d.bin", "saved", "plain", "missing.txt", "./nothing", "wikitext"]
    result = run_py(f"""
        import os
        os.chdir({str(tmp_path)!r})
        out({{spec: (list(T.resolve_dataset(spec)) if err(T.resolve_dataset, spec) is None else "error: " + err(T.resolve_dataset, spec))
             for spec in {specs!r}}})
    """)
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
    (tmp_path / "lines.txt").write_text("alpha\nbeta\n\ngamma\n".replace("\n\n", "\n"))
    (tmp_path / "rows.jsonl").write_text('{"body": "first"}\n\n{"body": "second", "n": 2}\n{"body": "  "}\n')
    result = run_py(f"""
        out([T.read_texts("text", {str(tmp_path / 'para.txt')!r}),
             T.read_texts("text", {str(tmp_path / 'lines.txt')!r}),
             T.read_texts("jsonl", {str(tmp_path / 'rows.jsonl')!r}, "body")])
    """)
    assert result == [["one a\none b", "two", "three"], ["alpha", "beta", "gamma"], ["first", "second"]]


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
    error = run_py(f"out(err(T.read_texts, {kind!r}, {str(path)!r}, {field!r}))")
    assert error and message in error, error


def test_read_texts_from_a_saved_datasets_directory_and_a_csv(tmp_path):
    result = run_py(f"""
        import datasets
        datasets.Dataset.from_dict({{"body": ["first doc", "", "second doc"], "n": [1, 2, 3]}}).save_to_disk({str(tmp_path / 'saved')!r})
        datasets.DatasetDict({{"validation": datasets.Dataset.from_dict({{"body": ["x"]}})}}).save_to_disk({str(tmp_path / 'nosplit')!r})
        open({str(tmp_path / 'rows.csv')!r}, "w").write("body,n\\nfrom csv,1\\n")
        kind, where = T.resolve_dataset({str(tmp_path / 'saved')!r})
        out([kind, T.read_texts(kind, where, "body"), err(T.read_texts, kind, where, "text"),
             err(T.read_texts, "disk", {str(tmp_path / 'nosplit')!r}, "body"),
             T.read_texts(*T.resolve_dataset({str(tmp_path / 'rows.csv')!r}), "body")])
    """)
    kind, texts, missing_column, no_split, csv_texts = result
    assert kind == "disk" and texts == ["first doc", "second doc"]
    assert "has no column 'text' (columns: body, n)" in missing_column
    assert "has no train split (splits: validation)" in no_split
    assert csv_texts == ["from csv"]


# --- the tiny preset and the corpus -------------------------------------------------------------------

def test_tiny_preset_config_and_tokenizer():
    result = run_py(f"""
        from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast
        cfg = AutoConfig.from_pretrained({str(PRESET)!r}, local_files_only=True)
        tok = AutoTokenizer.from_pretrained({str(PRESET)!r}, local_files_only=True)
        fast = PreTrainedTokenizerFast.from_pretrained({str(PRESET)!r})
        text = "The café's bread rose slowly: 42 loaves!"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out({{"type": cfg.model_type, "vocab": cfg.vocab_size, "len": len(tok), "fast_len": len(fast),
              "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
              "ffn": cfg.intermediate_size, "pos": cfg.max_position_embeddings,
              "special": [tok.bos_token, tok.eos_token, tok.pad_token],
              "ids": [cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id],
              "tok_ids": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
              "roundtrip": tok.decode(ids) == text, "max_id": max(ids)}})
    """)
    assert result["type"] == "llama"
    assert result["vocab"] == result["len"] == result["fast_len"] and 512 <= result["vocab"] <= 2048
    assert (result["hidden"], result["layers"], result["heads"], result["ffn"], result["pos"]) == (128, 2, 4, 256, 256)
    assert None not in result["special"] and result["ids"] == result["tok_ids"]
    assert result["roundtrip"] and result["max_id"] < result["vocab"]
    assert sorted(p.name for p in PRESET.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]


def test_build_tiny_regenerates_the_bundled_preset_exactly(tmp_path):
    proc = subprocess.run([python(), str(REPO / "train" / "presets" / "build_tiny.py"), "--out", str(tmp_path / "tiny")],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    def load(path):
        data = json.loads(path.read_text())
        data.pop("transformers_version", None)  # the only field that depends on the installed version
        return data

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert load(tmp_path / "tiny" / name) == load(PRESET / name), name


def test_bundled_corpus_is_sized_varied_and_licensed():
    text = CORPUS.read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert 40_000 <= len(text.encode()) <= 80_000
    assert len(paragraphs) >= 50 and len(set(paragraphs)) == len(paragraphs)
    assert "CC0" in (CORPUS.parent / "LICENSE").read_text()


# --- the command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--max_steps", "0"], "--max_steps must be a positive number"),
    (["--max_steps", "-3"], "--max_steps must be a positive number"),
    (["--max_steps", "ten"], "argument --max_steps: invalid int value"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--block_size", "1"], "--block_size must be at least 2"),
    (["--lr", "0"], "--lr must be a positive finite number"),
    (["--lr", "nan"], "--lr must be a positive finite number"),
    (["--save_every", "-1"], "--save_every must be >= 0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--model", "nope"], "unknown model preset 'nope'"),
    (["--model", "./no/such/dir"], "model path ./no/such/dir does not exist"),
    (["--dataset", "missing.txt", "--preflight"], "dataset path missing.txt does not exist"),
    (["--block_size", "512", "--preflight"], "exceeds the model's max_position_embeddings 256"),
])
def test_cli_rejects_bad_input_with_one_line_and_exit_2(ds_config, tmp_path, argv, message):
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", *argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("dsfleet-train: error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_rejects_a_bad_ds_config_and_a_missing_one(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 7}}')
    for config, message in ((bad, "stage must be 0, 1, 2 or 3"), (tmp_path / "none.json", "does not exist")):
        proc = run_cli("--deepspeed_config", config, "--output_dir", tmp_path / "out", "--preflight")
        assert proc.returncode == 2 and proc.stderr.startswith("dsfleet-train: error: ") and message in proc.stderr


def test_cli_requires_the_contract_arguments(tmp_path):
    proc = run_cli("--output_dir", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("dsfleet-train: error: the following arguments are required: --deepspeed_config. "
                                   "Run 'python train/train.py --help' for the options")


def test_preflight_bundled(ds_config, tmp_path):
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--preflight", "--local_rank", "0")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["model"] == str(PRESET) and result["dataset"] == str(CORPUS)
    assert result["vocab_size"] == 1024 and result["blocks"] > 50
    assert not (tmp_path / "out").exists()


def test_preflight_local_model_dir_and_jsonl(ds_config, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": p}) + "\n" for p in CORPUS.read_text().split("\n\n")[:20]))
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--preflight",
                   "--model", PRESET, "--dataset", rows, "--text_field", "body", "--block_size", "64")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"] == str(PRESET) and result["dataset"] == str(rows) and result["blocks"] > 10


def test_preflight_dataset_too_small_for_one_block(ds_config, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Just a few words.\n")
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--preflight", "--dataset", small)
    assert proc.returncode == 2 and "yields no block of 128 tokens" in proc.stderr, proc.stderr


# --- a real DeepSpeed run -----------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ds_config, out, *argv, timeout=300):
    cmd = [python(), "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
           str(TRAIN), "--deepspeed_config", str(ds_config), "--output_dir", str(out), *map(str, argv)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc


def _events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_deepspeed_run_trains_checkpoints_exports_and_resumes(tmp_path):
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                     "zero_optimization": {"stage": 2}, "steps_per_print": 1000}))
    out = tmp_path / "run"
    proc = _launch(ds_config, out, "--max_steps", 20, "--log_every", 5, "--save_every", 10)

    events = _events(out)
    start, steps, end = events[0], events[1:-1], events[-1]
    assert start["event"] == "start" and end["event"] == "end"
    assert {k: start[k] for k in ("world_size", "model", "block_size", "micro_batch", "grad_accum", "precision", "zero_stage")} == {
        "world_size": 2, "model": "tiny", "block_size": 128, "micro_batch": 4, "grad_accum": 1, "precision": "fp32", "zero_stage": 2}
    assert start["params"] > 100_000 and start["start_step"] == 0
    assert [e["step"] for e in steps] == [1, 5, 10, 15, 20]
    for e in steps:
        assert e["event"] == "step" and set(e) == {"event", "step", "loss", "lr", "tokens_per_s", "elapsed_s", "time"}
        assert e["tokens_per_s"] > 0 and e["lr"] > 0
    assert end["steps"] == 20 and end["first_loss"] == steps[0]["loss"] and end["final_loss"] == steps[-1]["loss"]
    assert end["final_loss"] < end["first_loss"]
    assert end["checkpoint_dir"] == str(out / "checkpoint") and end["export_dir"] == str(out / "export")
    assert proc.stdout.count("step 5/20 |") == 1                       # only rank 0 prints

    assert (out / "checkpoint" / "latest").read_text().strip() == "global_step20"
    assert (out / "checkpoint" / "global_step10").is_dir()              # --save_every
    assert (out / "export" / "model.safetensors").is_file()
    loaded = run_py(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out / 'export')!r}, local_files_only=True)
        tok = AutoTokenizer.from_pretrained({str(out / 'export')!r}, local_files_only=True)
        x = tok("The weather is", return_tensors="pt")
        with torch.no_grad():
            logits = model(**x).logits
        out({{"params": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
              "finite": bool(torch.isfinite(logits).all()), "shape": list(logits.shape)}})
    """)
    assert loaded["params"] == start["params"] and loaded["finite"] and loaded["shape"][-1] == loaded["vocab"]

    _launch(ds_config, out, "--max_steps", 24, "--log_every", 5, "--resume")
    events = _events(out)
    start2 = [e for e in events if e["event"] == "start"][-1]
    assert start2["start_step"] == 20 and events[-1]["event"] == "end" and events[-1]["steps"] == 24
    assert [e["step"] for e in events[events.index(start2) + 1:-1]] == [21, 24]
    assert (out / "checkpoint" / "latest").read_text().strip() == "global_step24"
