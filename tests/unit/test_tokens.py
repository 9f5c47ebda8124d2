"""The token cache (train/dsfleet_tokens.py), torch- and numpy-free: streamed packing equal to the in-memory path,
reuse by key, instruction and chat labels, one builder per host, no half cache after a failed build. A small
character tokenizer stands in for transformers' (the real one runs in tests/e2e/test_train.py)."""
import array
import json
import multiprocessing
from pathlib import Path

import pytest

import dsfleet_config as C
import dsfleet_data as D
import dsfleet_tokens as TK

CORPUS = Path(__file__).resolve().parents[2] / "train" / "data" / "corpus.txt"
FIELDS = {"text": "text", "prompt": "prompt", "response": "response", "messages": "messages"}


class CharTokenizer:
    """ids: 1 bos, 2 eos, 3 + byte; a chat template '<role>:content;' and '<assistant>:' as the generation prompt."""
    eos_token_id, pad_token_id, bos_token_id = 2, None, 1
    chat_template = "role:content;"

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def _ids(self, text):
        return [3 + b for b in text.encode("utf-8")]

    def __call__(self, text, add_special_tokens=True, verbose=False):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("tokenizer died")
        one = lambda t: ([self.bos_token_id] if add_special_tokens else []) + self._ids(t)  # noqa: E731
        return {"input_ids": [one(t) for t in text] if isinstance(text, list) else one(text)}

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        text = "".join("<%s>:%s;" % (m["role"], m["content"]) for m in messages)
        return self._ids(text + ("<assistant>:" if add_generation_prompt else ""))


def read_blocks(folder, name, code, block):
    values = array.array(code)
    raw = (Path(folder) / name).read_bytes()
    values.frombytes(raw)
    return [list(values[i:i + block]) for i in range(0, len(values), block)]


def build(tmp_path, data, fmt="auto", block=16, tokenizer=None, kind=None, fields=FIELDS):
    kind = kind or ("text" if str(data).endswith(".txt") else "jsonl")
    return TK.build_or_open(tmp_path / "cache", tokenizer or CharTokenizer(), "local", str(tmp_path), kind, str(data),
                            fmt, fields, block, 300, log=lambda *_: None)


def test_streamed_packing_equals_the_in_memory_path_and_is_reused(tmp_path):
    tok = CharTokenizer()
    expected = D.pack(D.tokenize(D.read_texts("text", str(CORPUS)), tok), tok.eos_token_id, 16)
    folder, meta = build(tmp_path, CORPUS, tokenizer=tok)
    assert meta["format"] == "text" and meta["reused"] is False and meta["blocks"] == len(expected) > 100
    assert meta["dtype"] == "uint16" and not (folder / "labels.bin").exists()
    assert read_blocks(folder, "tokens.bin", "H", 16) == expected
    again = CharTokenizer()
    folder2, meta2 = build(tmp_path, CORPUS, tokenizer=again)
    assert (folder2, meta2["reused"], again.calls) == (folder, True, 0)  # nothing tokenized the second time
    # a copy elsewhere is the same data; another block size, or changed content, is another cache
    copy = tmp_path / "copy" / "corpus.txt"
    copy.parent.mkdir()
    copy.write_bytes(CORPUS.read_bytes())
    assert build(tmp_path, copy)[0] == folder
    assert build(tmp_path, CORPUS, block=32)[0] != folder
    copy.write_text(CORPUS.read_text() + "\n\nOne more paragraph.\n")
    assert build(tmp_path, copy)[0] != folder
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")) == sorted(
        {folder.name, build(tmp_path, CORPUS, block=32)[0].name, build(tmp_path, copy)[0].name})


def test_a_text_file_without_blank_lines_is_one_document_per_line(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("alpha beta\n\ngamma\n")
    assert list(TK.iter_text_file(lines)) == ["alpha beta", "gamma"]
    lines.write_text("alpha beta\ngamma\n")
    assert list(TK.iter_text_file(lines)) == D.read_texts("text", str(lines)) == ["alpha beta", "gamma"]
    lines.write_text("a\nb\n\n\nc\n  \nd\ne\n")
    assert list(TK.iter_text_file(lines)) == D.read_texts("text", str(lines)) == ["a\nb", "c", "d\ne"]


def test_instruction_rows_train_on_the_response_only_one_example_per_block(tmp_path):
    rows = tmp_path / "sft.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "Q?", "response": "A."},
        {"prompt": "P" * 20, "response": "never seen"},       # the prompt fills the block: skipped
        {"prompt": "Hi", "response": "x" * 30},               # cut at the block's end
    ]) + "\n")
    folder, meta = build(tmp_path, rows)
    assert (meta["format"], meta["blocks"], meta["skipped"], meta["cut"]) == ("instruction", 2, 1, 1)
    tokens = read_blocks(folder, "tokens.bin", "H", 16)
    labels = read_blocks(folder, "labels.bin", "i", 16)
    lengths = list(array.array("I", (folder / "lengths.bin").read_bytes()))
    q, a = [1] + [3 + b for b in b"Q?"], [3 + b for b in b"A."] + [2]
    assert lengths == [len(q) + len(a), 16]
    assert tokens[0] == q + a + [2] * (16 - len(q) - len(a))          # padded with eos (no pad token)
    assert labels[0] == [-100] * len(q) + a + [-100] * (16 - len(q) - len(a))
    assert labels[1][:3] == [-100] * 3 and labels[1][3:] == [3 + ord("x")] * 13


def test_chat_rows_train_on_the_assistant_turns_only(tmp_path):
    rows = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "ok"}, {"role": "assistant", "content": "k"}]
    rows.write_text(json.dumps({"messages": conversation}) + "\n")
    folder, meta = build(tmp_path, rows, block=64)
    assert (meta["format"], meta["blocks"]) == ("chat", 1)
    tok = CharTokenizer()
    ids, labels = TK.chat_example(tok, conversation)
    assert read_blocks(folder, "tokens.bin", "H", 64)[0][:len(ids)] == ids
    trained = bytes(t - 3 for t, lab in zip(ids, labels) if lab != -100).decode()
    assert trained == "yo;k;"   # each assistant turn's content and its end; never the user's turns or headers
    assert ids == tok.apply_chat_template(conversation)


@pytest.mark.parametrize("row,fmt,message", [
    ({"prompt": "a"}, "instruction", "line 1: field 'response' is missing or not a string"),
    ({"messages": [{"role": "user", "content": "x"}]}, "chat", "line 1 has no assistant message"),
    ({"messages": "hello"}, "chat", "field 'messages' is not a list of {role, content} messages"),
    ({"body": "x"}, "text", "line 1 has no field 'text'"),
])
def test_bad_rows_name_the_fix_and_leave_no_cache(tmp_path, row, fmt, message):
    rows = tmp_path / "bad.jsonl"
    rows.write_text(json.dumps(row) + "\n")
    with pytest.raises(C.UsageError, match=message.replace("{", r"\{").replace("}", r"\}")):
        build(tmp_path, rows, fmt=fmt)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def test_a_build_that_dies_leaves_no_half_cache_and_the_next_run_builds_it(tmp_path):
    with pytest.raises(RuntimeError, match="tokenizer died"):
        build(tmp_path, CORPUS, tokenizer=CharTokenizer(fail_after=0))
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    assert build(tmp_path, CORPUS)[1]["reused"] is False


def _build_in_child(tmp, queue):
    queue.put(build(Path(tmp), CORPUS)[1]["reused"])


def test_ranks_of_one_host_build_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(queue.get(timeout=5) for _ in procs) == [False, True, True]


def test_the_eval_split_holds_out_the_last_blocks():
    assert TK.eval_split(100, 0.05) == (95, 5)
    assert TK.eval_split(10, 0.01) == (9, 1)   # at least one
    assert TK.eval_split(10, 0) == (10, 0)


def test_auto_detects_the_format_from_the_first_row(tmp_path):
    rows = tmp_path / "rows.jsonl"
    for row, fmt in (({"text": "x"}, "text"), ({"prompt": "a", "response": "b"}, "instruction"),
                     ({"messages": []}, "chat")):
        rows.write_text(json.dumps(row) + "\n")
        assert TK.detect_format("jsonl", str(rows), FIELDS) == fmt
    assert TK.detect_format("jsonl", str(rows), dict(FIELDS, messages="turns")) == "text"


def test_only_the_most_recently_used_caches_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(TK, "KEEP", 2)
    made = []
    for i in range(3):
        text = tmp_path / ("c%d.txt" % i)
        text.write_text(CORPUS.read_text()[: 2000 + i])
        made.append(build(tmp_path, text)[0])
        if i == 1:
            build(tmp_path, tmp_path / "c0.txt")   # c0 used again: c1 is now the least recently used
    assert sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir()) == sorted([made[0], made[2]])
