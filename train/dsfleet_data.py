"""Models and data as paths and token lists: resolve a model or dataset spec, read documents, pack, shard, order.

Torch-free (stdlib; ``datasets`` is imported only for datasets-backed inputs): the unit tests import it directly.
train/train.py re-exports everything here.
"""
import random
import re
from pathlib import Path

from dsfleet_config import fail

HERE = Path(__file__).resolve().parent
PRESETS_DIR = HERE / "presets"             # one directory per preset: config.json + tokenizer files
BUNDLED_CORPUS = HERE / "data" / "corpus.txt"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FILE_BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}  # via datasets.load_dataset


def list_presets():
    return sorted(d.name for d in PRESETS_DIR.iterdir() if (d / "config.json").is_file()) if PRESETS_DIR.is_dir() else []


def _looks_like_path(spec):
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1 or spec.endswith("/")


def resolve_model(spec):
    """Return ("preset" | "local" | "hub", path or hub id)."""
    presets = list_presets()
    if spec in presets:
        return "preset", str(PRESETS_DIR / spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            fail(f"model directory {path} has no config.json", "Point --model at a directory written by save_pretrained")
        return "local", str(path.resolve())
    if path.exists():
        fail(f"--model {spec} is a file, not a model directory", "Point --model at the directory that holds config.json")
    if _looks_like_path(spec):
        fail(f"model path {spec} does not exist", "Check the path on this host, or use a preset (%s) or a hub id org/name" % ", ".join(presets))
    if HUB_ID.fullmatch(spec):
        return "hub", spec
    fail(f"unknown model preset {spec!r}", "Use a preset (%s), an existing model directory, or a hub id org/name" % ", ".join(presets))



def resolve_dataset(spec):
    """Return (kind, where) with kind in text, jsonl, file, disk, dir, hub."""
    if spec == "bundled":
        return "text", str(BUNDLED_CORPUS)
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".txt":
            return "text", str(path.resolve())
        if suffix == ".jsonl":
            return "jsonl", str(path.resolve())
        if suffix in FILE_BUILDERS:
            return "file", str(path.resolve())
        fail(f"dataset file {spec} has an unsupported extension {suffix or '(none)'}",
             "Use a .txt, .jsonl, .json, .csv or .parquet file, or a directory saved by datasets")
    if path.is_dir():
        saved = any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))
        return ("disk" if saved else "dir"), str(path.resolve())
    if _looks_like_path(spec) or suffix in (".txt", ".jsonl", *FILE_BUILDERS):
        fail(f"dataset path {spec} does not exist", "Check the path on this host, or use --dataset bundled")
    return "hub", spec


def _paragraphs(text):
    """Documents of a text file: blank-line separated paragraphs, or lines if there are no blank lines."""
    parts = re.split(r"\n\s*\n", text)
    if len(parts) == 1:
        parts = text.splitlines()
    return [p.strip() for p in parts if p.strip()]


def read_texts(kind, where, text_field="text", head_bytes=None):
    """Documents (non-empty strings) of a resolved dataset (``head_bytes``: of the first that many bytes of a
    .txt/.jsonl file only, cut at a line end: the preflight's sample)."""
    if kind in ("text", "jsonl"):
        try:
            if head_bytes:
                with open(where, "rb") as f:
                    data = f.read(head_bytes + 1)
                if len(data) > head_bytes:
                    data = data[:data.rfind(b"\n", 0, head_bytes) + 1] or data[:head_bytes]
                raw = data.decode("utf-8")
            else:
                raw = Path(where).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read dataset {where}: {e}", "Check the file's permissions; it must be UTF-8 text")
    if kind == "text":
        texts = _paragraphs(raw)
    elif kind == "jsonl":
        texts = []
        from dsfleet_tokens import jsonl_rows
        for n, row in jsonl_rows(raw.splitlines(), where):
            if text_field not in row:
                fail(f"dataset {where} line {n} has no field {text_field!r}", "Pass --text_field NAME naming the text field")
            if not isinstance(row[text_field], str):
                fail(f"dataset {where} line {n}: field {text_field!r} is not a string", "Store the text as a JSON string")
            texts.append(row[text_field])
    else:
        ds = load_table(kind, where)
        if text_field not in ds.column_names:
            fail(f"dataset {where} has no column {text_field!r} (columns: {', '.join(ds.column_names)})",
                 "Pass --text_field NAME naming the text column")
        texts = [t for t in ds[text_field] if isinstance(t, str)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        fail(f"dataset {where} holds no text", "Point --dataset at a non-empty dataset")
    return texts


def load_table(kind, where):
    """The train split of a datasets-backed dataset (a saved directory, a .json/.csv/.parquet file, a hub name)."""
    import datasets
    try:
        if kind == "disk":
            ds = datasets.load_from_disk(where)
        elif kind == "file":
            ds = datasets.load_dataset(FILE_BUILDERS[Path(where).suffix.lower()], data_files=where)
        else:
            ds = datasets.load_dataset(where)
    except (OSError, ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        fail(f"cannot load dataset {where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
             "Check the path or name; hub names need network access")
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            fail(f"dataset {where} has no train split (splits: {', '.join(ds)})", "Save or select a 'train' split")
        ds = ds["train"]
    return ds


def tokenize(texts, tokenizer, batch_size=1000):
    """Token ids of each document, without special tokens."""
    ids = []
    for i in range(0, len(texts), batch_size):
        ids.extend(tokenizer(texts[i:i + batch_size], add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def pack(token_lists, eos_id, block_size):
    """Concatenate documents, each followed by eos, and cut into full blocks (the remainder is dropped)."""
    stream = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    return [stream[i:i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def shard(blocks, rank, world_size):
    """This rank's blocks: blocks[rank::world_size] after trimming so that every rank gets the same count."""
    usable = len(blocks) // world_size * world_size
    return blocks[:usable][rank::world_size]


def epoch_order(n, seed, epoch):
    """A permutation of range(n), the same on every run for a given (seed, epoch)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order



def check_block_size(config, block_size):
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        fail(f"--block_size {block_size} exceeds the model's max_position_embeddings {limit}", f"Pass --block_size {limit} or less")


