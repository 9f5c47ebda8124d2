#!/usr/bin/env python3
"""Test rig for dsfleet: N "LAN hosts" on this machine, built from network namespaces.

Each host is a network namespace with a veth into a bridge in the root namespace (the
controller), its own sshd (own host key, own mount + uts namespace: private /root, /tmp,
/usr/local/bin, /opt/dsfleet, /etc/ssh, /etc/hosts, /etc/slurm, and a fresh /dev/shm) and its own hostname.

CLI:
    rig.py create  --hosts N --state-dir DIR [--prefix dsf] [--subnet 10.177.53.0/24]
    rig.py destroy --state-dir DIR [--purge]
    rig.py status  --state-dir DIR [--check]
    rig.py exec    --state-dir DIR HOST [--] CMD...

Library:
    rig = create(state_dir, hosts=3)        -> Rig
    rig = load(state_dir)                   -> Rig (or None)
    rig.run_in("h1", "hostname")            -> subprocess.CompletedProcess
    run_in("h1", "hostname", state_dir=DIR) -> same, DIR defaults to $DSF_RIG_STATE_DIR
    destroy(state_dir)                      -> idempotent

Standard library only. Must run as root. Needs: iproute2 (ip), util-linux (unshare, setsid,
mount), openssh-server (/usr/sbin/sshd), openssh-client (ssh, ssh-keygen).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

STATE_FILE = "state.json"
STATE_VERSION = 1
DEFAULT_PREFIX = "dsf"
DEFAULT_SUBNET = "10.177.53.0/24"
HOST_OFFSET = 11  # hosts get network+11, network+12, ...; the controller network+1
INNER_IFACE = "eth0"
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
# Paths each host gets a private copy of (bind mounts inside its own mount namespace).
# key -> mount target; per-host source is DIR/hosts/<name>/<key>.
PRIVATE_MOUNTS = {
    "etc-ssh": "/etc/ssh",
    "etc-hosts": "/etc/hosts",
    # a copy of the controller's; a test rewrites it in place (same inode) to make a host another distribution
    "etc-os-release": "/etc/os-release",
    "root": "/root",
    "usr-local-bin": "/usr/local/bin",
    "opt-dsfleet": "/opt/dsfleet",
    # empty: tests/rig/slurm.py writes the host's slurm.conf here (plain sbatch/squeue read /etc/slurm/slurm.conf)
    "etc-slurm": "/etc/slurm",
    "tmp": "/tmp",
}
REQUIRED_TOOLS = {
    "ip": "iproute2",
    "unshare": "util-linux",
    "setsid": "util-linux",
    "mount": "mount",
    "hostname": "hostname",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
}


class RigError(Exception):
    """A clear, user-facing failure."""


def log(msg: str) -> None:
    print(f"rig: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- helpers


def sh(args: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture output; raise RigError with its stderr on failure."""
    try:
        cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as exc:
        raise RigError(f"timed out after {timeout}s: {shlex.join(args)}") from exc
    if check and cp.returncode != 0:
        raise RigError(f"command failed (rc {cp.returncode}): {shlex.join(args)}\n{cp.stderr.strip()}")
    return cp


def preflight() -> None:
    if os.geteuid() != 0:
        raise RigError("must run as root (creates network namespaces, bridges and mounts)")
    missing = [f"{tool} (apt package {pkg})" for tool, pkg in REQUIRED_TOOLS.items() if not shutil.which(tool)]
    if not os.access(SSHD, os.X_OK):
        missing.append(f"{SSHD} (apt package openssh-server)")
    if missing:
        raise RigError("missing tools: " + ", ".join(missing))


def read_starttime(pid: int) -> int | None:
    """Process start time (clock ticks since boot) or None if gone/zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def pid_alive(pid: int, starttime: int | None = None) -> bool:
    st = read_starttime(pid)
    if st is None:
        return False
    return starttime is None or st == starttime


def netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def link_ifindex(name: str) -> int | None:
    try:
        with open(f"/sys/class/net/{name}/ifindex") as f:
            return int(f.read().strip())
    except OSError:
        return None


def netns_pids(name: str) -> list[int]:
    cp = sh(["ip", "netns", "pids", name], check=False)
    if cp.returncode != 0:
        return []
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def write_file(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def set_ipv6_disabled(path_prefix: str, iface: str) -> None:
    with contextlib.suppress(OSError):
        with open(f"{path_prefix}/proc/sys/net/ipv6/conf/{iface}/disable_ipv6", "w") as f:
            f.write("1")


@contextlib.contextmanager
def dir_lock(state_dir: str):
    os.makedirs(state_dir, exist_ok=True)
    fd = os.open(os.path.join(state_dir, ".rig.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RigError(f"another rig command holds the lock on {state_dir}") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def yq(value) -> str:
    """A YAML scalar: JSON strings/numbers/bools are valid YAML flow scalars."""
    return json.dumps(value)


# ----------------------------------------------------------------------------- the rig


class Rig:
    """A rig recorded in DIR/state.json."""

    def __init__(self, state_dir: str, state: dict):
        self.state_dir = state_dir
        self.state = state

    # convenience accessors
    @property
    def hosts(self) -> list[dict]:
        return self.state["hosts"]

    @property
    def names(self) -> list[str]:
        return [h["name"] for h in self.hosts]

    @property
    def ssh_config(self) -> str:
        return self.state["files"]["ssh_config"]

    @property
    def inventory(self) -> str:
        return self.state["files"]["inventory"]

    @property
    def known_hosts(self) -> str:
        return self.state["files"]["known_hosts"]

    @property
    def key(self) -> str:
        return self.state["controller"]["key"]

    def host(self, name: str) -> dict:
        for h in self.hosts:
            if name in (h["name"], h["address"], h["netns"]):
                return h
        raise RigError(f"no host {name!r} in this rig (hosts: {', '.join(self.names)})")

    def address(self, name: str) -> str:
        return self.host(name)["address"]

    def host_dir(self, name: str, sub: str = "") -> str:
        """Per-host directory on the controller, e.g. host_dir('h1', 'usr-local-bin')."""
        return os.path.join(self.host(name)["dir"], sub) if sub else self.host(name)["dir"]

    def ssh_cmd(self, host: str, cmd: str | list[str], extra: list[str] | None = None) -> list[str]:
        if not isinstance(cmd, str):
            cmd = shlex.join(cmd)
        return ["ssh", "-F", self.ssh_config, *(extra or []), self.host(host)["name"], cmd]

    def run_in(self, host: str, cmd: str | list[str], check: bool = False, timeout: float = 120,
               input: str | None = None, extra_ssh: list[str] | None = None) -> subprocess.CompletedProcess:
        """Run a shell command on a host via ssh (the rig's ssh_config). Output captured as text."""
        args = self.ssh_cmd(host, cmd, extra_ssh)
        cp = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input)
        if check and cp.returncode != 0:
            raise RigError(f"{host}: rc {cp.returncode}: {cmd}\n{cp.stdout}{cp.stderr}")
        return cp

    def nsexec(self, host: str, args: list[str], **kw) -> subprocess.CompletedProcess:
        """Run a command in a host's network namespace only (root mounts, not the host's)."""
        return subprocess.run(["ip", "netns", "exec", self.host(host)["netns"], *args],
                              capture_output=True, text=True, **kw)

    def save(self) -> None:
        write_file(os.path.join(self.state_dir, STATE_FILE), json.dumps(self.state, indent=2) + "\n")


def load(state_dir: str) -> Rig | None:
    path = os.path.join(state_dir, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RigError(f"cannot read {path}: {exc}") from exc
    return Rig(os.path.abspath(state_dir), state)


# ----------------------------------------------------------------------------- create


def _validate(n_hosts: int, prefix: str, subnet: str, state_dir: str) -> ipaddress.IPv4Network:
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        raise RigError(f"prefix {prefix!r}: use 1-8 lowercase letters/digits, starting with a letter")
    if n_hosts < 1:
        raise RigError("--hosts must be >= 1")
    try:
        net = ipaddress.IPv4Network(subnet, strict=True)
    except ValueError as exc:
        raise RigError(f"bad --subnet {subnet!r}: {exc}") from exc
    if not net.is_private or net.is_loopback or net.is_link_local:
        raise RigError(f"--subnet {subnet} must be a private range")
    if net.num_addresses - 2 < HOST_OFFSET - 1 + n_hosts:
        raise RigError(f"--subnet {subnet} too small for {n_hosts} hosts starting at .{HOST_OFFSET}")
    if re.search(r"\s", state_dir):
        raise RigError("--state-dir must not contain whitespace (it ends up in ssh options)")
    if len(f"{prefix}-h{n_hosts}-v") > 15:
        raise RigError("interface names would exceed 15 characters; use a shorter prefix")
    return net


def _check_conflicts(prefix: str, net: ipaddress.IPv4Network, names: dict) -> None:
    """Refuse to touch anything that exists and is not ours."""
    problems = []
    if os.path.exists(f"/sys/class/net/{names['bridge']}"):
        problems.append(f"link {names['bridge']} already exists")
    for ns, veth in names["hosts"]:
        if netns_inode(ns) is not None:
            problems.append(f"network namespace {ns} already exists")
        if os.path.exists(f"/sys/class/net/{veth}"):
            problems.append(f"link {veth} already exists")
    cp = sh(["ip", "-o", "-4", "addr", "show"], check=False)
    for line in cp.stdout.splitlines():
        m = re.search(r"^\d+:\s+(\S+)\s+inet\s+(\S+)", line)
        if m and ipaddress.IPv4Interface(m.group(2)).network.overlaps(net):
            problems.append(f"{m.group(1)} already has {m.group(2)}, which overlaps {net}")
    cp = sh(["ip", "-o", "-4", "route", "show"], check=False)
    for line in cp.stdout.splitlines():
        dst = line.split()[0] if line.split() else ""
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                if ipaddress.IPv4Network(dst, strict=False).overlaps(net):
                    problems.append(f"route '{line.strip()}' overlaps {net}")
    if problems:
        raise RigError("refusing to create (not ours, left untouched):\n  " + "\n  ".join(problems)
                       + "\nPick another --prefix/--subnet, or destroy the rig that owns them.")


def _sshd_config(address: str) -> str:
    sftp = f"Subsystem sftp {SFTP_SERVER}\n" if os.path.exists(SFTP_SERVER) else ""
    return f"""# Generated by dsfleet tests/rig/rig.py. Lives at /etc/ssh/sshd_config inside the host.
Port 22
ListenAddress {address}
AddressFamily inet
HostKey /etc/ssh/ssh_host_ed25519_key
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
MaxStartups 200:30:400
MaxSessions 100
LogLevel INFO
AcceptEnv LANG LC_*
{sftp}"""


def _ssh_keygen(path: str, comment: str) -> str:
    for p in (path, path + ".pub"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    os.chmod(path, 0o600)
    with open(path + ".pub") as f:
        return f.read().strip()


def _prepare_host_dir(hdir: str, name: str, address: str, ctl_pub: str, all_hosts: list[tuple[str, str]],
                      ctl_address: str, copy_pip_config: bool) -> str:
    """Create DIR/hosts/<name>/{etc-ssh,etc-hosts,root,tmp,usr-local-bin,opt-dsfleet,etc-slurm}; return host pubkey."""
    if os.path.isdir(hdir):
        shutil.rmtree(hdir)
    os.makedirs(hdir, mode=0o755)
    os.chmod(hdir, 0o755)
    # /etc/ssh: the controller's client config + moduli, plus this host's server config and key
    etc_ssh = os.path.join(hdir, "etc-ssh")
    os.makedirs(etc_ssh, mode=0o755)
    for item in ("ssh_config", "ssh_config.d", "moduli"):
        src = os.path.join("/etc/ssh", item)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(etc_ssh, item), symlinks=True)
        elif os.path.isfile(src):
            shutil.copy2(src, os.path.join(etc_ssh, item))
    write_file(os.path.join(etc_ssh, "sshd_config"), _sshd_config(address))
    host_pub = _ssh_keygen(os.path.join(etc_ssh, "ssh_host_ed25519_key"), f"root@{name}")
    # /etc/hosts: every rig host by name
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{name}-loopback", f"{ctl_address}\tcontroller"]
    lines += [f"{a}\t{n}" for n, a in all_hosts]
    write_file(os.path.join(hdir, "etc-hosts"), "\n".join(lines) + "\n")
    shutil.copyfile("/etc/os-release", os.path.join(hdir, "etc-os-release"))
    # /root: fresh home with the controller's key
    home = os.path.join(hdir, "root")
    if os.path.isdir("/etc/skel"):
        shutil.copytree("/etc/skel", home, symlinks=True)
    else:
        os.makedirs(home)
    os.chmod(home, 0o700)
    os.makedirs(os.path.join(home, ".ssh"), mode=0o700)
    write_file(os.path.join(home, ".ssh", "authorized_keys"), ctl_pub + "\n", 0o600)
    pip_conf = "/root/.config/pip/pip.conf"
    if copy_pip_config and os.path.isfile(pip_conf):
        os.makedirs(os.path.join(home, ".config", "pip"), mode=0o755)
        shutil.copy2(pip_conf, os.path.join(home, ".config", "pip", "pip.conf"))
    tmp = os.path.join(hdir, "tmp")
    os.makedirs(tmp)
    os.chmod(tmp, 0o1777)
    for d in ("usr-local-bin", "opt-dsfleet", "etc-slurm"):
        os.makedirs(os.path.join(hdir, d), mode=0o755)
    return host_pub


def _mount_script(hdir: str, name: str) -> str:
    """sh script run in the host's new mount+uts namespace before exec'ing sshd.

    Mount sources all live under hdir; if hdir itself lies under one of the targets
    (e.g. DIR in /tmp) that target is mounted last so it does not hide the other sources.
    """
    real = os.path.realpath(hdir)
    order = list(PRIVATE_MOUNTS)
    order.sort(key=lambda k: real == PRIVATE_MOUNTS[k] or real.startswith(PRIVATE_MOUNTS[k].rstrip("/") + "/"))
    cmds = [f"hostname {shlex.quote(name)}"]
    for key in order:
        cmds.append(f"mount --bind {shlex.quote(os.path.join(real, key))} {PRIVATE_MOUNTS[key]}")
    # a machine's own /dev/shm: DeepSpeed's CPU all-reduce names its segments by master address and port, which
    # every host's one-host world (127.0.0.1) shares
    cmds.append("mount -t tmpfs -o mode=1777,size=1g dsfleet-rig-shm /dev/shm")
    cmds.append(f"exec {SSHD} -D -e -f /etc/ssh/sshd_config")
    return " && ".join(cmds)


def create(state_dir: str, hosts: int = 3, prefix: str = DEFAULT_PREFIX, subnet: str = DEFAULT_SUBNET,
           ready_timeout: float = 30, copy_pip_config: bool = True) -> Rig:
    """Build the rig; on any failure tear down what was made and raise RigError."""
    preflight()
    state_dir = os.path.abspath(state_dir)
    net = _validate(hosts, prefix, subnet, state_dir)
    os.makedirs(state_dir, exist_ok=True)
    with dir_lock(state_dir):
        if load(state_dir) is not None:
            log(f"state from a previous run in {state_dir}: destroying it first")
            _destroy_locked(state_dir)
        t0 = time.monotonic()
        all_addrs = list(net.hosts())
        ctl_addr = str(all_addrs[0])
        host_specs = []
        for i in range(1, hosts + 1):
            host_specs.append({
                "name": f"h{i}",
                "netns": f"{prefix}-h{i}",
                "veth": f"{prefix}-h{i}-v",
                "address": str(net.network_address + HOST_OFFSET - 1 + i),
            })
        names = {"bridge": f"{prefix}br0", "hosts": [(h["netns"], h["veth"]) for h in host_specs]}
        _check_conflicts(prefix, net, names)

        files = {
            "ssh_config": os.path.join(state_dir, "ssh_config"),
            "inventory": os.path.join(state_dir, "inventory.yml"),
            "known_hosts": os.path.join(state_dir, "known_hosts"),
        }
        state = {
            "version": STATE_VERSION,
            "status": "creating",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "state_dir": state_dir,
            "prefix": prefix,
            "subnet": str(net),
            "controller": {"address": ctl_addr, "key": os.path.join(state_dir, "id_ed25519")},
            "bridge": None,
            "hosts": [],
            "files": files,
        }
        rig = Rig(state_dir, state)
        rig.save()
        try:
            _build(rig, net, host_specs, copy_pip_config, ready_timeout)
        except BaseException as exc:
            log(f"create failed, cleaning up: {exc}")
            try:
                _destroy_locked(state_dir)
            except Exception as exc2:  # noqa: BLE001
                log(f"cleanup after failed create also failed: {exc2}")
            if isinstance(exc, RigError):
                raise
            raise RigError(f"create failed: {exc!r}") from exc
        state["status"] = "ready"
        state["create_seconds"] = round(time.monotonic() - t0, 2)
        rig.save()
        return rig


def _build(rig: Rig, net: ipaddress.IPv4Network, host_specs: list[dict], copy_pip_config: bool,
           ready_timeout: float) -> None:
    state, sd = rig.state, rig.state_dir
    ctl = state["controller"]
    plen = net.prefixlen
    # controller key
    ctl["pubkey"] = _ssh_keygen(ctl["key"], f"dsfleet-rig-controller@{state['prefix']}")
    # bridge (record before configuring so a failure still gets it removed)
    br = f"{state['prefix']}br0"
    sh(["ip", "link", "add", br, "type", "bridge"])
    state["bridge"] = {"name": br, "ifindex": link_ifindex(br), "address": f"{ctl['address']}/{plen}"}
    rig.save()
    set_ipv6_disabled("", br)
    sh(["ip", "addr", "add", f"{ctl['address']}/{plen}", "dev", br])
    sh(["ip", "link", "set", br, "up"])

    os.makedirs(os.path.join(sd, "hosts"), exist_ok=True)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    os.makedirs("/opt/dsfleet", mode=0o755, exist_ok=True)  # mount point only; never written to
    os.makedirs("/etc/slurm", mode=0o755, exist_ok=True)  # mount point only; never written to
    all_hosts = [(h["name"], h["address"]) for h in host_specs]
    for spec in host_specs:
        name, ns, veth, addr = spec["name"], spec["netns"], spec["veth"], spec["address"]
        hdir = os.path.join(sd, "hosts", name)
        host = {"name": name, "netns": ns, "netns_inode": None, "veth": veth, "veth_ifindex": None,
                "iface": INNER_IFACE, "address": addr, "prefixlen": plen, "dir": hdir,
                "sshd_pid": None, "sshd_starttime": None, "sshd_log": os.path.join(hdir, "sshd.log")}
        state["hosts"].append(host)
        host["host_pubkey"] = _prepare_host_dir(hdir, name, addr, ctl["pubkey"], all_hosts, ctl["address"],
                                                copy_pip_config)
        sh(["ip", "netns", "add", ns])
        host["netns_inode"] = netns_inode(ns)
        rig.save()
        sh(["ip", "link", "add", veth, "type", "veth", "peer", "name", INNER_IFACE, "netns", ns])
        host["veth_ifindex"] = link_ifindex(veth)
        rig.save()
        set_ipv6_disabled("", veth)
        sh(["ip", "link", "set", veth, "master", br])
        sh(["ip", "link", "set", veth, "up"])
        nsx = ["ip", "netns", "exec", ns]
        sh(nsx + ["sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6; "
                              "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; true"])
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        sh(["ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", INNER_IFACE])
        sh(["ip", "-n", ns, "link", "set", INNER_IFACE, "up"])

    _write_client_files(rig)

    # start every sshd (pid recorded is sshd's own: ip netns exec, unshare and sh all exec)
    for host in state["hosts"]:
        logf = open(host["sshd_log"], "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host["netns"], "unshare", "--mount", "--uts", "--propagation",
                 "private", "sh", "-c", _mount_script(host["dir"], host["name"])],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                close_fds=True, cwd="/")
        finally:
            logf.close()
        host["sshd_pid"] = proc.pid
        _CHILDREN[proc.pid] = proc
        st = None
        for _ in range(50):  # starttime is fixed at fork; read it right away
            st = read_starttime(proc.pid)
            if st is not None or proc.poll() is not None:
                break
            time.sleep(0.01)
        host["sshd_starttime"] = st
        rig.save()

    _wait_ready(rig, ready_timeout)


def _write_client_files(rig: Rig) -> None:
    state, files = rig.state, rig.state["files"]
    key, sd = state["controller"]["key"], rig.state_dir
    kh = [f"{h['name']},{h['address']} {' '.join(h['host_pubkey'].split()[:2])}" for h in state["hosts"]]
    write_file(files["known_hosts"], "\n".join(kh) + "\n")

    opts = [
        "User root",
        f"IdentityFile {key}",
        "IdentitiesOnly yes",
        f"UserKnownHostsFile {files['known_hosts']}",
        "GlobalKnownHostsFile /dev/null",
        "StrictHostKeyChecking yes",
        "UpdateHostKeys no",
        "CheckHostIP no",
        "BatchMode yes",
        "PasswordAuthentication no",
        "ConnectTimeout 5",
        "ServerAliveInterval 15",
        "LogLevel ERROR",
    ]
    blocks = [f"# Generated by dsfleet tests/rig/rig.py for {sd}. Use: ssh -F {files['ssh_config']} h1"]
    for h in state["hosts"]:
        blocks.append(f"Host {h['name']} {h['netns']}\n  HostName {h['address']}\n")
    blocks.append("Host *\n" + "".join(f"  {o}\n" for o in opts))
    write_file(files["ssh_config"], "\n".join(blocks))

    common = (f"-o UserKnownHostsFile={files['known_hosts']} -o StrictHostKeyChecking=yes "
              "-o GlobalKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o UpdateHostKeys=no")
    lines = [
        "# Generated by dsfleet tests/rig/rig.py: test hosts in network namespaces.",
        "all:",
        "  children:",
        "    dsfleet:",
        "      hosts:",
    ]
    for h in state["hosts"]:
        lines += [
            f"        {h['name']}:",
            f"          ansible_host: {yq(h['address'])}",
            f"          rig_netns: {yq(h['netns'])}",
            f"          rig_iface: {yq(h['iface'])}",
        ]
    lines += [
        "      vars:",
        "        ansible_user: root",
        f"        ansible_ssh_private_key_file: {yq(key)}",
        f"        ansible_ssh_common_args: {yq(common)}",
        "        ansible_python_interpreter: /usr/bin/python3",
        "        # beats host_key_checking = False in an ansible.cfg (molecule writes one), which would",
        "        # otherwise make Ansible switch strict host key checking off ahead of the args above",
        "        ansible_host_key_checking: true",
        "        ansible_pipelining: true",
        "        # the rig's own variables: dsfleet's variable check leaves them alone",
        "        other_vars: [\"rig_*\"]",
        f"        rig_controller_address: {yq(state['controller']['address'])}",
        f"        rig_subnet: {yq(state['subnet'])}",
        f"        rig_state_dir: {yq(sd)}",
    ]
    write_file(files["inventory"], "\n".join(lines) + "\n")


def _wait_ready(rig: Rig, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(rig.names)
    last_err: dict[str, str] = {}
    while pending:
        for name in list(pending):
            h = rig.host(name)
            if not pid_alive(h["sshd_pid"], h["sshd_starttime"]):
                raise RigError(f"sshd for {name} exited during startup; log {h['sshd_log']}:\n"
                               + _tail(h["sshd_log"]))
            try:
                cp = rig.run_in(name, "true", timeout=10, extra_ssh=["-o", "ConnectTimeout=2"])
                rc, err = cp.returncode, cp.stderr.strip()
            except subprocess.TimeoutExpired:
                rc, err = -1, "ssh timed out"
            if rc == 0:
                pending.remove(name)
            else:
                last_err[name] = err
        if pending and time.monotonic() > deadline:
            details = "\n".join(f"  {n}: {last_err.get(n, '?')}\n    sshd log: {_tail(rig.host(n)['sshd_log'], 5)}"
                                for n in pending)
            raise RigError(f"sshd not accepting ssh within {timeout}s on: {', '.join(pending)}\n{details}")
        if pending:
            time.sleep(0.2)


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return "(no log)"


# ----------------------------------------------------------------------------- destroy

_CHILDREN: dict[int, subprocess.Popen] = {}  # sshds started by this process (to reap zombies)


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


def _kill_all(targets: dict[int, int | None], grace: float = 5.0) -> list[int]:
    """targets: pid -> starttime. SIGTERM, wait, SIGKILL, wait. Returns pids that survived."""
    def alive():
        _reap()
        return [p for p, st in targets.items() if pid_alive(p, st)]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for p in alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not alive():
            return []
    return alive()


def destroy(state_dir: str, purge: bool = False) -> bool:
    """Tear down the rig recorded in state_dir. Idempotent; returns False if there was nothing."""
    preflight()
    state_dir = os.path.abspath(state_dir)
    if not os.path.isdir(state_dir):
        return False
    with dir_lock(state_dir):
        had = _destroy_locked(state_dir)
        if purge:
            for item in ("hosts", "ssh_config", "inventory.yml", "known_hosts", "id_ed25519", "id_ed25519.pub"):
                p = os.path.join(state_dir, item)
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(p)
        return had


def _destroy_locked(state_dir: str) -> bool:
    rig = load(state_dir)
    if rig is None:
        return False
    t0 = time.monotonic()
    state = rig.state
    problems = []
    hosts = state.get("hosts", [])

    def our_ns(h) -> bool:
        ino = netns_inode(h["netns"])
        if ino is None:
            return False
        if h.get("netns_inode") not in (None, ino):
            problems.append(f"namespace {h['netns']} is not the one this rig created (inode changed); left alone")
            return False
        return True

    # 1. every process: recorded sshds + anything else living in our namespaces; repeat (things may fork)
    for _ in range(5):
        targets: dict[int, int | None] = {}
        for h in hosts:
            if h.get("sshd_pid") and pid_alive(h["sshd_pid"], h.get("sshd_starttime")):
                targets[h["sshd_pid"]] = h.get("sshd_starttime")
            if our_ns(h):
                for p in netns_pids(h["netns"]):
                    if p != os.getpid():
                        targets[p] = read_starttime(p)
        targets = {p: st for p, st in targets.items() if st is not None}
        if not targets:
            break
        survivors = _kill_all(targets)
        if survivors:
            problems.append(f"processes survived SIGKILL: {survivors}")
            break
    problems = list(dict.fromkeys(problems))

    # 2. links and namespaces
    for h in hosts:
        veth, idx = h.get("veth"), h.get("veth_ifindex")
        if veth and idx is not None and link_ifindex(veth) == idx:
            cp = sh(["ip", "link", "del", veth], check=False)
            if cp.returncode != 0 and link_ifindex(veth) is not None:
                problems.append(f"ip link del {veth}: {cp.stderr.strip()}")
        if h.get("netns_inode") is not None and our_ns(h):
            cp = sh(["ip", "netns", "del", h["netns"]], check=False)
            if cp.returncode != 0:
                problems.append(f"ip netns del {h['netns']}: {cp.stderr.strip()}")
    br = state.get("bridge")
    if br and br.get("ifindex") is not None and link_ifindex(br["name"]) == br["ifindex"]:
        cp = sh(["ip", "link", "del", br["name"]], check=False)
        if cp.returncode != 0:
            problems.append(f"ip link del {br['name']}: {cp.stderr.strip()}")
    problems = list(dict.fromkeys(problems))
    if problems:
        state["status"] = "destroy-incomplete"
        rig.save()
        raise RigError("destroy incomplete (state.json kept; rerun destroy):\n  " + "\n  ".join(problems))
    os.unlink(os.path.join(state_dir, STATE_FILE))
    log(f"destroyed {len(hosts)} host(s) of {state.get('prefix')} in {time.monotonic() - t0:.1f}s")
    return True


# ----------------------------------------------------------------------------- status / run_in


def status(state_dir: str, check_ssh: bool = False) -> dict:
    rig = load(state_dir)
    if rig is None:
        return {"state_dir": os.path.abspath(state_dir), "status": "absent", "hosts": []}
    out = {"state_dir": rig.state_dir, "status": rig.state.get("status"), "prefix": rig.state.get("prefix"),
           "subnet": rig.state.get("subnet"), "bridge": None, "hosts": [], "files": rig.state.get("files")}
    br = rig.state.get("bridge")
    if br:
        out["bridge"] = {"name": br["name"], "present": link_ifindex(br["name"]) == br.get("ifindex")}
    for h in rig.hosts:
        e = {"name": h["name"], "address": h["address"], "netns": h["netns"],
             "netns_present": netns_inode(h["netns"]) is not None
                              and netns_inode(h["netns"]) == h.get("netns_inode"),
             "sshd_pid": h.get("sshd_pid"),
             "sshd_alive": bool(h.get("sshd_pid")) and pid_alive(h["sshd_pid"], h.get("sshd_starttime")),
             "pids_in_netns": netns_pids(h["netns"]) if netns_inode(h["netns"]) else []}
        if check_ssh:
            try:
                e["ssh_ok"] = rig.run_in(h["name"], "true", timeout=10).returncode == 0
            except subprocess.TimeoutExpired:
                e["ssh_ok"] = False
        out["hosts"].append(e)
    return out


def run_in(host: str, cmd: str | list[str], state_dir: str | None = None, **kw) -> subprocess.CompletedProcess:
    """Run cmd on host via ssh with the rig's ssh_config; state_dir defaults to $DSF_RIG_STATE_DIR."""
    state_dir = state_dir or os.environ.get("DSF_RIG_STATE_DIR")
    if not state_dir:
        raise RigError("run_in: pass state_dir or set DSF_RIG_STATE_DIR")
    rig = load(state_dir)
    if rig is None:
        raise RigError(f"no rig in {state_dir}")
    return rig.run_in(host, cmd, **kw)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rig.py", description="dsfleet test hosts as network namespaces")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="build N hosts (destroys a previous rig in the same state dir first)")
    c.add_argument("--hosts", type=int, default=3)
    c.add_argument("--state-dir", required=True)
    c.add_argument("--prefix", default=DEFAULT_PREFIX, help="names: <prefix>-hN netns, <prefix>br0 bridge")
    c.add_argument("--subnet", default=DEFAULT_SUBNET, help="private IPv4 subnet; .1 controller, .11+ hosts")
    c.add_argument("--timeout", type=float, default=30, help="seconds to wait for every sshd (default 30)")
    c.add_argument("--no-pip-config", action="store_true",
                   help="do not copy the controller's /root/.config/pip/pip.conf into each host's home")
    d = sub.add_parser("destroy", help="tear down exactly what state.json records (idempotent)")
    d.add_argument("--state-dir", required=True)
    d.add_argument("--purge", action="store_true", help="also delete generated files (keys, host dirs)")
    s = sub.add_parser("status", help="print the rig's state as JSON")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--check", action="store_true", help="also try ssh to every host")
    e = sub.add_parser("exec", help="run a command on a host via ssh")
    e.add_argument("--state-dir", required=True)
    e.add_argument("host")
    e.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "create":
            t0 = time.monotonic()
            rig = create(a.state_dir, a.hosts, a.prefix, a.subnet, a.timeout, not a.no_pip_config)
            log(f"{len(rig.hosts)} host(s) ready in {time.monotonic() - t0:.1f}s: "
                + ", ".join(f"{h['name']}={h['address']}" for h in rig.hosts))
            print(rig.inventory)
        elif a.cmd == "destroy":
            if not destroy(a.state_dir, a.purge):
                log(f"nothing to destroy in {a.state_dir}")
        elif a.cmd == "status":
            print(json.dumps(status(a.state_dir, a.check), indent=2))
        elif a.cmd == "exec":
            cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
            if not cmd:
                raise RigError("exec: no command given")
            rig = load(a.state_dir)
            if rig is None:
                raise RigError(f"no rig in {a.state_dir}")
            # one arg is passed to the remote shell verbatim; several are quoted individually
            remote = cmd[0] if len(cmd) == 1 else shlex.join(cmd)
            return subprocess.run(rig.ssh_cmd(a.host, remote)).returncode
    except RigError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
