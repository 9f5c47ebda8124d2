"""Shared fixtures: the real training environment, made by the real setup.yml; each test marked with its tier."""

import os
import pathlib
import signal
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from helpers import run_playbook  # noqa: E402

TESTS = pathlib.Path(__file__).resolve().parent
VENV = pathlib.Path(os.environ.get("DSFLEET_HOME", pathlib.Path.home() / ".dsfleet")) / "venv"
TIERS = ("unit", "e2e", "cluster")


def _interrupted(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


# tests/run.sh runs the cluster tier in the background, where SIGINT is ignored, and stops it with SIGTERM: as a
# KeyboardInterrupt, the fixtures' teardown (the rigs' sshd, namespaces and bridges) still runs
signal.signal(signal.SIGTERM, _interrupted)


def pytest_collection_modifyitems(config, items):
    """Mark every test with the tier of its directory: pytest -m unit selects tests/unit, and so on."""
    for item in items:
        parts = pathlib.Path(str(item.fspath)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def setup_result():
    """setup.yml on the embedded default inventory (this machine), run once per session."""
    result = run_playbook("setup.yml")
    assert result.rc == 0, result.stdout[-4000:]
    return result


@pytest.fixture(scope="session")
def train_python(setup_result):
    """The training venv's python, as setup.yml installed it; exported for tests that run the module."""
    python = VENV / "bin" / "python"
    assert python.exists(), "setup.yml did not create %s" % python
    os.environ["DSFLEET_TRAIN_PYTHON"] = str(python)
    return str(python)


@pytest.fixture(autouse=True)
def _training_python_for_train_tests(request):
    """tests/e2e/test_train.py runs the module with the venv's python: make sure setup.yml made it."""
    if request.node.module.__name__.endswith("test_train") and not os.environ.get("DSFLEET_TRAIN_PYTHON"):
        request.getfixturevalue("train_python")


def _node_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("dsfleet_node_for_tests",
                                                  TESTS.parent / "roles" / "launch" / "files" / "dsfleet_node.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _release_deepspeed_shm(request):
    """Tests that run DeepSpeed directly (not under dsfleet's supervisor, which cleans up after its ranks) would
    leave its CPU all-reduce segments in /dev/shm: ~69 MB of RAM per rank per run, gigabytes over the suite."""
    yield
    if "e2e" in pathlib.Path(str(request.node.fspath)).parts:
        _node_module().tidy()
