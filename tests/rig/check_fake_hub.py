#!/usr/bin/env python3
"""Check tests/rig/fake_hub.py against the real clients (huggingface_hub + transformers).

Run with the training venv:  /root/.dsfleet/venv/bin/python tests/rig/check_fake_hub.py [-v]

Starts the fake hub in a thread on a free port, points HF_ENDPOINT / HF_HOME at it and a temp dir
(before huggingface_hub is imported: it reads them at import time), builds a tiny Llama repo
``fake-org/tiny`` (random weights + the preset tokenizer from train/presets/tiny), then checks:
  1. snapshot_download(local_dir=...) fetches every file byte-identical; a second call makes no file GET
  2. snapshot_download() into the cache: same, snapshot dir named by the fake commit sha
  3. transformers AutoConfig / AutoTokenizer / AutoModelForCausalLM.from_pretrained work (own cache_dir)
  4. unknown repo -> RepositoryNotFoundError; unknown revision -> RevisionNotFoundError;
     missing file -> EntryNotFoundError; no Xet metadata is ever advertised
  5. the commit sha is deterministic and changes with the content
Prints OK at the end; any failed check raises. -v prints the server's request log.
"""

import filecmp
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
PRESET = os.path.join(REPO_ROOT, "train", "presets", "tiny")
sys.path.insert(0, HERE)
import fake_hub  # noqa: E402  (stdlib only)

VERBOSE = "-v" in sys.argv[1:]


def tree_files(d):
    out = set()
    for dp, dns, fns in os.walk(d):
        dns[:] = [x for x in dns if x != ".cache"]
        out |= {os.path.relpath(os.path.join(dp, f), d) for f in fns}
    return out


def assert_same_tree(src, dst):
    a, b = tree_files(src), tree_files(dst)
    assert a == b, f"file sets differ: only in repo {a - b}, only in download {b - a}"
    for rel in a:
        assert filecmp.cmp(os.path.join(src, rel), os.path.join(dst, rel), shallow=False), f"{rel} differs"
    return a


def file_gets(lines):
    return [x for x in lines if x.startswith("GET ") and "/resolve/" in x]


def main():
    tmp = tempfile.mkdtemp(prefix="fake_hub_check_")
    hub_root = os.path.join(tmp, "hub")
    repo_dir = os.path.join(hub_root, "fake-org", "tiny")
    os.makedirs(repo_dir)
    srv = fake_hub.serve(hub_root, "127.0.0.1", 0, log=sys.stderr if VERBOSE else None)
    endpoint = "http://127.0.0.1:%d" % srv.server_address[1]
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        os.environ.pop(k, None)
    os.environ.update(
        HF_ENDPOINT=endpoint, HF_HOME=os.path.join(tmp, "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1", NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost", TRANSFORMERS_VERBOSITY="error",
    )
    try:
        run_checks(srv, endpoint, tmp, repo_dir)
    finally:
        srv.shutdown()
        srv.server_close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("OK")


def run_checks(srv, endpoint, tmp, repo_dir):
    import huggingface_hub as hh
    import torch
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    assert constants.ENDPOINT == endpoint, constants.ENDPOINT

    # Build the tiny repo: random-weight Llama + preset tokenizer + a file in a subdirectory.
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    ref_model = LlamaForCausalLM(cfg).eval()
    ref_model.save_pretrained(repo_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(PRESET, f), repo_dir)
    os.makedirs(os.path.join(repo_dir, "extra"))
    with open(os.path.join(repo_dir, "extra", "notes.txt"), "w") as f:
        f.write("subdirectory file\n")
    sha, files = fake_hub.scan_repo(repo_dir)
    print(f"repo fake-org/tiny: {len(files)} files, commit {sha}: {', '.join(sorted(files))}")

    # 1. local_dir download, then again (must fetch no file).
    local = os.path.join(tmp, "x")
    n0 = len(srv.requests)
    assert hh.snapshot_download("fake-org/tiny", local_dir=local) == os.path.realpath(local)
    got = assert_same_tree(repo_dir, local)
    first = srv.requests[n0:]
    assert len(file_gets(first)) == len(files), first
    n1 = len(srv.requests)
    hh.snapshot_download("fake-org/tiny", local_dir=local)
    again = srv.requests[n1:]
    assert not file_gets(again), f"second local_dir call downloaded files: {again}"
    assert_same_tree(repo_dir, local)
    print(f"1. local_dir: {len(got)} files byte-identical ({len(first)} requests); "
          f"second call: {len(again)} request(s), no file GET: {again}")

    # 2. cache download, then again.
    n2 = len(srv.requests)
    snap = hh.snapshot_download("fake-org/tiny")
    assert snap == os.path.join(constants.HF_HUB_CACHE, "models--fake-org--tiny", "snapshots", sha), snap
    assert_same_tree(repo_dir, snap)
    n3 = len(srv.requests)
    assert len(file_gets(srv.requests[n2:n3])) == len(files), srv.requests[n2:n3]
    assert hh.snapshot_download("fake-org/tiny") == snap
    again = srv.requests[n3:]
    assert not file_gets(again), f"second cache call downloaded files: {again}"
    print(f"2. cache: {snap} byte-identical; second call: {len(again)} request(s), no file GET")

    # 3. transformers, into a cache of its own so that it does its own requests.
    tf_cache = os.path.join(tmp, "tf_cache")
    n4 = len(srv.requests)
    config = AutoConfig.from_pretrained("fake-org/tiny", cache_dir=tf_cache)
    assert config.model_type == "llama" and config.hidden_size == 64 and config.vocab_size == 1024
    tok = AutoTokenizer.from_pretrained("fake-org/tiny", cache_dir=tf_cache)
    ref_tok = AutoTokenizer.from_pretrained(PRESET)
    text = "hello fake hub"
    ids = tok(text)["input_ids"]
    assert ids == ref_tok(text)["input_ids"] and len(ids) > 0, ids
    model = AutoModelForCausalLM.from_pretrained("fake-org/tiny", cache_dir=tf_cache).eval()
    ref_sd, sd = ref_model.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys() and all(torch.equal(ref_sd[k], sd[k]) for k in sd)
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(model(x).logits, ref_model(x).logits)
    tf_reqs = srv.requests[n4:]
    print(f"3. transformers: AutoConfig/AutoTokenizer/AutoModelForCausalLM OK "
          f"({len(tf_reqs)} requests, {len(file_gets(tf_reqs))} file GETs, weights identical)")

    # 4. errors, and no Xet anywhere.
    for call, exc in (
        (lambda: hh.snapshot_download("fake-org/missing"), RepositoryNotFoundError),
        (lambda: hh.snapshot_download("fake-org/missing", local_dir=os.path.join(tmp, "m")), RepositoryNotFoundError),
        (lambda: hh.hf_hub_download("fake-org/missing", "config.json"), RepositoryNotFoundError),
        (lambda: hh.snapshot_download("fake-org/tiny", revision="no-such-branch"), RevisionNotFoundError),
        (lambda: hh.hf_hub_download("fake-org/tiny", "no-such-file.json"), EntryNotFoundError),
    ):
        try:
            call()
        except exc:
            pass
        else:
            raise AssertionError(f"expected {exc.__name__}")
    try:
        AutoConfig.from_pretrained("fake-org/missing", cache_dir=tf_cache)
        raise AssertionError("AutoConfig on a missing repo should fail")
    except OSError as e:
        assert "fake-org/missing" in str(e), e
    api = hh.HfApi()
    info = api.model_info("fake-org/tiny")
    assert info.sha == sha and sorted(s.rfilename for s in info.siblings) == sorted(files)
    assert all(f.xet_hash is None for f in api.list_repo_tree("fake-org/tiny", recursive=True) if hasattr(f, "xet_hash"))
    for f in files:
        meta = hh.get_hf_file_metadata(hh.hf_hub_url("fake-org/tiny", f))
        assert meta.xet_file_data is None and meta.commit_hash == sha and meta.size == files[f]["size"], (f, meta)
    print("4. missing repo -> RepositoryNotFoundError, bad revision -> RevisionNotFoundError, "
          "missing file -> EntryNotFoundError; no Xet metadata")

    # 5. commit sha: deterministic, follows content.
    assert fake_hub.scan_repo(repo_dir)[0] == sha == api.repo_info("fake-org/tiny").sha
    with open(os.path.join(repo_dir, "extra", "notes.txt"), "a") as f:
        f.write("changed\n")
    sha2 = fake_hub.scan_repo(repo_dir)[0]
    assert sha2 != sha and api.repo_info("fake-org/tiny").sha == sha2
    assert len(sha2) == 40 and all(c in "0123456789abcdef" for c in sha2)
    print(f"5. commit sha deterministic; after a content change: {sha2}")
    if VERBOSE:
        print(f"{len(srv.requests)} requests in all")
    check_cli(tmp, sha2)


def check_cli(tmp, sha):
    """6. The CLI: --port 0 --port-file, request lines on stderr; stopped by its own PID."""
    import json
    import subprocess
    import time
    import urllib.request
    port_file, err_file = os.path.join(tmp, "port"), os.path.join(tmp, "cli.stderr")
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_hub.py"), "--root", os.path.join(tmp, "hub"),
                                 "--host", "127.0.0.1", "--port", "0", "--port-file", port_file], stderr=err)
    try:
        for _ in range(100):
            if os.path.exists(port_file) or proc.poll() is not None:
                break
            time.sleep(0.1)
        port = int(open(port_file).read())
        url = f"http://127.0.0.1:{port}/api/models/fake-org/tiny/revision/main"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        assert json.load(opener.open(url))["sha"] == sha
    finally:
        proc.terminate()  # by PID (Popen), never by name
        proc.wait(timeout=10)
    log = open(err_file).read()
    assert "fake_hub: GET /api/models/fake-org/tiny/revision/main 200" in log, log
    print(f"6. CLI: pid {proc.pid} served on port-file port {port}, request line on stderr, stopped")


if __name__ == "__main__":
    main()
