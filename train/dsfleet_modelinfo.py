"""What the inference planner needs to know about a model, read from its files without torch (stdlib only).

    python dsfleet_modelinfo.py MODEL [REVISION]
        # prints one JSON line; MODEL: a directory or a hub id (its local cache; else its config.json is fetched
        # from the hub, HF_ENDPOINT / HF_TOKEN honoured, so the plan can size a model no host has yet)

``model_info(model)`` reads config.json, the safetensors headers (exact parameter count and bytes per dtype; a
``pytorch_model*.bin`` is sized by its file size) and the tokenizer config (chat template), and says what is
missing. It runs on the controller (playbooks/infer.yml, for a model directory there) and, by source, on a host
(for a path or hub id only the hosts have), so it must stay stdlib-only and runnable as ``python -c``.
"""
import glob
import json
import os
import struct
import sys

# bytes per element of safetensors dtypes
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def hub_snapshot(model):
    """The local snapshot directory of hub id ``org/name`` in the Hugging Face cache, or None."""
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        return None
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    repo = os.path.join(home, "models--" + model.replace("/", "--"))
    ref = os.path.join(repo, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            snap = os.path.join(repo, "snapshots", f.read().strip())
        if os.path.isdir(snap):
            return snap
    snaps = sorted(glob.glob(os.path.join(repo, "snapshots", "*")), key=os.path.getmtime)
    return snaps[-1] if snaps else None


def hub_config(model, revision="main", timeout=15):
    """(config.json of hub id ``model`` fetched from the hub, None) or (None, why not). stdlib only."""
    import urllib.error
    import urllib.parse
    import urllib.request
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    url = "%s/%s/resolve/%s/config.json" % (endpoint, model, urllib.parse.quote(revision, safe=""))
    token = os.environ.get("HF_TOKEN")
    if not token:
        path = os.environ.get("HF_TOKEN_PATH") or os.path.join(
            os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "token")
        try:
            with open(path) as f:
                token = f.read().strip() or None
        except OSError:
            token = None
    request = urllib.request.Request(url, headers={"Authorization": "Bearer " + token} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8")), None
    except urllib.error.HTTPError as e:
        why = {401: "gated or private: set HF_TOKEN", 403: "gated: accept its licence and set HF_TOKEN",
               404: "not found (check the id and the revision)"}.get(e.code, "HTTP %d" % e.code)
        return None, "%s@%s on %s: %s" % (model, revision, endpoint, why)
    except (OSError, ValueError) as e:
        return None, "%s could not be read from %s (%s)" % (model, endpoint, e)


def _safetensors_header(path):
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("%s is not a safetensors file (too short)" % path)
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2 ** 20:
            raise ValueError("%s is not a safetensors file (header of %d bytes)" % (path, size))
        return json.loads(f.read(size))


def _weights(where):
    """(params, bytes, dtype, files) of the weights in ``where``."""
    files = sorted(glob.glob(os.path.join(where, "*.safetensors")))
    params = size = 0
    dtypes = {}
    if files:
        for path in files:
            for name, meta in _safetensors_header(path).items():
                if name == "__metadata__":
                    continue
                count = 1
                for dim in meta["shape"]:
                    count *= int(dim)
                params += count
                size += count * DTYPE_BYTES.get(meta["dtype"], 4)
                dtypes[meta["dtype"]] = dtypes.get(meta["dtype"], 0) + count
        dtype = max(dtypes, key=dtypes.get) if dtypes else None
        return params, size, dtype, [os.path.basename(p) for p in files]
    files = sorted(glob.glob(os.path.join(where, "pytorch_model*.bin")))
    if files:
        size = sum(os.path.getsize(p) for p in files)
        return None, size, None, [os.path.basename(p) for p in files]
    return None, 0, None, []


def _chat_template(where):
    if os.path.isfile(os.path.join(where, "chat_template.jinja")) or os.path.isfile(
            os.path.join(where, "chat_template.json")):
        return True
    try:
        with open(os.path.join(where, "tokenizer_config.json")) as f:
            return bool(json.load(f).get("chat_template"))
    except (OSError, ValueError):
        return False


def model_info(model, revision=None):
    """{"model", "dir", "found", "error", "config": {...}, "raw_config" (config.json itself), "params", "bytes",
    "dtype", "weights": [files], "tokenizer", "chat_template"}; ``error`` names what is missing and what to do.
    With ``revision``, a hub id in no local cache has its config.json fetched from the hub (raw_config only)."""
    info = {"model": model, "dir": None, "found": False, "error": None, "config": None, "params": None,
            "bytes": 0, "dtype": None, "weights": [], "tokenizer": False, "chat_template": False}
    where = os.path.expanduser(model)
    if not os.path.isdir(where):
        snap = hub_snapshot(model)
        if snap is None and revision and model.count("/") == 1:
            info["raw_config"], why = hub_config(model, revision)
            info["error"] = why or "%s@%s: config.json read from the hub; the weights are downloaded at launch" % (
                model, revision)
            return info
        if snap is None:
            info["error"] = ("%s is neither a directory nor a hub id in the local Hugging Face cache (no internet at "
                             "run time): pass a model directory, or download it there first" % model)
            return info
        where = snap
    info["dir"] = os.path.abspath(where)
    try:
        with open(os.path.join(where, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        info["error"] = "%s has no readable config.json (%s): it is not a Hugging Face model directory" % (where, e)
        return info
    info["raw_config"] = config  # the planner sizes memory from it when only the hosts have the model
    text = config.get("text_config") or {}
    pick = lambda *names: next((c[n] for c in (config, text) for n in names if c.get(n) is not None), None)  # noqa: E731
    heads = pick("num_attention_heads", "n_head", "num_heads")
    info["config"] = {
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures") or [],
        "hidden_size": pick("hidden_size", "n_embd", "d_model"),
        "num_hidden_layers": pick("num_hidden_layers", "n_layer", "num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": pick("num_key_value_heads", "num_kv_heads", "multi_query_group_num") or heads,
        "head_dim": pick("head_dim"),
        "vocab_size": pick("vocab_size"),
        "max_position_embeddings": pick("max_position_embeddings", "n_positions", "max_sequence_length"),
        "torch_dtype": config.get("torch_dtype") or config.get("dtype"),
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
    }
    try:
        params, size, dtype, files = _weights(where)
    except (OSError, ValueError) as e:
        info["error"] = "cannot read the weights in %s: %s" % (where, e)
        return info
    info.update(params=params, bytes=size, weights=files,
                dtype=dtype or TORCH_DTYPES.get(str(info["config"]["torch_dtype"])))
    info["tokenizer"] = any(os.path.isfile(os.path.join(where, n)) for n in (
        "tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))
    info["chat_template"] = _chat_template(where)
    if not files:
        info["error"] = ("%s has a config.json but no weights (*.safetensors or pytorch_model*.bin): export a "
                         "checkpoint into it first (playbooks/export.yml) or point model= at the directory that "
                         "holds them" % where)
    elif not info["tokenizer"]:
        info["error"] = "%s has weights but no tokenizer files: copy the tokenizer of the model it came from" % where
    else:
        info["found"] = True
    return info


if __name__ == "__main__":
    print(json.dumps(model_info(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)))


def config_of(model, presets_dir):
    """(config.json as a dict, where it was read) for a preset name, a model directory or a cached hub id; (None,
    why not) when this machine has none of them (the model is then only on the hosts)."""
    for where in (os.path.join(presets_dir, model), os.path.expanduser(model), hub_snapshot(model) or ""):
        path = os.path.join(where, "config.json") if where else ""
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f), path
            except (OSError, ValueError) as e:
                return None, "%s cannot be read: %s" % (path, e)
    return None, "no config.json for %s on the controller" % model
