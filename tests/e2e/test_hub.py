"""A hub model (-e model=org/name) on this machine: downloaded once by the master through the real huggingface_hub
client from a local stand-in for the Hub (tests/rig/fake_hub.py at HF_ENDPOINT: no internet here), sized from the
config.json the master fetched, trained, and not downloaded again by the next run. A typo in the id fails with the
fix before anything starts."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import uuid

import pytest

from helpers import ROOT, RUNS, run_playbook

sys.path.insert(0, str(ROOT / "tests" / "rig"))
import fake_hub  # noqa: E402

HOME = pathlib.Path.home() / ".dsfleet"


def file_gets(requests):
    return [r for r in requests if r.startswith("GET ") and "/resolve/" in r]


@pytest.fixture(scope="module")
def hub(train_python, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    repo = root / "fake-org" / "tiny-llama"
    repo.mkdir(parents=True)
    preset = ROOT / "train" / "presets" / "tiny"
    vocab = json.loads((preset / "config.json").read_text())["vocab_size"]
    subprocess.run([train_python, "-c", fake_hub.BUILD_TINY_LLAMA, str(repo), str(preset), str(vocab)], check=True, capture_output=True)
    srv = fake_hub.serve(str(root), "127.0.0.1", 0, log=open("/dev/null", "w"))
    shutil.rmtree(HOME / "inputs" / "hub" / "fake-org--tiny-llama--main", ignore_errors=True)
    try:
        yield srv, repo, "http://127.0.0.1:%d" % srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


TOKEN = "hf_dsfleetTestToken0123456789"


def launch(endpoint, tmp_path, token=None, **knobs):
    run_id = "hub-%s" % uuid.uuid4().hex[:6]
    # an empty HF_HOME: neither the controller nor the host has the model in a hub cache
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "NO_PROXY": "127.0.0.1"}
    if token:
        env["HF_TOKEN"] = token
    result = run_playbook("launch.yml", dict({"run_id": run_id, "max_steps": 3, "cpu_ranks": 1, "block_size": 32},
                                             **knobs), envvars=env)
    return result, run_id


def test_a_hub_model_is_downloaded_once_sized_and_trained(hub, tmp_path):
    srv, repo, endpoint = hub
    result, run_id = launch(endpoint, tmp_path, token=TOKEN, model="fake-org/tiny-llama")
    assert result.rc == 0, result.stdout[-5000:]
    # the controller's token reached the hub with every request of the master (config.json and the download),
    # through a 0600 file on the master, never through the run's files or the play's output
    assert srv.tokens and all(token == TOKEN for _, token in srv.tokens if "/api/agent" not in _), srv.tokens
    token_file = HOME / "hf_token"
    assert token_file.read_text() == TOKEN and (token_file.stat().st_mode & 0o777) == 0o600
    assert TOKEN not in result.stdout
    assert not [p for p in (RUNS / run_id).rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    folder = HOME / "inputs" / "hub" / "fake-org--tiny-llama--main"
    assert "model fake-org/tiny-llama@main: from the hub, downloaded once on the master localhost into %s" % folder \
        in result.stdout
    plan = json.loads((RUNS / run_id / "plan.json").read_text())
    # sized from the config.json the master fetched from the hub (the controller has no copy)
    assert plan["sizing"]["known"] and plan["sizing"]["family"] == "llama", plan["sizing"]
    assert re.search(r"fake-org/tiny-llama@main is commit [0-9a-f]{40} \(\d+ files, [\d.]+ MiB, from the hub",
                     result.stdout), result.stdout[-4000:]
    # every file of the repository arrived byte for byte, each downloaded once (at the resolved commit), plus the
    # planner's one read of config.json at the branch
    names = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    for name in names:
        assert (folder / name).read_bytes() == (repo / name).read_bytes(), name
    gets = [g.split("/resolve/")[1].rsplit(" ", 1)[0].split("/", 1) for g in file_gets(srv.requests)]
    commit = json.loads((folder / ".dsfleet-source.json").read_text())["commit"]
    assert sorted(name for rev, name in gets if rev == commit) == names, gets
    assert [name for rev, name in gets if rev != commit] == ["config.json"], gets
    manifest = json.loads((folder / ".dsfleet-source.json").read_text())
    assert manifest["repo"] == "fake-org/tiny-llama" and len(manifest["commit"]) == 40 and manifest["source"] == "hub"
    summary = json.loads((RUNS / run_id / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["model"] == "fake-org/tiny-llama", summary
    argv = plan["hosts"][0]["process"]["argv"]
    assert argv[argv.index("--model") + 1] == str(folder)

    # the next run finds the same commit in place: no file downloaded again (the planner reads the branch's
    # config.json again: the branch may have moved)
    before = len(srv.requests)
    again, _ = launch(endpoint, tmp_path, model="fake-org/tiny-llama")
    assert again.rc == 0, again.stdout[-4000:]
    assert file_gets(srv.requests[before:]) == ["GET /fake-org/tiny-llama/resolve/main/config.json 200"], \
        srv.requests[before:]


def test_a_mistyped_hub_id_fails_with_the_fix_and_starts_nothing(hub, tmp_path):
    _, _, endpoint = hub
    result, run_id = launch(endpoint, tmp_path, model="fake-org/no-such-model")
    assert result.rc != 0
    assert any("fake-org/no-such-model was not found at %s" % endpoint in f and "-e model=/path" in f
               for f in result.failures), result.failures
    assert not (RUNS / run_id / "logs").exists() and not (RUNS / run_id / "summary.json").exists()
    assert not (HOME / "inputs" / "hub" / "fake-org--no-such-model--main").exists()
