"""The drivers plan (lib/dsfleet_core/drivers.py) on the role's real OS data (roles/drivers/vars/*.yml): per
vendor and OS family the keys, repositories, packages and module streams an install would add, and what a host
whose tool already answers keeps."""
import pathlib

import pytest
import yaml

from dsfleet_core import PlanError
from dsfleet_core.drivers import driver_plan

VARS = pathlib.Path(__file__).resolve().parents[2] / "roles" / "drivers" / "vars"
DEFAULTS = yaml.safe_load((VARS.parent / "defaults" / "main.yml").read_text())
KNOBS = {k: v for k, v in DEFAULTS.items() if k != "drivers_reboot_timeout"}

JAMMY = {"os_family": "Debian", "distribution": "Ubuntu", "distribution_major_version": "22",
         "distribution_version": "22.04", "distribution_release": "jammy", "kernel": "5.15.0-105-generic",
         "architecture": "x86_64"}
NOBLE = dict(JAMMY, distribution_major_version="24", distribution_version="24.04", distribution_release="noble",
             kernel="6.8.0-31-generic")
BOOKWORM = {"os_family": "Debian", "distribution": "Debian", "distribution_major_version": "12",
            "distribution_version": "12.5", "distribution_release": "bookworm", "kernel": "6.1.0-18-amd64",
            "architecture": "x86_64"}
ROCKY9 = {"os_family": "RedHat", "distribution": "Rocky", "distribution_major_version": "9",
          "distribution_version": "9.4", "distribution_release": "Blue Onyx", "kernel": "5.14.0-427.13.1.el9_4.x86_64",
          "architecture": "x86_64"}
RHEL9 = dict(ROCKY9, distribution="RedHat", distribution_release="Plow")


def os_vars(facts):
    return yaml.safe_load((VARS / ("%s.yml" % facts["os_family"])).read_text())["drivers_os"]


def undriven(vendor, count=2, reason="nvidia-smi not found"):
    return {"accelerator": "cpu", "gpus": [], "driver_version": None,
            "undriven": [{"vendor": vendor, "count": count, "names": ["x"] * count, "reason": reason}]}


def working(vendor, version, count=2):
    return {"accelerator": vendor, "gpus": [{"index": i} for i in range(count)], "driver_version": version,
            "undriven": []}


def plan(facts, gpu, **knobs):
    return driver_plan(facts, gpu, dict(KNOBS, **knobs), os_vars(facts))


def test_ubuntu_takes_the_server_branch_with_the_running_kernels_headers():
    p = plan(JAMMY, undriven("nvidia"))
    assert p["packages"] == ["linux-headers-5.15.0-105-generic", "linux-headers-generic", "nvidia-driver-570-server",
                             "nvidia-utils-570-server"]
    assert (p["repos"], p["keys"], p["modules"], p["install"]) == ([], [], [], False)   # report only by default
    assert p["text"][0].startswith("2 NVIDIA GPUs: missing (nvidia-smi not found); drivers_install: true would "
                                   "install: nvidia-driver-570-server, nvidia-utils-570-server; NVSwitch systems")
    assert plan(JAMMY, undriven("nvidia"), drivers_install=True)["install"] is True
    assert plan(JAMMY, undriven("nvidia"), drivers_nvidia_branch="580")["packages"][2] == "nvidia-driver-580-server"


def test_debian_takes_non_free_or_nvidias_cuda_repository():
    p = plan(BOOKWORM, undriven("nvidia"), debian_signed_by="/usr/share/keyrings/debian-archive-keyring.gpg")
    assert p["repos"] == [{"name": "debian-non-free", "uris": "http://deb.debian.org/debian",
                           "suites": "bookworm bookworm-updates", "components": ["contrib", "non-free",
                                                                                 "non-free-firmware"],
                           "signed_by": "/usr/share/keyrings/debian-archive-keyring.gpg"}]
    assert p["packages"] == ["linux-headers-6.1.0-18-amd64", "linux-headers-amd64", "nvidia-driver",
                             "firmware-misc-nonfree", "nvidia-smi"]
    # a host whose Debian source names no keyring: no Signed-By either (apt refuses two values for one source)
    assert "signed_by" not in plan(BOOKWORM, undriven("nvidia"))["repos"][0]
    cuda = plan(BOOKWORM, undriven("nvidia"), drivers_nvidia_source="cuda")
    assert cuda["keys"] == [{"url": "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/"
                                    "3bf863cc.pub", "dest": "/etc/apt/keyrings/dsfleet-cuda.asc"}]
    assert cuda["repos"][0]["uris"] == "https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/"
    assert cuda["packages"] == ["linux-headers-6.1.0-18-amd64", "linux-headers-amd64", "cuda-drivers-570"]
    with pytest.raises(PlanError, match="drivers_nvidia_source=nouveau: Debian knows cuda, distro"):
        plan(BOOKWORM, undriven("nvidia"), drivers_nvidia_source="nouveau")


def test_rhel_family_takes_the_cuda_repository_and_the_dkms_module_stream():
    p = plan(ROCKY9, undriven("nvidia"))
    assert p["repos"] == [{"name": "cuda-rhel9",
                           "baseurl": "https://developer.download.nvidia.com/compute/cuda/repos/rhel9/x86_64/",
                           "gpgkey": "https://developer.download.nvidia.com/compute/cuda/repos/rhel9/x86_64/"
                                     "D42D0685.pub"}]
    assert p["modules"] == ["nvidia-driver:570-dkms"]
    assert p["packages"] == ["kernel-devel-5.14.0-427.13.1.el9_4.x86_64", "kernel-headers"]
    assert p["pre"] == ["epel-release"]            # dkms comes from EPEL: installed before the rest
    # RHEL itself has no epel-release package: EPEL's release rpm by URL
    assert plan(RHEL9, undriven("nvidia"))["pre"] == [
        "https://dl.fedoraproject.org/pub/epel/epel-release-latest-9.noarch.rpm"]


def test_amd_takes_rocms_repositories_for_the_release_and_the_render_group():
    p = plan(NOBLE, undriven("amd", 8, "amd-smi and rocm-smi not found"))
    assert [(r["uris"], r["suites"]) for r in p["repos"]] == [
        ("https://repo.radeon.com/amdgpu/6.2.4/ubuntu", "noble"), ("https://repo.radeon.com/rocm/apt/6.2.4", "noble")]
    assert p["keys"] == [{"url": "https://repo.radeon.com/rocm/rocm.gpg.key", "dest": "/etc/apt/keyrings/dsfleet-rocm.asc"}]
    assert p["packages"] == ["linux-headers-6.8.0-31-generic", "linux-headers-generic", "amdgpu-dkms", "rocm-smi-lib",
                             "amd-smi-lib", "linux-modules-extra-6.8.0-31-generic"]
    assert p["groups"] == ["render", "video"]
    assert [r["suites"] for r in plan(BOOKWORM, undriven("amd"))["repos"]] == ["jammy", "jammy"]
    rhel = plan(ROCKY9, undriven("amd"), drivers_rocm_version="6.3.1")
    assert [r["baseurl"] for r in rhel["repos"]] == ["https://repo.radeon.com/amdgpu/6.3.1/rhel/9.4/main/x86_64/",
                                                     "https://repo.radeon.com/rocm/rhel9/6.3.1/main"]
    assert rhel["pre"] == ["epel-release"]         # amdgpu-dkms needs dkms, from EPEL


def test_intel_takes_its_gpu_repository_where_it_has_one_and_debians_runtime_elsewhere():
    p = plan(JAMMY, undriven("intel", 4, "xpu-smi, sycl-ls and clinfo not found"))
    assert [(r["uris"], r["suites"], r["components"]) for r in p["repos"]] == [
        ("https://repositories.intel.com/gpu/ubuntu", "jammy/lts/2350", ["unified"])]
    # Max and Flex need Intel's out-of-tree i915 (DKMS: the kernel headers too) and its firmware
    assert p["packages"] == ["linux-headers-5.15.0-105-generic", "linux-headers-generic", "intel-i915-dkms",
                             "intel-fw-gpu", "linux-modules-extra-5.15.0-105-generic", "intel-opencl-icd",
                             "intel-level-zero-gpu", "level-zero", "xpu-smi"]
    # the LTS channel is jammy's: another release has no recipe rather than a repository that is not there
    assert plan(NOBLE, undriven("intel"))["vendors"][0]["state"] == "unsupported"
    # Debian: its own runtimes, where it has the Level Zero GPU backend (trixie on); bookworm has none
    trixie = dict(BOOKWORM, distribution_major_version="13", distribution_version="13.0",
                  distribution_release="trixie", kernel="6.12.9-amd64")
    deb = plan(trixie, undriven("intel", 1))
    assert (deb["repos"], deb["packages"]) == ([], ["intel-opencl-icd", "libze1", "libze-intel-gpu1", "clinfo"])
    assert "no xpu-smi on Debian" in deb["text"][0]
    old = plan(BOOKWORM, undriven("intel", 1), drivers_install=True)
    assert (old["install"], old["vendors"][0]["state"]) == (False, "unsupported")
    assert plan(ROCKY9, undriven("intel"))["repos"][0]["baseurl"] == (
        "https://repositories.intel.com/gpu/rhel/9.4/lts/2350/unified/")


def test_a_host_whose_tool_answers_is_left_untouched_unless_replacing_is_asked_for():
    ok = plan(JAMMY, working("nvidia", "570.86.15"), drivers_install=True)
    assert (ok["install"], ok["packages"], ok["vendors"][0]["state"]) == (False, [], "ok")
    assert ok["text"] == ["2 NVIDIA GPUs: ok (driver 570.86.15 answers)"]
    # another branch (older or newer) answering: kept, never downgraded by default
    for have in ("535.161.07", "580.65.06"):
        kept = plan(JAMMY, working("nvidia", have), drivers_install=True)
        assert (kept["install"], kept["vendors"][0]["state"]) == (False, "ok")
        assert "kept (not branch 570: drivers_nvidia_replace: true replaces it)" in kept["text"][0]
    other = plan(JAMMY, working("nvidia", "535.161.07"), drivers_install=True, drivers_nvidia_replace=True)
    assert other["install"] and other["vendors"][0]["state"] == "other_branch"
    assert other["packages"][2] == "nvidia-driver-570-server" and other["reset_modules"] == []
    rhel = plan(ROCKY9, working("nvidia", "535.161.07"), drivers_install=True, drivers_nvidia_replace=True)
    assert rhel["reset_modules"] == ["nvidia-driver"]            # dnf switches a stream only after a reset
    # Debian's own branch is whatever Debian ships: no branch to compare with
    assert plan(BOOKWORM, working("nvidia", "535.183.01"), drivers_install=True)["install"] is False
    assert plan(JAMMY, working("amd", "6.7.0"), drivers_install=True)["install"] is False


def test_an_os_without_a_recipe_is_reported_and_nothing_is_planned():
    sles = dict(ROCKY9, os_family="Suse", distribution="SLES", distribution_version="15.5")
    p = driver_plan(sles, undriven("nvidia"), dict(KNOBS, drivers_install=True), {})
    assert (p["install"], p["packages"], p["vendors"][0]["state"]) == (False, [], "unsupported")
    assert "dsfleet has no NVIDIA driver recipe for SLES 15.5 on x86_64 (it has: none): install it by hand" in p["text"][0]
    arm = plan(dict(JAMMY, architecture="aarch64"), undriven("nvidia"))
    assert arm["vendors"][0]["state"] == "unsupported"
    assert plan(JAMMY, {"accelerator": "cpu", "gpus": [], "undriven": []})["text"] == [
        "no GPU on the PCI bus: nothing to install"]
