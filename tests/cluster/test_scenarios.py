"""The molecule scenarios on network-namespace hosts (tests/molecule), run as tests.

Each scenario builds its own hosts (tests/rig/rig.py), converges, checks idempotence, verifies and destroys;
afterwards nothing of the rig may be left: no namespace, no link, no process.
"""

import os
import pathlib
import subprocess
import sys
import uuid

import pytest

TESTS = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG = TESTS / ".config" / "molecule" / "config.yml"

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


def _leftovers(prefix):
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in (netns + links).splitlines() if prefix in line]


# tests/molecule/default and tests/molecule/pdsh (setup, launch, idempotence and verify on a fresh 3-host rig of
# their own: ~6 min each) are not run here: tests/cluster/test_failures.py does the same on its shared rig (setup
# from the wheelhouse and a second setup that changes nothing, launches with both launchers, a finished run id not
# trained again, loss, export, the SSH mesh, no rank left). Run them by hand with
# `cd tests && molecule -c .config/molecule/config.yml test -s default` (or `-s pdsh`).
@pytest.mark.parametrize("scenario,prefix", [
    ("rigcheck", "dsfrc"),
    ("gpu_plan", "dsfgp"),
])
def test_scenario(scenario, prefix, tmp_path):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["DSFLEET_TEST_RUN_ID"] = "molecule-%s-%s" % (scenario, uuid.uuid4().hex[:6])
    env.pop("ANSIBLE_CONFIG", None)
    log = tmp_path / "molecule.log"
    with open(log, "w") as out:
        proc = subprocess.run(["molecule", "-c", str(BASE_CONFIG), "test", "-s", scenario], cwd=TESTS, env=env,
                              stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    text = log.read_text()
    # keep the whole log next to the run for whoever debugs a failure
    keep = TESTS / ".work" / "logs"
    keep.mkdir(parents=True, exist_ok=True)
    (keep / ("molecule-%s.log" % scenario)).write_text(text)
    assert proc.returncode == 0, text[-6000:]
    assert scenario == "rigcheck" or "idempotence" in text.lower()
    assert _leftovers(prefix) == []
