"""Tests for train/train.py with the training interpreter: tokenizer, datasets, the tiny preset, the CLI and real DeepSpeed runs
(the torch-free pieces are tested directly in tests/unit/test_train_pure.py).

The test runner's python has no torch, so everything here runs train.py's code in a subprocess with the
training interpreter: $DSFLEET_TRAIN_PYTHON (default ~/.dsfleet/venv/bin/python, read per test; with torch, deepspeed,
transformers, datasets). The pieces are loaded from the file with importlib and called directly; the CLI
contract is checked by running the script. test_deepspeed_run launches a real
2-rank CPU DeepSpeed run with the gloo backend.
"""
import json
import math
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

# --- model and dataset resolution -------------------------------------------------------------------

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
    assert result["vocab_size"] == 1024 and result["sample_documents"] > 50
    assert not (tmp_path / "out").exists()


def test_preflight_local_model_dir_and_jsonl(ds_config, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"body": p}) + "\n" for p in CORPUS.read_text().split("\n\n")[:20]))
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--preflight",
                   "--model", PRESET, "--dataset", rows, "--text_field", "body", "--block_size", "64")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["model"] == str(PRESET) and result["dataset"] == str(rows) and result["sample_documents"] == 20


def test_preflight_finds_a_missing_tokenizer_and_a_bad_first_row_without_loading_anything(ds_config, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((PRESET / "config.json").read_text())
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--preflight", "--model", model)
    assert proc.returncode == 2 and "has no tokenizer" in proc.stderr, proc.stderr
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"text": "y"}) + "\n")
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--preflight", "--dataset", rows)
    assert proc.returncode == 2 and "line 1 has no field 'text'" in proc.stderr, proc.stderr


def test_a_dataset_too_small_for_one_block_fails_before_training(ds_config, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("Just a few words.\n")
    # found by the rank itself (the preflight does not tokenize), before it joins the process group
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--dataset", small)
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
        assert e["event"] == "step" and set(e) == {"event", "step", "loss", "lr", "tokens_per_s", "elapsed_s",
                                                   "grad_norm", "time"}
        assert e["tokens_per_s"] > 0 and e["lr"] > 0 and e["grad_norm"] > 0   # ZeRO-2 computes the norm
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


def _instruction_rows(path, n=240):
    words = ["red", "blue", "green", "gold", "grey", "pink"]
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 17, (i * 7) % 13
            f.write(json.dumps({"prompt": f"Question {i}: what is {a} plus {b}, and which colour comes next after "
                                          f"{words[i % 6]}?", "response": f" {a + b}, then {words[(i + 1) % 6]}."})
                    + "\n")


def _check_records(out, steps, evals):
    """The run's TensorBoard events, read back with tensorboard's own event reader, hold every logged step's loss,
    lr, tokens/s and grad norm and every eval; plot.png is a real drawing (the size matplotlib gives it, many
    colours), not an empty file."""
    got = run_py(f"""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        from PIL import Image
        ea = EventAccumulator({str(out / 'tensorboard')!r})
        ea.Reload()
        scalars = {{tag: [[e.step, e.value] for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}}
        img = Image.open({str(out / 'plot.png')!r})
        out({{"scalars": scalars, "size": list(img.size), "format": img.format,
              "colours": len(img.convert("RGB").getcolors(1 << 20) or [])}})
    """)
    sc = got["scalars"]
    assert set(sc) == {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "eval/loss", "eval/perplexity"}
    assert [s for s, _ in sc["train/loss"]] == steps and [s for s, _ in sc["eval/loss"]] == evals
    metrics = _events(out)
    assert [v for _, v in sc["train/loss"]] == pytest.approx([e["loss"] for e in metrics if e["event"] == "step"])
    assert [v for _, v in sc["eval/loss"]] == pytest.approx([e["eval_loss"] for e in metrics if e["event"] == "eval"])
    assert all(v > 0 for _, v in sc["train/grad_norm"] + sc["train/tokens_per_s"] + sc["train/lr"])
    assert got["format"] == "PNG" and got["size"] == [800, 900] and got["colours"] > 50


def test_instruction_data_evals_and_a_second_run_reuses_the_token_cache(tmp_path):
    """prompt/response rows (loss on the response only: tests/unit/test_tokens.py checks the labels), a held-out
    tenth evaluated every 5 steps and at the end, the corpus tokenized once into the host's token cache and mapped
    by both ranks; a second run finds it."""
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                     "zero_optimization": {"stage": 2}, "steps_per_print": 1000}))
    rows, cache = tmp_path / "sft.jsonl", tmp_path / "cache"
    _instruction_rows(rows)
    common = ("--dataset", rows, "--block_size", 64, "--token_cache", cache, "--eval_fraction", 0.1, "--log_every", 5,
              "--save_every_minutes", 0)
    proc = _launch(ds_config, tmp_path / "one", "--max_steps", 10, "--eval_every", 5, *common)
    events = _events(tmp_path / "one")
    start, end = events[0], events[-1]
    assert start["data_format"] == "instruction" and start["token_cache"]["format"] == "instruction"
    assert start["token_cache"]["blocks"] == 240 and start["eval_blocks"] == 24
    assert proc.stdout.count("token cache: built ") + proc.stdout.count("token cache: reusing ") == 1  # rank 0's
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [5, 10]
    for e in evals:
        assert math.isfinite(e["eval_loss"]) and abs(e["perplexity"] - math.exp(e["eval_loss"])) < 1e-6 * e["perplexity"]
        assert 0 < e["eval_tokens"] < 24 * 64   # response tokens only: the prompts are masked
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] and (end["eval_loss"], end["perplexity"]) == (
        evals[1]["eval_loss"], evals[1]["perplexity"])
    assert "eval at step 10 | loss " in proc.stdout
    _check_records(tmp_path / "one", steps=[1, 5, 10], evals=[5, 10])
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "labels.bin").is_file()    # one build for both ranks

    # what the next run's ranks do first (the cluster test shows it in a real second run's log): the same
    # tokenizer, data, block size and format find this cache and tokenize nothing
    again = run_py(f"""
        import argparse
        kind, where = T.resolve_model("tiny")
        _, tok = T.load_config_and_tokenizer(kind, where)
        args = T.validate_args(T.parse_args(["--deepspeed_config", "x", "--output_dir", "x", "--dataset", {str(rows)!r},
                                             "--block_size", "64", "--token_cache", {str(cache)!r},
                                             "--eval_fraction", "0.1"]))
        train, held, facts = T.load_data(args, tok, kind, where, tok.vocab_size)
        out({{"facts": facts, "train": train.n, "eval": held.n}})
    """)
    assert again["facts"]["reused"] is True and again["facts"]["path"] == str(folders[0])
    assert (again["train"], again["eval"]) == (216, 24)


def test_chat_rows_need_a_chat_template_and_say_so(ds_config, tmp_path):
    rows = tmp_path / "chat.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--dataset", rows,
                   "--token_cache", tmp_path / "cache")
    assert proc.returncode == 2 and "the tokenizer has no chat template" in proc.stderr, proc.stderr
    assert "--data_format instruction" in proc.stderr
    proc = run_cli("--deepspeed_config", ds_config, "--output_dir", tmp_path / "out", "--dataset", rows, "--preflight")
    assert proc.returncode == 0 and json.loads(proc.stdout.splitlines()[-1])["format"] == "chat", proc.stderr


def test_zero3_builds_only_each_ranks_partition_and_recomputes_activations(tmp_path):
    """Under ZeRO-3 the module builds the model inside deepspeed.zero.Init (transformers' HfDeepSpeedConfig): no
    rank ever holds the whole model; --activation_checkpointing turns on the model's gradient checkpointing."""
    ds_config = tmp_path / "ds_config.json"
    ds_config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                     "zero_optimization": {"stage": 3}, "steps_per_print": 1000}))
    out = tmp_path / "run"
    _launch(ds_config, out, "--max_steps", 6, "--log_every", 1, "--activation_checkpointing")
    events = _events(out)
    start, end = events[0], events[-1]
    assert (start["zero_stage"], start["world_size"], start["activation_checkpointing"]) == (3, 2, True)
    tensors = run_py("""
        kind, where = T.resolve_model("tiny")
        config, _ = T.load_config_and_tokenizer(kind, where)
        model, keep = T.build_model(kind, where, config, 1234, "bf16")
        out({"tensors": len(list(model.parameters())), "params": T.parameter_count(model), "keep": keep is None,
             "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
             "attn": model.config._attn_implementation})
    """)
    # a 16-bit run builds in 16 bits (no fp32 copy), with SDPA attention; outside ZeRO-3 nothing to keep alive
    assert tensors["dtypes"] == ["torch.bfloat16"] and tensors["attn"] == "sdpa" and tensors["keep"]
    assert start["params"] == tensors["params"]
    # rank 0 held half of every tensor (ZeRO-3 pads each to a multiple of the world size) from the start
    assert start["params"] / 2 <= start["params_here"] <= start["params"] / 2 + tensors["tensors"]
    assert end["steps"] == 6 and math.isfinite(end["final_loss"]) and end["peak_rss_mib"] > 0
    loaded = run_py(f"""
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out / 'export')!r}, local_files_only=True)
        out({{"params": sum(p.numel() for p in model.parameters())}})
    """)
    assert loaded["params"] == start["params"]


def test_offload_steps_the_same_optimizer_as_without(tmp_path):
    """The plan's ds_config with and without offload=cpu: the same AdamW settings reach the optimizer that steps
    (torch's AdamW, DeepSpeed's CPU Adam), norms and biases undecayed in both, and the same losses step by step."""
    import sys
    sys.path.insert(0, str(REPO / "lib"))
    from dsfleet_core import plan as P
    record = {"name": "c", "address": "localhost", "reachable": True, "local": True, "home": "/h", "venv": "/h/v",
              "gpu": {"accelerator": "cpu", "gpus": [], "cpu": {"cores": 2, "memory_mib": 8000, "bf16": False}},
              "interfaces": [{"name": "lo", "ipv4": ["127.0.0.1/8"]}]}
    configs = {}
    for offload in ("none", "cpu"):
        cfg = P.make_plan([record], {"run_id": "r", "offload": offload, "cpu_ranks": 1, "lr": 1e-2,
                                     "precision": "fp32", "micro_batch": 2})["ds_config"]
        configs[offload] = tmp_path / ("ds-%s.json" % offload)
        configs[offload].write_text(json.dumps(cfg))
    result = run_py(f"""
        import os
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="{_free_port()}")
        import deepspeed, torch
        deepspeed.init_distributed()
        kind, where = T.resolve_model("tiny")
        config, tok = T.load_config_and_tokenizer(kind, where)
        runs = {{}}
        for name, path in (("none", {str(configs["none"])!r}), ("cpu", {str(configs["cpu"])!r})):
            cfg, s = T.read_ds_config(path)
            model, _ = T.build_model(kind, where, config, 1234)
            groups = T.param_groups(model, s["weight_decay"])
            engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
            inner = getattr(opt, "optimizer", opt)
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, config.vocab_size, (2, 32), generator=g)
            losses = []
            for _ in range(4):
                loss = engine(input_ids=x, labels=x).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            runs[name] = {{"class": type(inner).__name__, "losses": losses,
                          "groups": [{{k: (list(v) if isinstance(v, tuple) else v) for k, v in grp.items()
                                      if k in ("lr", "betas", "eps", "weight_decay")}} for grp in inner.param_groups],
                          "sizes": [sum(p.numel() for p in grp["params"]) for grp in inner.param_groups]}}
        out(runs)
    """, timeout=600)
    none, cpu = result["none"], result["cpu"]
    assert none["class"] == "AdamW" and cpu["class"] == "DeepSpeedCPUAdam", (none["class"], cpu["class"])
    assert none["groups"] == cpu["groups"]
    assert [grp["weight_decay"] for grp in none["groups"]] == [0.1, 0.0]
    assert none["groups"][0]["betas"] == [0.9, 0.95] and none["groups"][0]["lr"] == pytest.approx(1e-2)
    assert none["sizes"] == cpu["sizes"] and none["sizes"][1] > 0
    assert none["losses"][-1] < none["losses"][0]
    assert cpu["losses"] == pytest.approx(none["losses"], rel=1e-4, abs=1e-5)


def _torchrun(ds_config, out, *argv, nodes=1, per_node=2, timeout=300):
    """train.py under torchrun: ``nodes`` agents on this machine (node ranks 0..n-1), as the plan starts them; with
    several, each node writes to its own out/node<N> (hosts have their own disks: each keeps its ranks' shards)."""
    port = _free_port()
    procs = [subprocess.Popen([str(Path(python()).with_name("torchrun")), "--nnodes", str(nodes), "--node_rank", str(n),
                               "--nproc_per_node", str(per_node), "--master_addr", "127.0.0.1", "--master_port",
                               str(port), "--max_restarts", "0", str(TRAIN), "--deepspeed_config", str(ds_config),
                               "--output_dir", str(out / f"node{n}" if nodes > 1 else out), "--no_tensorboard", "--plot_every_s", "0", *map(str, argv)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=_env())
             for n in range(nodes)]
    texts = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * nodes, "\n".join(t[-4000:] for t in texts)
    return texts[0]


def _losses(out):
    return {e["step"]: e["loss"] for e in _events(out) if e["event"] == "step"}


def test_fsdp_and_ddp_train_like_deepspeed_resume_exactly_and_export(tmp_path):
    """The same model, data and seed under the three strategies: the first loss (before any update) is the same;
    FSDP's hybrid sharding over two torchrun nodes, stopped after its step-4 checkpoint and resumed from it,
    continues with the losses of the uninterrupted run; each export loads in the training precision."""
    fp32 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                      "weight_decay": 0.1}}}
    cfg, bf16 = tmp_path / "fp32.json", tmp_path / "bf16.json"
    cfg.write_text(json.dumps(fp32))
    bf16.write_text(json.dumps(dict(fp32, bf16={"enabled": True})))
    common = ("--max_steps", 8, "--block_size", 64, "--save_every", 4, "--keep_checkpoints", 0)
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(cfg, ddp, "--strategy", "ddp", *common)
    _torchrun(cfg, fsdp, "--strategy", "fsdp", *common)
    ds_cfg = tmp_path / "ds.json"
    ds_cfg.write_text(json.dumps(dict(fp32, zero_optimization={"stage": 2})))
    ds = tmp_path / "ds"
    _launch(ds_cfg, ds, "--max_steps", 2, "--block_size", 64)
    first = [_losses(o)[1] for o in (ddp, fsdp, ds)]
    assert max(first) - min(first) < 1e-4 * first[0], first
    for o, name in ((ddp, "ddp"), (fsdp, "fsdp")):
        start, end = _events(o)[0], _events(o)[-1]
        assert start["strategy"] == name and end["event"] == "end" and end["final_loss"] < end["first_loss"]
    # fp32 DDP and FSDP reduce the same gradients: the same run, step for step
    assert all(abs(_losses(ddp)[s] - _losses(fsdp)[s]) < 1e-4 * _losses(ddp)[s] for s in range(1, 9))
    assert _events(fsdp)[0]["fsdp"] == {"sharding": "full", "layer_classes": ["LlamaDecoderLayer"], "mesh": [2]}
    assert sorted(p.name for p in (fsdp / "checkpoint" / "global_step4").iterdir()) == [
        ".dsfleet-complete", "client_state.pt", "fsdp_rank_0.pt", "fsdp_rank_1.pt"]
    assert sorted(p.name for p in (ddp / "checkpoint" / "global_step4").iterdir()) == [
        ".dsfleet-complete", "client_state.pt", "ddp_state.pt"]

    # export_hf.py (what playbooks/export.yml runs on the gathered files) rebuilds the end-of-run export exactly
    for o in (ddp, fsdp):
        proc = subprocess.run([python(), str(REPO / "train" / "export_hf.py"), "--checkpoint", str(o / "checkpoint"),
                               "--tag", "global_step8", "--model", "tiny", "--output", str(o / "again")],
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        same = run_py(f"""
            from safetensors.torch import load_file
            a, b = load_file({str(o / 'export' / 'model.safetensors')!r}), load_file({str(o / 'again' / 'model.safetensors')!r})
            out({{"keys": sorted(a) == sorted(b), "equal": all(bool((a[k] == b[k]).all()) for k in a)}})
        """)
        assert same == {"keys": True, "equal": True}, o
    # hybrid: 2 nodes x 2 ranks, sharded within a node; then lose the newest checkpoint and resume from step 4
    args = ("--strategy", "fsdp", "--fsdp_sharding", "hybrid", *common)
    _torchrun(bf16, tmp_path / "hybrid", *args, nodes=2)
    hybrid, other = tmp_path / "hybrid" / "node0", tmp_path / "hybrid" / "node1"
    reference = _losses(hybrid)
    start = _events(hybrid)[0]
    assert start["fsdp"]["mesh"] == [2, 2] and start["params_here"] * 2 == start["params"]
    marker = json.loads((hybrid / "checkpoint" / "global_step4" / ".dsfleet-complete").read_text())
    assert marker["strategy"] == "fsdp-hybrid" and marker["world_size"] == 4 and marker["ranks"] == [0, 1]
    assert sorted(p.name for p in (other / "checkpoint" / "global_step4").glob("fsdp_rank_*")) == [
        "fsdp_rank_2.pt", "fsdp_rank_3.pt"]
    for node in (hybrid, other):
        subprocess.run(["rm", "-rf", str(node / "checkpoint" / "global_step8"), str(node / "export")], check=True)
    text = _torchrun(bf16, tmp_path / "hybrid", *args, "--resume", nodes=2)
    assert "resumed from" in text and "global_step4 at step 4" in text
    resumed = {e["step"]: e["loss"] for e in _events(hybrid)[len(reference) + 2:] if e["event"] == "step"}
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(abs(resumed[s] - reference[s]) <= 1e-6 * abs(reference[s]) for s in resumed), (resumed, reference)
    # a DDP tag is not an FSDP one: --resume under another strategy starts over, saying so
    text = _torchrun(cfg, ddp, "--strategy", "fsdp", "--max_steps", 9, "--block_size", 64, "--resume")
    assert "no checkpoint in" in text and "(fsdp-full); starting from step 0" in text
    loaded = run_py(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(hybrid / 'export')!r}, local_files_only=True, dtype="auto")
        out({{"dtype": str(m.dtype), "params": sum(p.numel() for p in m.parameters()),
              "finite": all(bool(torch.isfinite(p).all()) for p in m.parameters())}})
    """)
    assert loaded == {"dtype": "torch.bfloat16", "params": start["params"], "finite": True}


def test_torch_strategies_refuse_what_only_deepspeed_does(tmp_path):
    cfg = tmp_path / "zero.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))
    proc = subprocess.run([python(), str(TRAIN), "--deepspeed_config", str(cfg), "--output_dir", str(tmp_path / "o"),
                           "--strategy", "fsdp", "--max_steps", "1"], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "--strategy fsdp with zero_optimization (stage 2)" in proc.stderr and "\"stage\": 0" in proc.stderr
