"""The corpus as a token file built once per host: streamed tokenization into fixed-size blocks on disk, keyed by
what they were built from, memory-mapped by every rank and reused by later runs and by resume.

Torch-free and numpy-free (stdlib ``array`` writes the files; train.py maps them with numpy): the unit tests import
it directly. No rank ever holds the corpus as Python lists: documents are read one at a time (a .txt file line by
line, a .jsonl file row by row, a datasets table in batches) and tokenized a batch at a time, and each full block
goes to disk as it fills, so a corpus larger than the host's memory works.

Formats (``--data_format``; ``auto`` looks at the first row):
- ``text``: documents (blank-line separated paragraphs of a .txt, else its lines; the text field of .jsonl/datasets)
  joined with eos between them and cut into blocks (packed: every token trains).
- ``instruction``: rows with a prompt and a response field: tokens prompt (with the tokenizer's special tokens) +
  response + eos, labels only on the response and eos (the prompt's are -100), one example per block, padded
  (attention mask 0, label -100) so one example never attends to another; an example longer than a block is cut at
  the block's end, one whose prompt fills the block is skipped and counted.
- ``chat``: rows with a list of {role, content} messages rendered with the tokenizer's chat template; labels only on
  the assistant turns (each turn's tokens are what the template adds for it after the prompt of the turns before).

Files in ``<cache>/<key>/``: ``tokens.bin`` (uint16 when the vocabulary fits, else uint32; blocks x block_size),
for instruction and chat also ``labels.bin`` (int32) and ``lengths.bin`` (uint32, the real tokens per block), and
``meta.json``. The key hashes the format version, the tokenizer's files, the data's identity (path, size and
modification time of a large file: a changed file is a new key; small files by content), block_size,
the format and its field names. One process per host builds it (an flock on ``<key>.lock``); the others wait and
map it. Built under a temporary name and renamed when complete: a killed build leaves no half cache.
"""
import array
import fcntl
import hashlib
import json
import os
import re
import time
from pathlib import Path

from dsfleet_config import fail

VERSION = 1
FORMATS = ("auto", "text", "instruction", "chat")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
BATCH = 512            # documents tokenized per call
IGNORE = -100          # labels the loss skips (transformers' ignore_index)


# -----------------------------------------------------------------------------------------------------------
# reading rows one at a time

def _text_has_blank_line(path):
    with open(path, "rb") as f:
        previous_blank = True
        for line in f:
            blank = not line.strip()
            if blank and not previous_blank:
                return True
            previous_blank = blank and previous_blank
    return False


def iter_text_file(path):
    """Documents of a .txt file as read_texts gives them (paragraphs, or lines when there is no blank line), read
    line by line."""
    paragraphs = _text_has_blank_line(path)
    try:
        with open(path, encoding="utf-8") as f:
            if not paragraphs:
                for line in f:
                    if line.strip():
                        yield line.strip()
                return
            lines = []
            for line in f:
                if line.strip():
                    lines.append(line.rstrip("\n"))
                elif lines:
                    yield "\n".join(lines).strip()
                    lines = []
            if lines:
                yield "\n".join(lines).strip()
    except UnicodeDecodeError as e:
        fail(f"cannot read dataset {path}: {e}", "The file must be UTF-8 text")


def iter_jsonl(path):
    try:
        with open(path, encoding="utf-8") as f:
            yield from jsonl_rows(f, path)
    except UnicodeDecodeError as e:
        fail(f"cannot read dataset {path}: {e}", "The file must be UTF-8 text")


def jsonl_rows(lines, where):
    """(line number, dict) of each non-blank line of a jsonl file."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"dataset {where} line {n} is not JSON ({e})", "Write one JSON object per line")
        if not isinstance(row, dict):
            fail(f"dataset {where} line {n} is not a JSON object", "Write one JSON object per line")
        yield n, row


def iter_rows(kind, where):
    """(row number, dict) of a jsonl file or a datasets table, one at a time."""
    if kind == "jsonl":
        yield from iter_jsonl(where)
        return
    from dsfleet_data import load_table
    ds = load_table(kind, where)
    for start in range(0, len(ds), BATCH):
        chunk = ds[start:start + BATCH]
        names = list(chunk)
        for i in range(len(chunk[names[0]]) if names else 0):
            yield start + i + 1, {name: chunk[name][i] for name in names}


def detect_format(kind, where, fields):
    """The format of a dataset from its first row: chat when it has the messages field, instruction when it has
    the prompt and response fields, else text."""
    if kind == "text":
        return "text"
    for _, row in iter_rows(kind, where):
        if fields["messages"] in row:
            return "chat"
        if fields["prompt"] in row and fields["response"] in row:
            return "instruction"
        return "text"
    return "text"


def check_row(row, n, where, fmt, fields, unit="line"):
    """The fields a row of this format needs, with a message naming the fix (``unit``: line of a jsonl file, row
    of a table)."""
    if fmt == "text":
        if fields["text"] not in row:
            fail(f"dataset {where} {unit} {n} has no field {fields['text']!r}",
                 "Pass --text_field NAME naming the text field (or --data_format instruction/chat)")
        if not isinstance(row[fields["text"]], str):
            fail(f"dataset {where} {unit} {n}: field {fields['text']!r} is not a string", "Store the text as a string")
    elif fmt == "instruction":
        for key in (fields["prompt"], fields["response"]):
            if not isinstance(row.get(key), str):
                fail(f"dataset {where} {unit} {n}: field {key!r} is missing or not a string",
                     "Pass --prompt_field/--response_field naming the fields, or --data_format text")
    else:
        messages = row.get(fields["messages"])
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            fail(f"dataset {where} {unit} {n}: field {fields['messages']!r} is not a list of {{role, content}} messages",
                 "Pass --messages_field naming the list of messages, or --data_format text/instruction")
        if not any(m["role"] == "assistant" for m in messages):
            fail(f"dataset {where} {unit} {n} has no assistant message: nothing to train on",
                 "Every conversation needs at least one message with role 'assistant'")


# -----------------------------------------------------------------------------------------------------------
# tokens and labels of one example

def instruction_example(tokenizer, prompt, response):
    """(ids, labels): the prompt with the tokenizer's special tokens, then the response and eos; labels on the
    response and eos only."""
    p = tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"]
    r = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + [tokenizer.eos_token_id]
    return p + r, [IGNORE] * len(p) + r


def chat_example(tokenizer, messages):
    """(ids, labels) of a conversation rendered by the tokenizer's chat template; labels on the assistant turns:
    the tokens the template adds for turn i after rendering turns 0..i-1 with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        fail("the tokenizer has no chat template, so messages cannot be rendered",
             "Use a model whose tokenizer_config.json has a chat_template, or prompt/response fields "
             "(--data_format instruction)")

    def render(turns, generation_prompt=False):
        ids = tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=generation_prompt)
        if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    ids, labels = [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], generation_prompt=True) if i else []
        upto = render(messages[:i + 1])
        if upto[:len(ids)] != ids or upto[:len(before)] != before or len(before) < len(ids):
            fail("the tokenizer's chat template does not render a conversation as a prefix of its continuation, so "
                 "the assistant turns cannot be told apart", "Use prompt/response fields (--data_format instruction)")
        labels += [IGNORE] * (len(before) - len(ids)) + upto[len(before):]
        ids = upto
    return ids, labels


# -----------------------------------------------------------------------------------------------------------
# the cache

def identity(spec_kind, where):
    """What the data is, for the key: each file's content hash when it is small (HASH_LIMIT), else its name, size
    and modification time (a staged or shipped copy keeps those; a changed file is a new key); a datasets hub id by
    its name. The path is left out, so a copy elsewhere (every run ships the bundled corpus anew) is the same."""
    if spec_kind == "hub":
        return {"hub": where}
    path = Path(where)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for p in files:
        st = p.stat()
        name = p.name if p == path else str(p.relative_to(path))
        if st.st_size <= HASH_LIMIT:
            out.append([name, hashlib.sha256(p.read_bytes()).hexdigest()])
        else:
            out.append([name, st.st_size, st.st_mtime_ns])
    return {"files": out}


HASH_LIMIT = 64 << 20


def tokenizer_identity(model_kind, model_where):
    if model_kind == "hub":
        return {"hub": model_where}
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        p = Path(model_where) / name
        if p.is_file():
            digest.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return {"sha256": digest.hexdigest()}


def cache_key(tok_id, data_id, block_size, fmt, fields):
    blob = json.dumps({"v": VERSION, "tokenizer": tok_id, "data": data_id, "block_size": block_size, "format": fmt,
                       "fields": {k: fields[k] for k in sorted(fields)}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _Writer:
    def __init__(self, folder, block_size, vocab_size, labelled):
        self.block_size, self.labelled = block_size, labelled
        self.code = "H" if vocab_size <= 65535 else "I"
        if array.array(self.code).itemsize != (2 if self.code == "H" else 4):
            self.code = "I" if self.code == "H" else "L"
        self.tokens = open(folder / "tokens.bin", "wb")
        self.labels = open(folder / "labels.bin", "wb") if labelled else None
        self.lengths = open(folder / "lengths.bin", "wb") if labelled else None
        self.blocks = 0

    def block(self, ids, labels=None, length=None):
        array.array(self.code, ids).tofile(self.tokens)
        if self.labelled:
            array.array("i", labels).tofile(self.labels)
            array.array("I", [length]).tofile(self.lengths)
        self.blocks += 1

    def close(self):
        for f in (self.tokens, self.labels, self.lengths):
            if f:
                f.close()


def _build(folder, tokenizer, kind, where, fmt, fields, block_size, vocab_size):
    """Write the blocks of the dataset into ``folder``; returns the counts for meta.json."""
    labelled = fmt != "text"
    writer = _Writer(folder, block_size, vocab_size, labelled)
    documents = skipped = cut = 0
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    try:
        if fmt == "text":
            stream, batch = [], []

            def flush(texts):
                ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
                for doc in ids:
                    stream.extend(doc)
                    stream.append(eos)
                start = 0
                while len(stream) - start >= block_size:
                    writer.block(stream[start:start + block_size])
                    start += block_size
                del stream[:start]

            if kind == "text":
                rows = ((None, {fields["text"]: t}) for t in iter_text_file(where))
            else:
                rows = iter_rows(kind, where)
            for n, row in rows:
                if n is not None:
                    check_row(row, n, where, fmt, fields, "line" if kind == "jsonl" else "row")
                text = row[fields["text"]]
                if not text.strip():
                    continue
                documents += 1
                batch.append(text)
                if len(batch) >= BATCH:
                    flush(batch)
                    batch = []
            flush(batch)
        else:
            for n, row in iter_rows(kind, where):
                check_row(row, n, where, fmt, fields, "line" if kind == "jsonl" else "row")
                documents += 1
                if fmt == "instruction":
                    ids, labels = instruction_example(tokenizer, row[fields["prompt"]], row[fields["response"]])
                else:
                    ids, labels = chat_example(tokenizer, row[fields["messages"]])
                long = len(ids) > block_size
                ids, labels = ids[:block_size], labels[:block_size]
                if all(v == IGNORE for v in labels[1:]):  # nothing left to learn once shifted: the prompt fills it
                    skipped += 1
                    continue
                cut += long
                length = len(ids)
                writer.block(ids + [pad] * (block_size - length), labels + [IGNORE] * (block_size - length), length)
    finally:
        writer.close()
    return {"blocks": writer.blocks, "documents": documents, "skipped": skipped, "cut": cut,
            "dtype": "uint16" if writer.code == "H" else "uint32", "labelled": labelled}


def build_or_open(cache_dir, tokenizer, model_kind, model_where, kind, where, fmt, fields, block_size, vocab_size,
                  log=print):
    """The token cache's folder and meta (dict) for this dataset, built now if no earlier run built it."""
    if fmt == "auto":
        fmt = detect_format(kind, where, fields)
    key = cache_key(tokenizer_identity(model_kind, model_where), identity(kind, where), block_size, fmt, fields)
    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / key
    with open(root / (key + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per host; the others wait here, then map what it wrote
        meta_path = folder / "meta.json"
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            os.utime(meta_path)  # last used: what prune() keeps
            log(f"token cache: reusing {folder} ({meta['blocks']} blocks of {block_size}, {meta['format']}, "
                f"built in {meta['seconds']:.1f}s by an earlier run)")
            return folder, dict(meta, reused=True)
        tmp = root / (key + ".tmp-%d" % os.getpid())
        tmp.mkdir()
        start = time.time()
        try:
            counts = _build(tmp, tokenizer, kind, where, fmt, fields, block_size, vocab_size)
            meta = dict(counts, version=VERSION, format=fmt, block_size=block_size, fields=fields, key=key,
                        source=where, seconds=round(time.time() - start, 3), built=time.time())
            (tmp / "meta.json").write_text(json.dumps(meta))
            os.replace(tmp, folder)
        except BaseException:
            for p in tmp.glob("*"):
                p.unlink()
            tmp.rmdir()
            raise
    prune(root, keep=KEEP, log=log)
    log(f"token cache: built {folder} in {meta['seconds']:.1f}s: {meta['blocks']} blocks of {block_size} from "
        f"{meta['documents']} {'documents' if fmt == 'text' else 'examples'} ({fmt}"
        + (f"; {meta['cut']} cut at block_size, {meta['skipped']} skipped: the prompt fills the block" if fmt != "text"
           else "") + ")")
    return folder, dict(meta, reused=False)


KEEP = 8  # token caches kept per host, the most recently used


def prune(root, keep=KEEP, log=print):
    """Remove all but the ``keep`` most recently used caches under ``root`` (one in use by another process holds
    its lock and is kept)."""
    import shutil
    folders = sorted((p for p in Path(root).iterdir() if p.is_dir() and (p / "meta.json").is_file()),
                     key=lambda p: (p / "meta.json").stat().st_mtime, reverse=True)
    for old in folders[keep:]:
        with open(Path(root) / (old.name + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue
            shutil.rmtree(old, ignore_errors=True)
        (Path(root) / (old.name + ".lock")).unlink(missing_ok=True)
        log(f"token cache: removed {old} (least recently used; {keep} are kept)")


def eval_split(n_blocks, fraction):
    """(train blocks, eval blocks) counts: the last ``fraction`` of the blocks are held out (at least one)."""
    if not fraction:
        return n_blocks, 0
    held = max(1, int(round(n_blocks * fraction)))
    return n_blocks - held, held


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)
