"""Tests for tests/rig/rig.py (namespace test hosts). Needs root, iproute2, openssh.

Run: /tmp/scratch/cv/bin/python -m pytest tests/unit/test_rig.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RIG_DIR = Path(__file__).resolve().parents[1] / "rig"
sys.path.insert(0, str(RIG_DIR))
import rig as rigmod  # noqa: E402

# Own names, distinct from the CLI defaults and the molecule scenarios.
PREFIX, SUBNET = "dsfut", "10.177.55.0/24"
LIFE_PREFIX, LIFE_SUBNET = "dsfud", "10.177.56.0/24"

ICMP_PING = r"""
import os, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
dst, ident, data = sys.argv[1], os.getpid() & 0xffff, b"dsfleet-rig"
pkt = struct.pack("!BBHHH", 8, 0, csum(struct.pack("!BBHHH", 8, 0, 0, ident, 1) + data), ident, 1) + data
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(3)
s.sendto(pkt, (dst, 0))
end = time.time() + 3
while time.time() < end:
    r, addr = s.recvfrom(2048)
    ihl = (r[0] & 15) * 4
    t, _, _, i, _ = struct.unpack("!BBHHH", r[ihl:ihl + 8])
    if t == 0 and i == ident and addr[0] == dst:
        print("reply from", dst); sys.exit(0)
sys.exit(1)
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        rigmod.preflight()
    except rigmod.RigError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("rig")
    r = rigmod.create(str(state_dir), hosts=2, prefix=PREFIX, subnet=SUBNET)
    yield r
    rigmod.destroy(str(state_dir))
    assert not {f"{PREFIX}-h1", f"{PREFIX}-h2"} & netns_names()


def test_hostnames_differ(rig):
    names = [rig.run_in(h, "hostname", check=True).stdout.strip() for h in rig.names]
    assert names == ["h1", "h2"]


def test_host_to_host_ping_by_address(rig):
    cp = rig.run_in("h1", ["python3", "-", rig.address("h2")], input=ICMP_PING, timeout=30)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cp = rig.run_in("h2", ["python3", "-", rig.address("h1")], input=ICMP_PING, timeout=30)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # and to the controller's bridge address
    cp = rig.run_in("h2", ["python3", "-", rig.state["controller"]["address"]], input=ICMP_PING, timeout=30)
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_no_route_beyond_the_bridge(rig):
    cp = rig.run_in("h1", "ip -4 route show default", check=True)
    assert cp.stdout.strip() == ""
    # a route lookup only: no packet is sent anywhere
    cp = rig.run_in("h1", "ip route get 192.0.2.1")
    assert cp.returncode != 0 and "unreachable" in cp.stderr.lower()


def test_ssh_with_pinned_keys(rig):
    kh = Path(rig.known_hosts).read_text().splitlines()
    assert len(kh) == 2 and all(" ssh-ed25519 " in line for line in kh)
    for h in rig.hosts:
        cp = subprocess.run(["ssh", "-F", rig.ssh_config, h["name"], "cat /etc/ssh/ssh_host_ed25519_key.pub"],
                            capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.split()[:2] == h["host_pubkey"].split()[:2]
    inv = Path(rig.inventory).read_text()
    assert "StrictHostKeyChecking=yes" in inv and "StrictHostKeyChecking=no" not in inv
    assert f"UserKnownHostsFile={rig.known_hosts}" in inv
    assert oct(os.stat(rig.key).st_mode & 0o777) == "0o600"


def test_wrong_or_unknown_host_key_refused(rig, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    bad = tmp_path / "bad_known_hosts"
    bad.write_text(f"{rig.address('h1')} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    cp = subprocess.run(["ssh", "-F", rig.ssh_config, "-o", f"UserKnownHostsFile={bad}", "h1", "true"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 255
    assert "host key" in cp.stderr.lower() or "identification has changed" in cp.stderr.lower()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cp = subprocess.run(["ssh", "-F", rig.ssh_config, "-o", f"UserKnownHostsFile={empty}", "h1", "true"],
                        capture_output=True, text=True, timeout=30)
    assert cp.returncode == 255
    assert "host key verification failed" in cp.stderr.lower()


def test_private_dirs(rig):
    # /usr/local/bin: empty on hosts, a tool dropped into one host's dir shows up only there
    assert rig.run_in("h1", "ls -A /usr/local/bin", check=True).stdout.strip() == ""
    tool = Path(rig.host_dir("h1", "usr-local-bin")) / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho fake-gpu\n")
    tool.chmod(0o755)
    assert rig.run_in("h1", "nvidia-smi", check=True).stdout.strip() == "fake-gpu"
    assert rig.run_in("h2", "command -v nvidia-smi").returncode != 0
    assert not Path("/usr/local/bin/nvidia-smi").exists() or Path("/usr/local/bin/nvidia-smi").read_text() != \
        tool.read_text()
    # /tmp, /opt/dsfleet, /root are per host
    rig.run_in("h1", "touch /tmp/rig-h1-only /opt/dsfleet/rig-h1-only /root/rig-h1-only", check=True)
    assert rig.run_in("h2", "ls /tmp/rig-h1-only /opt/dsfleet/rig-h1-only /root/rig-h1-only").returncode != 0
    assert (Path(rig.host_dir("h1", "tmp")) / "rig-h1-only").exists()
    assert (Path(rig.host_dir("h1", "opt-dsfleet")) / "rig-h1-only").exists()
    assert not Path("/opt/dsfleet/rig-h1-only").exists()
    # and /dev/shm, as on separate machines (DeepSpeed's CPU all-reduce keeps its segments there)
    rig.run_in("h1", "touch /dev/shm/rig-h1-only", check=True)
    assert rig.run_in("h2", "ls /dev/shm/rig-h1-only").returncode != 0
    assert not Path("/dev/shm/rig-h1-only").exists()
    # the rest of /opt stays visible; python3 is Debian's
    assert rig.run_in("h1", "command -v python3", check=True).stdout.strip() == "/usr/bin/python3"


def test_ansible_inventory_ping(rig):
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        ansible = shutil.which("ansible")
    if not ansible:
        pytest.skip("ansible not installed")
    env = dict(os.environ, ANSIBLE_HOST_KEY_CHECKING="True", ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cp = subprocess.run([str(ansible), "-i", rig.inventory, "dsfleet", "-m", "ping"],
                        capture_output=True, text=True, timeout=120, env=env)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert cp.stdout.count("SUCCESS") == 2


def test_ansible_refuses_wrong_host_key_even_with_checking_off_in_config(rig, tmp_path):
    """molecule's ansible.cfg says host_key_checking = False; the rig inventory must win."""
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        ansible = shutil.which("ansible")
    if not ansible:
        pytest.skip("ansible not installed")
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    bad = tmp_path / "bad_known_hosts"
    bad.write_text("".join(f"{h['address']} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n"
                           for h in rig.hosts))
    inv = tmp_path / "inventory.yml"
    inv.write_text(Path(rig.inventory).read_text().replace(rig.known_hosts, str(bad)))
    cfg = tmp_path / "ansible.cfg"
    cfg.write_text("[defaults]\nhost_key_checking = False\n")
    # own ControlPath dir: a master connection left by another test would skip host key checks
    env = dict(os.environ, ANSIBLE_CONFIG=str(cfg), ANSIBLE_HOST_KEY_CHECKING="False", ANSIBLE_NOCOLOR="1",
               ANSIBLE_SSH_CONTROL_PATH_DIR=str(tmp_path / "cp"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    cp = subprocess.run([str(ansible), "-i", str(inv), "dsfleet", "-m", "ping"],
                        capture_output=True, text=True, timeout=120, env=env)
    assert cp.returncode != 0
    assert cp.stdout.count("UNREACHABLE") == 2, cp.stdout + cp.stderr
    assert "SUCCESS" not in cp.stdout


def test_cli_exec(rig):
    cp = subprocess.run([sys.executable, str(RIG_DIR / "rig.py"), "exec", "--state-dir", rig.state_dir, "h2",
                         "--", "hostname"], capture_output=True, text=True, timeout=30)
    assert cp.returncode == 0 and cp.stdout.strip() == "h2"
    assert rigmod.run_in("h1", "hostname", state_dir=rig.state_dir).stdout.strip() == "h1"


def test_destroy_leaves_nothing(tmp_path):
    r = rigmod.create(str(tmp_path / "state"), hosts=2, prefix=LIFE_PREFIX, subnet=LIFE_SUBNET)
    made_links = {r.state["bridge"]["name"]} | {h["veth"] for h in r.hosts}
    made_ns = {h["netns"] for h in r.hosts}
    assert made_links <= links() and made_ns <= netns_names()
    # a stray "training" process in each namespace, one of them ignoring SIGTERM
    r.run_in("h1", "setsid nohup sleep 600 >/dev/null 2>&1 </dev/null &", check=True)
    r.run_in("h2", "nohup sh -c 'trap \"\" TERM; sleep 600' >/dev/null 2>&1 </dev/null &", check=True)
    pids = set()
    for h in r.hosts:
        pids |= set(rigmod.netns_pids(h["netns"]))
    assert len(pids) >= 4
    starttimes = {p: rigmod.read_starttime(p) for p in pids}

    # a second create in the same dir destroys the first rig and builds afresh
    r = rigmod.create(str(tmp_path / "state"), hosts=2, prefix=LIFE_PREFIX, subnet=LIFE_SUBNET)
    assert not any(rigmod.pid_alive(p, st) for p, st in starttimes.items())
    pids = {h["sshd_pid"]: h["sshd_starttime"] for h in r.hosts}
    r.run_in("h1", "setsid nohup sleep 600 >/dev/null 2>&1 </dev/null &", check=True)
    for h in r.hosts:
        pids.update({p: rigmod.read_starttime(p) for p in rigmod.netns_pids(h["netns"])})

    # CLI destroy, twice (second is a no-op, exit 0)
    for _ in range(2):
        cp = subprocess.run([sys.executable, str(RIG_DIR / "rig.py"), "destroy", "--state-dir", r.state_dir],
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
    assert not any(rigmod.pid_alive(p, st) for p, st in pids.items() if st is not None)
    assert not made_links & links()
    assert not made_ns & netns_names()
    assert not (Path(r.state_dir) / "state.json").exists()
    assert rigmod.status(r.state_dir)["status"] == "absent"
