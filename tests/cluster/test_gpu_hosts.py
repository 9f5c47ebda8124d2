"""GPU drivers and GPU hosts without one, on 4 rig hosts with fake vendor tools and fake `lspci` replaying real
recorded outputs (tests/fixtures/gpu/SOURCES.md):

- h1: 4x A100 whose nvidia-smi answers (driver 535): left untouched even with drivers_install;
- h2: 2x RTX 3090 on the PCI bus, no nvidia-smi, drivers_install on: setup.yml in check mode runs the install
  tasks (Debian's non-free source with the host's own Signed-By, then the packages, which check mode can only
  name: their source is not really added);
- h3: 4x Data Center GPU Max 1550, no tool: Debian 12 has no Level Zero GPU backend, so no recipe: reported;
- h4: an MI300X on a host whose /etc/os-release says Rocky Linux 9.4: ROCm's RHEL repositories, reported.

setup.yml --check lists exactly what each host would get; plan.yml leaves h2-h4 out with the reason (or fails
naming h2 under require_all_hosts). A real `apt-get -s install` of h2's planned set (with Debian's non-free
archive) proves the packages exist and install together. The system preparation (roles/system) names every host
in each host's /etc/hosts (private to each rig host), trusts the other hosts in h2's active ufw (a fake `ufw`
replaying its real answers) and compares the clocks.
"""

import json
import os
import pathlib
import subprocess
import sys
import uuid

import pytest
import yaml

from helpers import ROOT, RUNS, run_playbook

sys.path.insert(0, str(ROOT / "tests" / "rig"))
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "gpu"))
from fakes import NVIDIA_HEADER, NVIDIA_QUERY, write_fake_tools  # noqa: E402

import rig as rigmod  # noqa: E402

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]

FIX = ROOT / "tests" / "fixtures" / "gpu"
SYSFIX = ROOT / "tests" / "fixtures" / "system"
# Rocky Linux 9.4's /etc/os-release as the release ships it (rocky-release-9.4)
ROCKY_94 = """NAME="Rocky Linux"
VERSION="9.4 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.4"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Rocky Linux 9.4 (Blue Onyx)"
ANSI_COLOR="0;32"
LOGO="fedora-logo-icon"
CPE_NAME="cpe:/o:rocky:rocky:9::baseos"
HOME_URL="https://rockylinux.org/"
BUG_REPORT_URL="https://bugs.rockylinux.org/"
SUPPORT_END="2032-05-31"
ROCKY_SUPPORT_PRODUCT="Rocky-Linux-9"
ROCKY_SUPPORT_PRODUCT_VERSION="9.4"
REDHAT_SUPPORT_PRODUCT="Rocky Linux"
REDHAT_SUPPORT_PRODUCT_VERSION="9.4"
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    state = tmp_path_factory.mktemp("rig")
    rig = rigmod.create(str(state), hosts=4, prefix="dsfdr", subnet="10.177.61.0/24")
    try:
        bins = {h: rig.host_dir(h, "usr-local-bin") for h in rig.names}
        write_fake_tools(bins["h1"], {"nvidia-smi": {NVIDIA_QUERY: FIX / "nvidia" / "a100_sxm4_80gb_x4_mig0.csv",
                                                     NVIDIA_HEADER: FIX / "nvidia" / "header_a100_535.txt"}},
                         python="/usr/bin/python3")
        ufw = {"status": SYSFIX / "ufw_status_active.txt"}
        ufw.update({"allow from %s comment dsfleet" % rig.address(h): SYSFIX / "ufw_rule_added.txt"
                    for h in rig.names if h != "h2"})
        write_fake_tools(bins["h2"], {"lspci": FIX / "pci" / "lspci_nnk_grep_2x_rtx3090.txt", "ufw": ufw},
                         python="/usr/bin/python3")
        write_fake_tools(bins["h3"], {"lspci": FIX / "pci" / "lspci_nn_D_grep_4x_max1550.txt"},
                         python="/usr/bin/python3")
        write_fake_tools(bins["h4"], {"lspci": FIX / "pci" / "lspci_nnk_grep_mi300x_pf_vf.txt"},
                         python="/usr/bin/python3")
        # in place: the host's bind mount keeps the file's inode
        with open(rig.host_dir("h4", "etc-os-release"), "w") as f:
            f.write(ROCKY_94)
        inventory = yaml.safe_load(pathlib.Path(rig.inventory).read_text())
        hosts = inventory["all"]["children"]["dsfleet"]["hosts"] if "all" in inventory else \
            inventory["dsfleet"]["hosts"]
        for name in ("h1", "h2"):
            hosts[name]["drivers_install"] = True
        mine = state / "inventory-drivers.yml"
        mine.write_text(yaml.safe_dump(inventory))
        yield rig, str(mine)
    finally:
        rigmod.destroy(str(state))


SAY = "Say what the host has and what the drivers plan would install"


def test_check_mode_lists_what_each_host_would_get_and_touches_a_working_host_not(fleet, tmp_path):
    rig, inventory = fleet
    result = run_playbook("setup.yml", {}, inventory=inventory, cmdline="--check --tags facts,drivers")
    said = {h: result.task_result(SAY, h)["msg"] for h in rig.names}
    assert result.rc == 0, result.stdout[-5000:]
    kernel = os.uname().release
    assert len(said["h1"]) == 2 and said["h1"][1].startswith("4 NVIDIA GPUs: ok (driver 535."), said["h1"]
    assert said["h1"][1].endswith(" answers)")            # Debian's own branch: no other branch to compare with
    h2 = said["h2"]
    assert h2[1].startswith("2 NVIDIA GPUs: missing (nvidia-smi not found"), h2
    assert "installing: nvidia-driver, firmware-misc-nonfree, nvidia-smi" in h2[1]
    assert h2[2:] == ["first: ", "keys: ", "repositories: debian-non-free",
                      "packages: linux-headers-%s linux-headers-amd64 nvidia-driver firmware-misc-nonfree nvidia-smi"
                      % kernel, "modules: "]
    assert result.task_result("Say what check mode cannot resolve", "h2")["msg"].startswith(
        "check mode: linux-headers-%s linux-headers-amd64 nvidia-driver firmware-misc-nonfree nvidia-smi would be "
        "installed from the repositories added above" % kernel)
    h3 = said["h3"]
    assert h3[1].startswith("4 Intel GPUs: unsupported (") and "no Intel driver recipe for Debian 12" in h3[1], h3
    assert len(h3) == 2
    h4 = said["h4"]
    # without /etc/redhat-release (the rig shares the controller's /etc) Ansible names it from os-release alone
    # and maps no family: the role takes the family from ID_LIKE
    assert h4[0].startswith("h4 (Rocky Linux 9.4, kernel "), h4
    assert h4[1].startswith("1 AMD GPU: missing (") and "drivers_install: true would install: epel-release, " \
        "amdgpu-dkms, rocm-smi-lib, amd-smi-lib" in h4[1], h4
    assert h4[2:] == ["first: epel-release", "keys: ", "repositories: amdgpu, rocm",
                      "packages: kernel-devel-%s kernel-headers amdgpu-dkms rocm-smi-lib amd-smi-lib" % kernel,
                      "modules: "]
    # h1 (drivers_install, driver answers): nothing would change; h2 would get its source (check mode)
    changed = result.stats.get("changed") or {}
    assert changed.get("h1", 0) == 0 and changed.get("h3", 0) == 0 and changed.get("h4", 0) == 0, changed
    assert changed.get("h2", 0) >= 1, changed
    # the source h2 would get carries the Signed-By of this Debian's own source (apt refuses two values)
    own = [ln.split(":", 1)[1].strip() for ln in pathlib.Path("/etc/apt/sources.list.d/debian.sources").read_text()
           .splitlines() if ln.startswith("Signed-By:")]
    plan_h2 = result.task_result("Plan the drivers this host needs", "h2")["ansible_facts"]["__drivers_plan"]
    assert plan_h2["repos"][0].get("signed_by") == (own[0] if own else None), plan_h2["repos"]
    assert not list(pathlib.Path("/etc/apt/sources.list.d").glob("dsfleet-*"))      # check mode wrote nothing


def test_the_plan_leaves_gpu_hosts_without_a_driver_out_with_the_reason(fleet, tmp_path):
    rig, inventory = fleet
    run_id = "drv-%s" % uuid.uuid4().hex[:6]
    result = run_playbook("playbooks/plan.yml", {"run_id": run_id, "require_all_hosts": False}, inventory=inventory)
    assert result.rc == 0, result.stdout[-4000:]
    plan = json.loads((RUNS / run_id / "plan.json").read_text())
    assert [h["name"] for h in plan["hosts"]] == ["h1"] and plan["accelerator"] == "nvidia"
    reasons = {e["name"]: e["reason"] for e in plan["excluded"]}
    assert reasons["h2"] == ("2 NVIDIA GPUs present (lspci: GA102 [GeForce RTX 3090] x2), no driver: nvidia-smi not "
                             "found (setup.yml with drivers_install: true installs it)"), reasons
    assert reasons["h3"].startswith("4 Intel GPUs present (lspci: "), reasons
    assert reasons["h4"].startswith("1 AMD GPU present (lspci: "), reasons
    assert "left out: h2 — 2 NVIDIA GPUs present" in result.stdout
    strict = run_playbook("playbooks/plan.yml", {"run_id": run_id + "s"}, inventory=inventory)
    assert strict.rc != 0
    assert any("host h2: 2 NVIDIA GPUs present" in f and "drivers_install: true" in f and "-e exclude=h2" in f
               for f in strict.failures), strict.failures


@pytest.mark.skipif("ID=debian" not in pathlib.Path("/etc/os-release").read_text().split(),
                    reason="Debian's archive is checked on a Debian machine (CI's is)")
def test_debians_own_archive_installs_the_nvidia_set_the_plan_names(tmp_path):
    """apt-get -s (simulate) of h2's planned packages with Debian's non-free archive, in a private apt state (this
    machine's sources and lists stay as they are). The running kernel's headers are left out: this machine runs
    a kernel Debian does not ship."""
    release = next(line.split("=", 1)[1].strip('"') for line in pathlib.Path("/etc/os-release").read_text().splitlines()
                   if line.startswith("VERSION_CODENAME="))
    sources = tmp_path / "sources.list"
    sources.write_text("deb http://deb.debian.org/debian %s main contrib non-free non-free-firmware\n" % release)
    for sub in ("lists/partial", "cache/archives/partial"):
        (tmp_path / sub).mkdir(parents=True)
    opts = ["-o", "Dir::Etc::SourceList=%s" % sources, "-o", "Dir::Etc::SourceParts=%s" % (tmp_path / "none"),
            "-o", "Dir::State::Lists=%s" % (tmp_path / "lists"), "-o", "Dir::Cache=%s" % (tmp_path / "cache"),
            "-o", "Debug::NoLocking=1"]
    update = subprocess.run(["apt-get", *opts, "update"], capture_output=True, text=True, timeout=600)
    assert update.returncode == 0, update.stdout[-2000:] + update.stderr[-2000:]
    sim = subprocess.run(["apt-get", *opts, "-s", "install", "nvidia-driver", "firmware-misc-nonfree", "nvidia-smi",
                          "linux-headers-amd64"], capture_output=True, text=True, timeout=600)
    assert sim.returncode == 0, sim.stdout[-3000:] + sim.stderr[-2000:]
    assert "Inst nvidia-driver " in sim.stdout and "Inst nvidia-smi " in sim.stdout


def test_system_preparation_names_every_host_trusts_the_cluster_and_checks_the_clock(fleet):
    rig, inventory = fleet
    result = run_playbook("setup.yml", {}, inventory=inventory, cmdline="--tags facts,system")
    assert result.rc == 0, result.stdout[-5000:]
    block = ["%s %s" % (rig.address(h), h) for h in sorted(rig.names)]
    for host in rig.names:
        lines = pathlib.Path(rig.host_dir(host, "etc-hosts")).read_text().splitlines()
        start = lines.index("# BEGIN dsfleet hosts")
        assert lines[start + 1:start + 1 + len(block)] == block and lines[start + 1 + len(block)] == \
            "# END dsfleet hosts", lines
        clock = result.task_result("Compare it with the controller's", host)["msg"]
        assert clock.startswith("%s: clock " % host) and "WARNING" not in clock, clock
    said = result.task_result("Say which firewall was found", "h2")["msg"]
    assert said == "h2: ufw is active: %s trusted" % ", ".join(rig.address(h) for h in ("h1", "h3", "h4")), said
    assert result.task_result("Say which firewall was found", "h1")["msg"] == "h1: no active firewall (ufw, firewalld)"
    # the packages are there (the rig shares the controller's /usr): nothing installed; a second run changes
    # nothing where no firewall is (the fake ufw says "Rule added" every time)
    assert not any(r["res"].get("changed") for r in result.ok if r["task"] == "Install the missing ones")
    again = run_playbook("setup.yml", {}, inventory=inventory, cmdline="--tags facts,system")
    assert again.rc == 0
    assert {h: n for h, n in (again.stats.get("changed") or {}).items() if n} == {"h2": 1}, again.stats
    assert pathlib.Path(rig.host_dir("h3", "etc-hosts")).read_text().count("# BEGIN dsfleet hosts") == 1
