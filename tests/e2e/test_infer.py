"""playbooks/infer.yml on this machine, with real DeepSpeed inference on CPU ranks: from a run id (exported on the
way), greedy text identical with tp=1, tp=2 and plain transformers; sampling reproducible from its seed; chat
templates; bad input fails before anything starts, naming the fix."""
import json
import shutil
import subprocess
import uuid

import pytest

from helpers import RUNS, free_port, run_playbook

PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Hello world", "A B C", "She said",
           "It was a dark", "The king", "My name is", "We went to", "After the war", "The river", "Long ago",
           "Tomorrow we", "The old man", "In a small town", "Science is", "The cat", "He opened the door",
           "Under the sea"]

# greedy decoding with transformers alone, one prompt at a time: what DeepSpeed's engine must reproduce
REFERENCE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, n = sys.argv[1], int(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
out = []
for prompt in json.loads(sys.argv[3]):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        seq = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    new = seq[0, enc["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[:new.index(tok.eos_token_id) + 1]
    out.append(tok.decode(new, skip_special_tokens=True))
print(json.dumps(out))
"""


def infer(knobs):
    knobs = dict(knobs)
    knobs.setdefault("master_port", free_port())
    knobs.setdefault("run_id", "infer-" + uuid.uuid4().hex[:8])
    return knobs["run_id"], run_playbook("playbooks/infer.yml", knobs)


def generations(run_id):
    return [json.loads(line) for line in (RUNS / run_id / "generations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(train_python):
    """A real two-rank ZeRO-2 run of the tiny preset, long enough that prompts get different continuations."""
    run_id = "infsrc-" + uuid.uuid4().hex[:6]
    result = run_playbook("launch.yml", {"run_id": run_id, "max_steps": 40, "precision": "fp32"})
    assert result.rc == 0, result.stdout[-4000:]
    return run_id


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def test_greedy_text_is_the_same_with_tp1_tp2_and_plain_transformers(trained, prompts_file, train_python):
    # the run has no export on the controller yet: infer.yml makes it first
    one, first = infer({"model": trained, "prompts": str(prompts_file), "tp": 1, "max_new_tokens": 24,
                        "precision": "fp32"})
    assert first.rc == 0, first.stdout[-5000:]
    assert "run %s: exporting step 40 on localhost" % trained in first.stdout
    assert "model run %s step 40 (llama, 590,464 parameters); 20 prompt(s), greedy" % trained in first.stdout
    assert "fp32 tp=1 x 2 replica(s) = 2 rank(s)" in first.stdout
    rows = generations(one)
    assert [r["index"] for r in rows] == list(range(20)) and [r["prompt"] for r in rows] == PROMPTS
    assert {r["replica"] for r in rows} == {0, 1}  # both replicas answered, merged back in input order
    assert all(0 < r["tokens"] <= 24 and r["prompt_tokens"] > 0 and r["seconds"] > 0 for r in rows)
    summary = json.loads((RUNS / one / "summary.json").read_text())
    assert summary["answered"] == 20 and summary["missing"] == [] and summary["tokens"] == sum(r["tokens"] for r in rows)
    assert summary["tokens_per_s"] > 0
    config = json.loads((RUNS / one / "hosts" / "localhost" / "ds_inference_config.json").read_text())
    assert config == {"dtype": "fp32", "replace_with_kernel_inject": False, "tensor_parallel": {"tp_size": 1}}

    # the export is there now; tensor parallel over both CPU ranks (AutoTP), one prompt per generate call
    two, second = infer({"model": trained, "prompts": str(prompts_file), "tp": 2, "max_new_tokens": 24,
                         "precision": "fp32", "infer_batch": 1})
    assert second.rc == 0, second.stdout[-5000:]
    assert "exporting step" not in second.stdout
    assert "fp32 tp=2 x 1 replica(s) = 2 rank(s)" in second.stdout
    # AutoTP sharded the model: each rank holds a part of the attention and MLP weights (the embedding stays whole)
    shard = json.loads((RUNS / two / "summary.json").read_text())["hosts"][0]["params_per_rank"]
    assert summary["hosts"][0]["params_per_rank"] == 590464 and 131072 < shard < 590464 * 0.75, shard
    texts = [r["output"] for r in rows]
    assert [r["output"] for r in generations(two)] == texts
    assert len(set(texts)) >= 4, texts  # the prompts lead somewhere different: equality above means something

    ref = subprocess.run([train_python, "-c", REFERENCE, str(RUNS / trained / "export-global_step40"), "24",
                          json.dumps(PROMPTS)], capture_output=True, text=True, check=True)
    assert json.loads(ref.stdout.splitlines()[-1]) == texts


def test_sampling_follows_its_seed_and_a_chat_template_wraps_prompts(trained, tmp_path):
    export = RUNS / trained / "export-global_step40"
    if not export.is_dir():  # run alone: export it the way infer.yml would
        assert run_playbook("playbooks/export.yml", {"run_id": trained}).rc == 0
    chat = tmp_path / "chat-model"
    shutil.copytree(export, chat)
    tok = json.loads((chat / "tokenizer_config.json").read_text())
    tok["chat_template"] = ("{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant:{% endif %}")
    (chat / "tokenizer_config.json").write_text(json.dumps(tok))
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"prompt": "Once upon a time"}) + "\n"
                       + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Tell a story"}]}) + "\n")
    sample = {"model": str(chat), "prompts": str(prompts), "temperature": 1.2, "top_p": 0.95, "max_new_tokens": 16}
    a, first = infer(dict(sample, seed=7))
    assert first.rc == 0, first.stdout[-5000:]
    assert "temperature 1.2 top_p 0.95 seed 7" in first.stdout and ", chat template" in first.stdout
    rows = generations(a)
    # "Once upon a time" alone is 7 tokens with <|bos|>; as a templated user turn it is longer
    assert rows[0]["prompt_tokens"] > 7 and rows[1]["prompt"][1]["content"] == "Tell a story"
    b, again = infer(dict(sample, seed=7))
    assert again.rc == 0 and [r["output"] for r in generations(b)] == [r["output"] for r in rows]
    c, other = infer(dict(sample, seed=8, max_new_tokens=16))
    assert other.rc == 0
    assert [r["output"] for r in generations(c)] != [r["output"] for r in rows]
    plain, off = infer({"model": str(chat), "prompt": "Once upon a time", "chat": "off", "max_new_tokens": 4})
    assert off.rc == 0 and generations(plain)[0]["prompt_tokens"] == 7


def test_bad_input_fails_before_anything_starts(trained, tmp_path):
    def fails(knobs, text):
        run_id, result = infer(knobs)
        assert result.rc != 0
        assert any(text in f for f in result.failures), (text, result.failures, result.stdout[-3000:])
        assert not (RUNS / run_id / "generations.jsonl").exists()
        return result

    not_jsonl = tmp_path / "p.txt"
    not_jsonl.write_text("Once upon a time\n")
    fails({"model": trained, "prompts": str(not_jsonl)}, "line 1 is not JSON")
    no_field = tmp_path / "q.jsonl"
    no_field.write_text(json.dumps({"question": "why?"}) + "\n")
    fails({"model": trained, "prompts": str(no_field)}, "its fields: question. Name the field with -e prompt_field=NAME")
    fails({"model": trained, "prompts": str(tmp_path / "missing.jsonl")}, "cannot read prompts=")
    fails({"model": trained}, "there is nothing to answer")
    # the bundled preset is a config and a tokenizer: no weights
    fails({"model": str(RUNS.parent / "train" / "presets" / "tiny"), "prompt": "x"},
          "has a config.json but no weights")
    fails({"model": "someone/not-downloaded", "prompt": "x"}, "neither a directory nor a hub id in the local")
    fails({"model": trained, "prompt": "x", "tp": 4}, "tp=4 but host localhost has 2 CPU ranks")
    fails({"model": trained, "prompt": "x", "tp": 3, "cpu_ranks": 4}, "tp=3 does not divide the model's 4 attention heads")
    # a run with no checkpoint: nothing to export
    empty = "infempty-" + uuid.uuid4().hex[:6]
    assert run_playbook("launch.yml", {"run_id": empty, "dry_run": True}).rc == 0
    fails({"model": empty, "prompt": "x"}, "run %s has no checkpoint with every rank's files on the hosts" % empty)
