#!/usr/bin/python
# -*- coding: utf-8 -*-
# SPDX-License-Identifier: Apache-2.0
# dsfleet: gather accelerator facts (NVIDIA, AMD, Intel GPUs, else CPU).
#
# Shape follows ansible's service_facts: one module, check mode supported,
# never changes anything, returns ansible_facts and warns (module.warn) about
# partial failures. Each tool's output is parsed by a pure function at module
# level so tests can import this file and feed it recorded real outputs.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: gpu_facts
short_description: Return the accelerators (GPUs) and CPU of a host as facts
description:
  - Detects the GPUs of a host with the vendor tools, newest first, and returns them
    as the C(dsfleet_gpu) fact together with the CPU model, logical CPU count, memory
    and bfloat16 support.
  - "Detection order: C(nvidia-smi) (NVIDIA); C(amd-smi), then C(rocm-smi) (AMD);
    C(xpu-smi), then C(sycl-ls), then C(clinfo) (Intel); otherwise the host is a CPU host."
  - A tool that is installed but fails (driver not loaded, driver/library version mismatch,
    no devices) gives a warning that names the problem and the fix, and detection goes on
    with the next tool. A tool that answers with nothing this module can read gives a warning
    that names the tool and the first line it printed. The module never changes the host.
  - "Before the vendor tools, it lists every display, 3D and processing-accelerator PCI device
    (classes 0300, 0302, 0380, 1200) with C(lspci -D -nn -k), or from C(/sys/bus/pci/devices) when
    C(lspci) is missing, whether or not a driver is loaded (RV(ansible_facts.dsfleet_gpu.pci)). A
    vendor whose GPUs are on the PCI bus but whose tools list none is reported in
    RV(ansible_facts.dsfleet_gpu.undriven) with the reason, and with a warning: such a host is a
    GPU host without a driver, not a CPU host."
  - "What counts as a GPU there: every NVIDIA device of those classes; every AMD device except the
    integrated graphics of AMD APUs (a table of their PCI IDs; the MI300A counts); Intel devices only
    when their PCI ID is in the table of discrete parts (Data Center GPU Max and Flex, Arc, XeHP SDV,
    DG1), so the integrated graphics of a desktop or server CPU never makes a host a GPU host.
    Devices bound to vfio-pci or pci-stub (kept for virtual machines) do not count."
options:
  gpus:
    description:
      - Comma-separated device indices that count on this host, like C(CUDA_VISIBLE_DEVICES),
        for example C("0,2"). Empty means all devices.
      - An index the host does not have is an error that lists the host's real indices.
    type: str
    default: ""
  timeout:
    description:
      - Seconds allowed for each call of a vendor tool.
    type: int
    default: 20
  pci_sysfs_root:
    description:
      - The sysfs directory of the PCI devices. The inventory reads it when C(lspci) is missing, and
        reads the C(driver) link of a device there when C(lspci) does not name its kernel driver.
      - Tests point it at a recorded tree; leave the default on real hosts.
    type: path
    default: /sys/bus/pci/devices
  gather_subset:
    description:
      - Also return Ansible's own facts of these subsets (the collectors and the subset syntax of
        M(ansible.builtin.setup), for example C(["!all", "!min", "network", "env"])), from the same
        call. Host and accelerator facts then cost one connection round per host instead of two.
      - Empty (the default) returns the accelerator facts only.
    type: list
    elements: str
    default: []
  gather_timeout:
    description:
      - Seconds each of Ansible's fact collectors may take (M(ansible.builtin.setup)'s C(gather_timeout)).
    type: int
    default: 10
requirements:
  - Linux (reads C(/proc/cpuinfo) and C(/proc/meminfo)).
  - The vendor tool of the host's GPUs on C(PATH) or in C(/opt/rocm/bin), if it has GPUs.
  - C(lspci) (pciutils) for device names in the PCI inventory; without it the inventory comes from
    sysfs, with names only for the devices in the module's AMD and Intel tables.
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
  facts:
    support: full
notes:
  - MIG instances of an NVIDIA GPU are not used as separate ranks; a GPU with MIG enabled has
    C(mig=true) in its RV(ansible_facts.dsfleet_gpu.gpus) entry and gets a warning.
  - C(memory_mib) is 0 when the tool does not report the device memory (C(sycl-ls),
    C(clinfo), AMD APUs); a warning says so.
author:
  - dsfleet maintainers
"""

EXAMPLES = r"""
- name: Gather accelerator facts
  gpu_facts:

- name: Count only GPUs 0 and 2 on this host
  gpu_facts:
    gpus: "0,2"

- name: Host, network and accelerator facts in one call (what dsfleet's facts play runs)
  gpu_facts:
    gather_subset: ["!all", "!min", "env", "network", "distribution", "platform"]

- name: Show how many ranks this host can run
  ansible.builtin.debug:
    msg: "{{ ansible_facts['dsfleet_gpu']['gpus'] | length }} {{ ansible_facts['dsfleet_gpu']['accelerator'] }} GPUs"

- name: Require bf16 on every GPU
  ansible.builtin.assert:
    that: ansible_facts['dsfleet_gpu']['gpus'] | rejectattr('bf16') | list | length == 0
    fail_msg: "A GPU on {{ inventory_hostname }} has no bf16; set precision: fp16 for this host."
"""

RETURN = r"""
ansible_facts:
  description: Facts about the accelerators of the host.
  returned: always
  type: complex
  contains:
    dsfleet_gpu:
      description: Accelerators, CPU and memory of the host.
      returned: always
      type: complex
      contains:
        accelerator:
          description: Vendor of the detected GPUs, or V(cpu) when the host has none usable.
          returned: always
          type: str
          sample: nvidia
        tool:
          description: The tool the GPUs were found with (V(nvidia-smi), V(amd-smi), V(rocm-smi),
            V(xpu-smi), V(sycl-ls), V(clinfo)); null on a CPU host.
          returned: always
          type: str
          sample: nvidia-smi
        driver_version:
          description: GPU driver version as the tool reports it; null when unknown.
          returned: always
          type: str
          sample: "535.216.01"
        runtime_version:
          description: CUDA version (nvidia-smi header) or ROCm version (/opt/rocm/.info/version); null when unknown.
          returned: always
          type: str
          sample: "12.2"
        gpus:
          description: The GPUs that count, in the order of the O(gpus) option (device order when empty).
          returned: always
          type: list
          elements: dict
          contains:
            index:
              description: Device index as the vendor tool numbers it.
              type: int
            vendor:
              description: V(nvidia), V(amd) or V(intel).
              type: str
            name:
              description: Product name.
              type: str
              sample: NVIDIA A100-SXM4-80GB
            memory_mib:
              description: Device memory in MiB; 0 when the tool does not report it.
              type: int
              sample: 81920
            compute_capability:
              description: CUDA compute capability (NVIDIA only), else null.
              type: str
              sample: "8.0"
            arch:
              description: GFX target (AMD only), else null.
              type: str
              sample: gfx90a
            bf16:
              description: Whether the device computes in bfloat16 natively.
              type: bool
            uuid:
              description: Device UUID when the tool reports one, else null.
              type: str
            mig:
              description: Whether MIG mode is enabled (NVIDIA only).
              type: bool
        cpu:
          description: CPU of the host.
          returned: always
          type: dict
          contains:
            model:
              description: CPU model name.
              type: str
            cores:
              description: Logical CPUs this process may run on (sched_getaffinity).
              type: int
            memory_mib:
              description: MemTotal from /proc/meminfo in MiB.
              type: int
            bf16:
              description: avx512_bf16 or amx_bf16 (x86), or the bf16 feature (aarch64).
              type: bool
        pci:
          description:
            - Every display, 3D and processing-accelerator PCI device (classes 0300, 0302, 0380, 1200) in
              bus order, from C(lspci -D -nn -k) or, without C(lspci), from sysfs; empty when neither is
              available. Listed whether or not a driver is loaded, and whether or not it counts as a GPU.
          returned: always
          type: list
          elements: dict
          contains:
            slot:
              description: PCI address with domain.
              type: str
              sample: "0000:01:00.0"
            vendor:
              description: V(nvidia) (10de), V(amd) (1002), V(intel) (8086), else V(other).
              type: str
            vendor_id:
              description: PCI vendor ID, four lower-case hex digits.
              type: str
              sample: "10de"
            device_id:
              description: PCI device ID, four lower-case hex digits.
              type: str
              sample: "1d01"
            class:
              description: PCI class and subclass, four hex digits (V(0300) VGA, V(0302) 3D, V(0380) display, V(1200) accelerator).
              type: str
              sample: "0300"
            name:
              description: The device name C(lspci) prints (without the vendor), else the name from the module's
                AMD and Intel tables, else C(PCI device <vendor_id>:<device_id>).
              type: str
              sample: "GP108 [GeForce GT 1030]"
            driver:
              description: The kernel driver bound to the device (C(lspci -k) or the sysfs C(driver) link); null
                when none is bound.
              type: str
              sample: nvidia
        undriven:
          description:
            - One entry per vendor whose GPUs are on the PCI bus while its tools list no GPU; empty when the
              tools found the GPUs (or the host has none). See the description for what counts as a GPU.
          returned: always
          type: list
          elements: dict
          contains:
            vendor:
              description: V(nvidia), V(amd) or V(intel).
              type: str
            count:
              description: How many of that vendor's GPUs are on the PCI bus.
              type: int
              sample: 2
            names:
              description: Their names as in RV(ansible_facts.dsfleet_gpu.pci), one per device.
              type: list
              elements: str
            reason:
              description: Why no tool answered, tool by tool.
              type: str
              sample: nvidia-smi not found
        warnings:
          description: The warnings this module emitted, also shown by Ansible.
          returned: always
          type: list
          elements: str
"""

import json
import os
import re

from ansible.module_utils.basic import AnsibleModule

# --------------------------------------------------------------------- invocations
# The exact argument lists the module runs. tests/fixtures/gpu/fakes.py serves
# recorded outputs for these.
NVIDIA_FIELDS = "index,name,memory.total,compute_cap,driver_version,uuid,mig.mode.current"
NVIDIA_FIELDS_NO_CC = "index,name,memory.total,driver_version,uuid,mig.mode.current"
NVIDIA_QUERY = ["--query-gpu=" + NVIDIA_FIELDS, "--format=csv,noheader,nounits"]
NVIDIA_QUERY_NO_CC = ["--query-gpu=" + NVIDIA_FIELDS_NO_CC, "--format=csv,noheader,nounits"]
NVIDIA_HEADER = []  # plain `nvidia-smi`: its header carries the CUDA version
AMD_SMI_STATIC = ["static", "--asic", "--vram", "--driver", "--json"]
ROCM_SMI_QUERY = ["--showproductname", "--showmeminfo", "vram", "--json"]
XPU_SMI_LIST = ["discovery", "-j"]
SYCL_LS = []
CLINFO_LIST = ["-l"]
LSPCI_LIST = ["-D", "-nn", "-k"]  # domain, numeric IDs with names, kernel driver


def xpu_smi_device_args(index):
    """Arguments of the per-device xpu-smi call (memory, driver, UUID)."""
    return ["discovery", "-d", str(index), "-j"]


ROCM_VERSION_FILE = "/opt/rocm/.info/version"
PCI_SYSFS_ROOT = "/sys/bus/pci/devices"
EXTRA_TOOL_DIRS = ["/opt/rocm/bin", "/usr/local/cuda/bin", "/opt/intel/oneapi/compiler/latest/bin"]

# ------------------------------------------------------------------ small helpers


def _to_int(text):
    """int from '81920', '81920 MiB', '[N/A]' (-> None)."""
    if text is None:
        return None
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return int(text)
    match = re.search(r"-?\d+", str(text))
    return int(match.group(0)) if match else None


def _na(value):
    """None for the 'not available' spellings the tools use."""
    if value is None:
        return None
    value = str(value).strip()
    if value == "" or value.strip("[]").upper() in ("N/A", "NA", "NONE", "UNKNOWN", "NOT SUPPORTED"):
        return None
    return value


def _json_from(text):
    """Decode the JSON document in text; tools print warnings before it.

    Only an object, or a list of objects, counts: a warning line such as rocm-smi's
    'GPU[0]\t\t: Not supported on the given system' holds '[0]', which is valid JSON but not
    the answer. An empty list counts only where it starts a line.
    """
    text = text or ""
    decoder = json.JSONDecoder()
    for pos, char in enumerate(text):
        if char not in "[{":
            continue
        try:
            value = decoder.raw_decode(text, pos)[0]
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
        if isinstance(value, list) and all(isinstance(item, dict) for item in value):
            if value or not text[text.rfind("\n", 0, pos) + 1:pos].strip():
                return value
    raise ValueError("no JSON document in the tool output")


def _first_line(text):
    """The first non-blank line of a tool's output (for warnings), or 'no output'."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return "no output"


def _hex_id(value):
    """A PCI ID as four lower-case hex digits: '0x738c' -> '738c', '0xbda' -> '0bda', '74A1' -> '74a1'.

    None for anything else (SKUs such as 'D34314', names, 'N/A').
    """
    text = str(value).strip() if value is not None else ""
    match = re.match(r"^0[xX]([0-9a-fA-F]{1,4})$", text) or re.match(r"^([0-9a-fA-F]{4})$", text)
    return "%04x" % int(match.group(1), 16) if match else None


def _gpu(index, vendor, name, memory_mib=0, compute_capability=None, arch=None,
         bf16=False, uuid=None, mig=False):
    return {
        "index": int(index),
        "vendor": vendor,
        "name": name,
        "memory_mib": int(memory_mib or 0),
        "compute_capability": compute_capability,
        "arch": arch,
        "bf16": bool(bf16),
        "uuid": uuid,
        "mig": bool(mig),
    }


# ----------------------------------------------------------------------- NVIDIA

# Compute capability by product name, for drivers older than 510 that cannot
# query compute_cap. First match wins, so longer names come first.
NVIDIA_CC_BY_NAME = [
    (r"\bGB\d{3}\b|\bB[12]00\b", "10.0"),
    (r"\bRTX 50[5-9]0|RTX PRO \d000 Blackwell", "12.0"),
    (r"\bG?H[12]00\b|\bH800\b|\bH20\b", "9.0"),
    (r"\bL40S?\b|\bL4\b|\bL20\b|RTX 40[5-9]0|Ada Generation|RTX \d000 Ada", "8.9"),
    (r"\bA100\b|\bA800\b|\bA30\b", "8.0"),
    (r"\bA10G?\b|\bA40\b|\bA16\b|\bA2\b|RTX 30[5-9]0|RTX A\d{4}", "8.6"),
    (r"\bT4\b|RTX 20[5-8]0|Quadro RTX|TITAN RTX|GTX 16\d0", "7.5"),
    (r"\bV100\b|TITAN V\b", "7.0"),
    (r"\bP100\b", "6.0"),
    (r"\bP40\b|\bP4\b|GTX 10\d0|TITAN Xp?\b", "6.1"),
    (r"\bK80\b", "3.7"),
]


def nvidia_cc_from_name(name):
    """Compute capability for a known product name, else None."""
    for pattern, capability in NVIDIA_CC_BY_NAME:
        if re.search(pattern, name or ""):
            return capability
    return None


def nvidia_bf16(compute_capability):
    """bf16 needs Ampere (compute capability 8.0) or newer."""
    if not compute_capability:
        return False
    try:
        return int(str(compute_capability).split(".")[0]) >= 8
    except ValueError:
        return False


def _nvidia_rows(text):
    """Rows of the csv query (with or without compute_cap) as lists of cells."""
    rows = []
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) not in (6, 7) or not cells[0].isdigit():
            raise ValueError("unexpected nvidia-smi line: %r" % line)
        if len(cells) == 6:  # old driver: no compute_cap column
            cells.insert(3, "")
        rows.append(cells)
    return rows


def parse_nvidia_smi_csv(text):
    """GPUs from `nvidia-smi --query-gpu=<NVIDIA_FIELDS> --format=csv,noheader,nounits`.

    Also accepts the six-column output of NVIDIA_FIELDS_NO_CC; then the
    compute capability comes from NVIDIA_CC_BY_NAME (None if unknown).
    """
    gpus = []
    for index, name, memory, capability, _driver, uuid, mig in _nvidia_rows(text):
        capability = _na(capability) or nvidia_cc_from_name(name)
        gpus.append(_gpu(index, "nvidia", name, _to_int(_na(memory)) or 0,
                         compute_capability=capability, bf16=nvidia_bf16(capability),
                         uuid=_na(uuid), mig=(_na(mig) or "").lower() == "enabled"))
    return gpus


def nvidia_driver_version(text):
    """Driver version column of the csv query (same for every GPU)."""
    rows = _nvidia_rows(text)
    return _na(rows[0][4]) if rows else None


def parse_nvidia_smi_header(text):
    """CUDA version from the header of plain `nvidia-smi` ('CUDA Version: 12.2')."""
    match = re.search(r"CUDA(?: UMD)? Version:\s*([0-9]+(?:\.[0-9]+)*)", text or "")
    return match.group(1) if match else None


def nvidia_failure(text, rc):
    """(kind, warning) for a failed nvidia-smi call. kind: 'no_cc' means retry without compute_cap."""
    text = (text or "").strip()
    first = text.splitlines()[0] if text else "no output"
    if "compute_cap" in text and "not a valid field" in text:
        return "no_cc", None
    if "couldn't communicate with the NVIDIA driver" in text:
        return "driver", ("nvidia-smi is installed but cannot talk to the NVIDIA driver (%s). "
                          "The kernel module is not loaded: install the driver that matches the "
                          "running kernel (or rebuild it with DKMS) and reboot; `lsmod | grep nvidia` "
                          "must list it." % first)
    if "Driver/library version mismatch" in text:
        return "mismatch", ("nvidia-smi: %s. The loaded NVIDIA kernel module and the user-space "
                            "library have different versions, usually after a driver upgrade "
                            "without a reboot: reboot the host (or unload and reload the nvidia "
                            "kernel modules)." % " ".join(text.split()))
    if "No devices were found" in text or "No supported GPUs were found" in text:
        return "none", ("nvidia-smi is installed but finds no NVIDIA GPU (%s). Check that the GPU "
                        "is seated and powered (`lspci | grep -i nvidia`) and that the driver "
                        "supports it; on a host without NVIDIA GPUs remove the driver." % first)
    return "other", "nvidia-smi failed (exit %s): %s" % (rc, first)


# -------------------------------------------------------------------------- AMD

AMD_ARCH_BY_NAME = [
    (r"MI35\dX?", "gfx950"),
    (r"MI3[02]\d[AX]?", "gfx942"),
    (r"MI2[15]0X?|MI200", "gfx90a"),
    (r"MI100", "gfx908"),
    (r"MI50|MI60|Radeon VII|Vega 20", "gfx906"),
    (r"RX 9070", "gfx1201"),
    (r"RX 9060", "gfx1200"),
    (r"RX 7900|PRO W7900|PRO W7800", "gfx1100"),
    (r"RX 7800|RX 7700|PRO W7700", "gfx1101"),
    (r"RX 7600", "gfx1102"),
    (r"RX 6[89]\d0|Navi 21", "gfx1030"),
]

AMD_BF16_ARCH = re.compile(r"^gfx(908|90a|94[0-9a-f]|95[0-9a-f]|11[0-9a-f]{2}|12[0-9a-f]{2})$")

# AMD data-center, workstation and the common discrete Radeon GPUs by PCI device ID: (name, GFX target).
# Old rocm-smi versions print the device ID where the product name belongs ("Card series: 0x738c" on an
# MI100 with ROCm 4.0, ROCm/legacy-rocm-build#1351), and newer ones print it as "Card Model"/"Device ID".
# Names: pci.ids (github.com/pciutils/pciids, the bracketed marketing names, 2026-08). Chip families of the
# older IDs: the pciidlist of the Linux kernel's drivers/gpu/drm/amd/amdgpu/amdgpu_drv.c (Vega 10 6860-687f,
# Vega 20 66a0-66af, Arcturus 7388/738c/738e/7390, Aldebaran 7408/740c/740f/7410; newer chips are found by IP
# discovery and have no per-ID entry there). GFX targets per chip: the "Processors" table of LLVM's
# AMDGPUUsage (llvm.org/docs/AMDGPUUsage.html) and ROCm's GPU hardware specifications
# (rocm.docs.amd.com/en/latest/reference/gpu-arch-specs.html): Vega 10 gfx900, Vega 20 gfx906,
# Arcturus gfx908, Aldebaran gfx90a, Aqua Vanjaram MI300/MI325 gfx942, MI350/MI355 gfx950, Navi 10 gfx1010,
# Navi 14 gfx1012, Navi 21 gfx1030, Navi 23 gfx1032, Navi 24 gfx1034, Navi 31 gfx1100, Navi 32 gfx1101,
# Navi 33 gfx1102, Navi 44 gfx1200, Navi 48 gfx1201. 7410 is the Aldebaran VF (amd-gfx patch "It is
# Aldebaran VF device ID"; ROCm gpu-operator docs: "7410 # MI210 VF").
AMD_PCI = {
    "6860": ("AMD Instinct MI25", "gfx900"),
    "6861": ("AMD Radeon PRO WX 9100", "gfx900"),
    "6864": ("AMD Radeon Pro V340/Instinct MI25x2", "gfx900"),
    "6868": ("AMD Radeon PRO WX 8100/8200", "gfx900"),
    "66a0": ("AMD Radeon Pro/Radeon Instinct (Vega 20)", "gfx906"),
    "66a1": ("AMD Radeon Pro VII/Radeon Instinct MI50", "gfx906"),
    "66a2": ("AMD Vega 20", "gfx906"),
    "66a3": ("AMD Radeon Pro Vega II", "gfx906"),
    "66a7": ("AMD Radeon Pro Vega 20", "gfx906"),
    "66af": ("AMD Radeon VII", "gfx906"),
    "7388": ("AMD Arcturus GL-XL", "gfx908"),
    "738c": ("AMD Instinct MI100", "gfx908"),
    "738e": ("AMD Instinct MI100", "gfx908"),
    "7390": ("AMD Arcturus", "gfx908"),
    "7408": ("AMD Instinct MI250X", "gfx90a"),
    "740c": ("AMD Instinct MI250X/MI250", "gfx90a"),
    "740f": ("AMD Instinct MI210", "gfx90a"),
    "7410": ("AMD Instinct MI210 VF", "gfx90a"),
    "74a0": ("AMD Instinct MI300A", "gfx942"),
    "74a1": ("AMD Instinct MI300X", "gfx942"),
    "74a2": ("AMD Instinct MI308X", "gfx942"),
    "74a5": ("AMD Instinct MI325X", "gfx942"),
    "74a9": ("AMD Instinct MI300X HF", "gfx942"),
    "74b5": ("AMD Instinct MI300X VF", "gfx942"),
    "74b9": ("AMD Instinct MI325X VF", "gfx942"),
    "74bd": ("AMD Instinct MI300X HF", "gfx942"),
    "75a0": ("AMD Instinct MI350X", "gfx950"),
    "75a3": ("AMD Instinct MI355X", "gfx950"),
    "7310": ("AMD Radeon Pro W5700X", "gfx1010"),
    "7312": ("AMD Radeon Pro W5700", "gfx1010"),
    "7341": ("AMD Radeon Pro W5500", "gfx1012"),
    "73a1": ("AMD Radeon Pro V620", "gfx1030"),
    "73a2": ("AMD Radeon Pro W6900X", "gfx1030"),
    "73a3": ("AMD Radeon PRO W6800", "gfx1030"),
    "73ab": ("AMD Radeon Pro W6800X/W6800X Duo", "gfx1030"),
    "73ae": ("AMD Radeon Pro V620 MxGPU", "gfx1030"),
    "73af": ("AMD Radeon RX 6900 XT", "gfx1030"),
    "73bf": ("AMD Radeon RX 6800/6800 XT / 6900 XT", "gfx1030"),
    "73e3": ("AMD Radeon PRO W6600", "gfx1032"),
    "7422": ("AMD Radeon PRO W6400", "gfx1034"),
    "7448": ("AMD Radeon Pro W7900", "gfx1100"),
    "7449": ("AMD Radeon Pro W7800 48GB", "gfx1100"),
    "744a": ("AMD Radeon Pro W7900 Dual Slot", "gfx1100"),
    "744b": ("AMD Radeon Pro W7900D", "gfx1100"),
    "744c": ("AMD Radeon RX 7900 XT/7900 XTX/7900 GRE", "gfx1100"),
    "745e": ("AMD Radeon Pro W7800", "gfx1100"),
    "7460": ("AMD Radeon PRO V710", "gfx1101"),
    "7461": ("AMD Radeon PRO V710", "gfx1101"),
    "7470": ("AMD Radeon PRO W7700", "gfx1101"),
    "747e": ("AMD Radeon RX 7700 XT / 7800 XT", "gfx1101"),
    "7480": ("AMD Radeon RX 7600 / PRO W7600", "gfx1102"),
    "7489": ("AMD Radeon Pro W7500", "gfx1102"),
    "7550": ("AMD Radeon RX 9070/9070 XT/9070 GRE", "gfx1201"),
    "7551": ("AMD Radeon AI PRO R9700", "gfx1201"),
    "7590": ("AMD Radeon RX 9050 / 9060 XT", "gfx1200"),
}

# Card SKUs rocm-smi prints ("Card SKU", or in the place of the name) by their first four characters, for
# an answer with neither a product name nor a device ID: D343xx MI100 (D34314 with 0x738c in
# ROCm/legacy-rocm-build#1351, D34316 with "AMD Instinct MI100" in easybuilders/easybuild-framework#3978),
# D673xx MI210 (D67301, bacalhau-project/bacalhau's rocm-smi test), D652xx MI250X (D65201 with Card Model
# 0x7408 in ROCm/rocm_smi_lib#159), M300xxxx MI300X (M3000100 with 0x74a1, tests/fixtures/gpu/SOURCES.md).
AMD_SKU_PREFIX = {
    "D343": ("AMD Instinct MI100", "gfx908"),
    "D673": ("AMD Instinct MI210", "gfx90a"),
    "D652": ("AMD Instinct MI250X", "gfx90a"),
    "M300": ("AMD Instinct MI300X", "gfx942"),
}
AMD_SKU_LIKE = re.compile(r"^[A-Z]\d{5,7}[A-Z]{0,3}$")

# Integrated graphics of AMD APUs (pci.ids: Raven, Picasso, Renoir, Cezanne, Lucienne, Barcelo, Rembrandt,
# Mendocino, Raphael, Granite Ridge, Phoenix, Hawk Point, Strix, Strix Halo, Krackan, Cyan Skillfish, Stoney,
# Wani/Carrizo; AMD_IS_APU in amdgpu_drv.c for the older ones). They do not make a host a GPU host in the PCI
# inventory: a desktop Ryzen has one. The MI300A is an APU too but a data-center part (AMD_PCI), and counts.
AMD_APU_IDS = frozenset([
    "1114", "13c0", "13db", "13fb", "13fe", "1506", "150e", "1586", "15bf", "15c8", "15d8", "15dd", "15e7",
    "1636", "1638", "163f", "164c", "164d", "164e", "164f", "1681", "1900", "1901", "1902", "9870", "9874",
    "9875", "9876", "9877", "98e4",
])


def amd_arch_from_name(name):
    """GFX target for a known product name, else None."""
    for pattern, arch in AMD_ARCH_BY_NAME:
        if re.search(pattern, name or "", re.IGNORECASE):
            return arch
    return None


def amd_normalize_gfx(value):
    """A GFX target as the compilers spell it.

    rocm-smi of ROCm 6.0 printed major, minor and stepping as decimal numbers ("GFX Version": "gfx9010"
    for an MI250X, ROCm/rocm_smi_lib#159); the stepping is hex in the target name: gfx90a.
    """
    value = (_na(value) or "").strip().lower()
    match = re.match(r"^gfx([0-9a-f]+)$", value)
    if not match:
        return None
    legacy = re.match(r"^([89])(\d)(\d\d)$", match.group(1))
    if legacy:
        return "gfx%s%s%x" % (legacy.group(1), legacy.group(2), int(legacy.group(3)))
    return value


def amd_from_sku(sku):
    """(name, arch) for a known SKU prefix, else None."""
    sku = (_na(sku) or "").upper()
    return AMD_SKU_PREFIX.get(sku[:4]) if AMD_SKU_LIKE.match(sku) else None


def amd_bf16(arch):
    """bf16 on CDNA1+ (gfx908 MI100, gfx90a, gfx94x, gfx95x) and RDNA3+ (gfx11xx, gfx12xx).

    MI100 (CDNA1) has bf16 matrix instructions (V_MFMA_F32_*BF16*, AMD Instinct MI100 ISA guide).
    """
    return bool(arch and AMD_BF16_ARCH.match(arch))


def _mib_from_value_unit(value):
    """MiB from amd-smi sizes: {'value': 65520, 'unit': 'MB'}, '65520 MB' or 65520."""
    unit = "MB"
    if isinstance(value, dict):
        unit = str(value.get("unit") or "MB")
        value = value.get("value")
    elif isinstance(value, str):
        match = re.match(r"\s*([0-9.]+)\s*([A-Za-z]*)", value)
        if not match:
            return None
        value, unit = match.group(1), match.group(2) or "MB"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    factor = {"B": 1.0 / 1048576, "KB": 1.0 / 1024, "KIB": 1.0 / 1024, "MB": 1, "MIB": 1,
              "GB": 1024, "GIB": 1024}.get(unit.upper(), 1)
    return int(number * factor)


def parse_amd_smi_json(text):
    """GPUs from `amd-smi static --asic --vram --driver --json` (or the full `static --json`).

    Accepts both shapes amd-smi has printed: a list of per-GPU objects (ROCm 6.0-6.3)
    and {"gpu_data": [...]} (ROCm 6.4 and later).
    """
    data = _json_from(text)
    if isinstance(data, dict):
        data = data.get("gpu_data", [])
    gpus = []
    for position, entry in enumerate(data or []):
        if not isinstance(entry, dict):
            continue
        asic = entry.get("asic") or {}
        vram = entry.get("vram") or {}
        device = AMD_PCI.get(_hex_id(asic.get("device_id")))
        name = (_na(asic.get("market_name")) or _na((entry.get("board") or {}).get("product_name"))
                or (device and device[0]) or "AMD GPU")
        arch = (amd_normalize_gfx(asic.get("target_graphics_version")) or (device and device[1])
                or amd_arch_from_name(name))
        memory = None
        for key in ("size", "vram_size", "vram_size_mb"):
            if key in vram:
                memory = _mib_from_value_unit(vram[key])
                break
        index = entry.get("gpu", position)
        gpus.append(_gpu(index, "amd", name, memory or 0, arch=arch, bf16=amd_bf16(arch),
                         uuid=_na(entry.get("uuid"))))
    return gpus


def amd_smi_driver_version(text):
    """amdgpu driver version from amd-smi static; in-kernel drivers report 'Linuxversion<kernel>(...)'."""
    data = _json_from(text)
    if isinstance(data, dict):
        data = data.get("gpu_data", [])
    for entry in data or []:
        driver = (entry or {}).get("driver") or {}
        version = _na(driver.get("version") or driver.get("driver_version"))
        if version:
            kernel = re.match(r"Linuxversion(\S+?)\(", version)
            return "in-kernel amdgpu (Linux %s)" % kernel.group(1) if kernel else version
    return None


def amd_rocm_card(card):
    """(name, arch) of one card of rocm-smi's JSON, from every field rocm-smi has printed for it.

    Name: the first real name of "Market Name", "Card Series"/"Card series", "Device Name" (old versions
    print the PCI device ID or the SKU there), else the AMD_PCI name of the device ID ("Device ID", a hex
    "Card Series", "Card Model"), else the SKU table, else a non-hex "Card Model". The lower-case
    "Card model" of old versions is the subsystem ID (0xc34 on an MI100, 0x0c34 on an MI210) and is never
    read as a device ID. Arch: "GFX Version" (normalized), else the device-ID table, else the name, else
    the SKU table.
    """
    device = None
    for key in ("Device ID", "Card Series", "Card series", "Card Model"):
        candidate = _hex_id(card.get(key))
        if candidate in AMD_PCI:
            device = AMD_PCI[candidate]
            break
    sku = amd_from_sku(card.get("Card SKU")) or amd_from_sku(card.get("Card Series") or card.get("Card series"))
    name = None
    for key in ("Market Name", "Card Series", "Card series", "Device Name"):
        value = _na(card.get(key))
        if value and not _hex_id(value) and not AMD_SKU_LIKE.match(value):
            name = value
            break
    if not name:
        model = _na(card.get("Card Model")) or _na(card.get("Card model"))
        fallback = model if model and not _hex_id(model) and not AMD_SKU_LIKE.match(model) else None
        name = (device and device[0]) or (sku and sku[0]) or fallback or "AMD GPU"
    arch = None
    for key in ("GFX Version", "gfx_version", "GFX version", "Target Graphics Version"):
        arch = amd_normalize_gfx(card.get(key))
        if arch:
            break
    arch = arch or (device and device[1]) or amd_arch_from_name(name) or (sku and sku[1])
    return name, arch


def parse_rocm_smi_json(text):
    """GPUs from `rocm-smi --showproductname --showmeminfo vram --json`.

    Old rocm-smi versions print no 'GFX Version' and may print the device ID or the SKU instead of
    the product name; see amd_rocm_card.
    """
    data = _json_from(text)
    if not isinstance(data, dict):
        raise ValueError("rocm-smi printed a JSON list, not the card objects")
    gpus = []
    for key, card in sorted(data.items(), key=lambda item: _to_int(item[0]) or 0):
        match = re.match(r"^card(\d+)$", key)
        if not match or not isinstance(card, dict):
            continue
        name, arch = amd_rocm_card(card)
        memory_bytes = _to_int(_na(card.get("VRAM Total Memory (B)")))
        gpus.append(_gpu(match.group(1), "amd", name, (memory_bytes or 0) // 1048576, arch=arch,
                         bf16=amd_bf16(arch), uuid=_na(card.get("Unique ID"))))
    return gpus


def rocm_smi_driver_version(text):
    """'Driver version' of the 'system' entry, when rocm-smi prints one."""
    data = _json_from(text)
    return _na((data.get("system") or {}).get("Driver version")) if isinstance(data, dict) else None


def parse_rocm_version(text):
    """ROCm version from /opt/rocm/.info/version ('6.2.0-66' -> '6.2.0')."""
    match = re.match(r"\s*([0-9]+(?:\.[0-9]+)*)", text or "")
    return match.group(1) if match else None


# ------------------------------------------------------------------------ Intel

# Intel discrete GPUs by PCI device ID: (name, bf16). Old compute runtimes name a device they have no
# marketing name for "Intel(R) Graphics [0x<id>]" (sycl-ls, clinfo, xpu-smi), and xpu-smi prints the ID as
# "pci_device_id". The table is also the test for "discrete" in the PCI inventory: an Intel display device
# whose ID is not here (the integrated graphics of a Core or Xeon CPU) does not make a host a GPU host.
# IDs: the Linux kernel's include/drm/intel/pciids.h (INTEL_PVC_IDS, INTEL_ATS_M_IDS, INTEL_DG2_G10/G11/G12_IDS,
# INTEL_BMG_IDS with 0xE209 added in 2025, INTEL_DG1_IDS), 0x0bd1/0x0bd2 from the PVC list of an older
# i915_pciids_local.h (0x0BD0-0x0BDB), and the XeHP SDV IDs 0x0201-0x0210 of intel/compute-runtime
# (shared/source/dll/devices, XehpSdvHwConfig). Names: the NAMEDDEVICE entries of compute-runtime's
# shared/source/dll/devices/devices_base.inl, else pci.ids (github.com/pciutils/pciids). 0x0be0/0x0be1/0x0be5
# are in INTEL_PVC_IDS but named Atom D2xxx graphics in pci.ids, so they are left out. bf16: the Xe-HPC
# (Max), Xe-HPG (Arc A, Flex), Xe2-HPG (Arc B) and Xe-HP (SDV) cores have XMX matrix engines with bf16;
# DG1 (Xe-LP) has none.
INTEL_PCI = {}
for _ids, _name, _bf16 in (
        (("0bd5", "0bd6"), "Intel(R) Data Center GPU Max 1550", True),
        (("0bd7", "0bd8"), "Intel(R) Data Center GPU Max 1350", True),
        (("0bd9", "0bda", "0bdb"), "Intel(R) Data Center GPU Max 1100", True),
        (("0b69",), "Intel(R) Data Center GPU Max 1450", True),
        (("0b6e",), "Intel(R) Data Center GPU Max 1100C", True),
        (("0bd4",), "Intel(R) Data Center GPU Max 1550VG", True),
        (("0bd0", "0bd1", "0bd2"), "Intel(R) Data Center GPU Max (Ponte Vecchio)", True),
        (("56c0",), "Intel(R) Data Center GPU Flex 170", True),
        (("56c1",), "Intel(R) Data Center GPU Flex 140", True),
        (("56c2",), "Intel(R) Data Center GPU Flex 170V", True),
        (("56a0",), "Intel(R) Arc(TM) A770 Graphics", True),
        (("56a1",), "Intel(R) Arc(TM) A750 Graphics", True),
        (("56a2",), "Intel(R) Arc(TM) A580 Graphics", True),
        (("56a5",), "Intel(R) Arc(TM) A380 Graphics", True),
        (("56a6",), "Intel(R) Arc(TM) A310 LP Graphics", True),
        (("5690",), "Intel(R) Arc(TM) A770M Graphics", True),
        (("5691",), "Intel(R) Arc(TM) A730M Graphics", True),
        (("5692",), "Intel(R) Arc(TM) A550M Graphics", True),
        (("5693",), "Intel(R) Arc(TM) A370M Graphics", True),
        (("5694",), "Intel(R) Arc(TM) A350M Graphics", True),
        (("5696",), "Intel(R) Arc(TM) A570M Graphics", True),
        (("5697",), "Intel(R) Arc(TM) A530M Graphics", True),
        (("56b0",), "Intel(R) Arc(TM) Pro A30M Graphics", True),
        (("56b1",), "Intel(R) Arc(TM) Pro A40/A50 Graphics", True),
        (("56b2",), "Intel(R) Arc(TM) Pro A60M Graphics", True),
        (("56b3",), "Intel(R) Arc(TM) Pro A60 Graphics", True),
        (("56ba",), "Intel(R) Arc(TM) A380E Graphics", True),
        (("56bb",), "Intel(R) Arc(TM) A310E Graphics", True),
        (("56bc",), "Intel(R) Arc(TM) A370E Graphics", True),
        (("56bd",), "Intel(R) Arc(TM) A350E Graphics", True),
        (("56be",), "Intel(R) Arc(TM) A750E Graphics", True),
        (("56bf",), "Intel(R) Arc(TM) A580E Graphics", True),
        (("5695", "56a3", "56a4", "4f80", "4f81", "4f82", "4f83", "4f84", "4f85", "4f86", "4f87", "4f88"),
         "Intel(R) Arc(TM) Graphics (DG2)", True),
        (("e209", "e20b"), "Intel(R) Arc(TM) B580 Graphics", True),
        (("e20c",), "Intel(R) Arc(TM) B570 Graphics", True),
        (("e211",), "Intel(R) Arc(TM) Pro B60 Graphics", True),
        (("e212",), "Intel(R) Arc(TM) Pro B50 Graphics", True),
        (("e222",), "Intel(R) Arc(TM) Pro B65 Graphics", True),
        (("e223",), "Intel(R) Arc(TM) Pro B70 Graphics", True),
        (("e202", "e20d", "e210", "e215", "e216", "e220", "e221"), "Intel(R) Arc(TM) Graphics (Battlemage)", True),
        (tuple("%04x" % number for number in range(0x0201, 0x0211)), "Intel(R) XeHP SDV (Arctic Sound)", True),
        (("4905",), "Intel(R) Iris(R) Xe MAX Graphics (DG1)", False),
        (("4906",), "Intel(R) Iris(R) Xe Pod (DG1)", False),
        (("4907",), "Intel(R) Server GPU SG-18M (DG1)", False),
        (("4908",), "Intel(R) Iris(R) Xe Graphics (DG1)", False),
        (("4909",), "Intel(R) Iris(R) Xe MAX 100 Graphics (DG1)", False)):
    for _id in _ids:
        INTEL_PCI[_id] = (_name, _bf16)
del _ids, _name, _bf16, _id

INTEL_GENERIC_NAME = re.compile(r"^(?:Intel\(R\) Graphics \[0x[0-9a-fA-F]+\]|Intel GPU)$")


def intel_bf16(name):
    """bf16 on Data Center GPU Max (Ponte Vecchio) and the Xe-HPG/Xe2 parts (Arc, Flex), by name."""
    return bool(re.search(r"GPU Max|\bArc\b|Arc\(TM\)|GPU Flex", name or ""))


def intel_pci_id(name):
    """The PCI device ID in a name such as 'Intel(R) Graphics [0x0bd5]', else None."""
    match = re.search(r"\[0x([0-9a-fA-F]{3,4})\]", name or "")
    return "%04x" % int(match.group(1), 16) if match else None


def intel_device(name, pci_device_id=None):
    """(name, bf16) of an Intel GPU the tools name `name`.

    A device known by PCI ID (pci_device_id, or the '[0x....]' in the name) gets bf16 from INTEL_PCI, and
    its name from there when the tool's name is only 'Intel(R) Graphics [0x....]' (the ID stays in it).
    Other devices get bf16 from the name (intel_bf16).
    """
    name = name or "Intel GPU"
    device_id = _hex_id(pci_device_id) or intel_pci_id(name)
    known = INTEL_PCI.get(device_id)
    if not known:
        return name, intel_bf16(name)
    if INTEL_GENERIC_NAME.match(name):
        name = "%s [0x%s]" % (known[0], device_id)
    return name, known[1]


def _intel_gpu(index, name, pci_device_id=None, memory_mib=0, uuid=None):
    name, bf16 = intel_device(name, pci_device_id)
    return _gpu(index, "intel", name, memory_mib, bf16=bf16, uuid=uuid)


def parse_xpu_smi_json(text):
    """GPUs from `xpu-smi discovery -j` (device_list) or `xpu-smi discovery -d N -j` (one device).

    Only the per-device form carries memory_physical_size_byte; the list form gives 0.
    """
    data = _json_from(text)
    devices = data.get("device_list") if "device_list" in data else [data]
    gpus = []
    for device in devices or []:
        if "device_id" not in device:
            continue
        if (device.get("device_type") or "GPU").upper() not in ("GPU", "DISCRETE GPU", "INTEGRATED GPU"):
            continue
        memory_bytes = _to_int(_na(device.get("memory_physical_size_byte")))
        gpus.append(_intel_gpu(device["device_id"], _na(device.get("device_name")), device.get("pci_device_id"),
                               (memory_bytes or 0) // 1048576, _na(device.get("uuid"))))
    return gpus


def xpu_smi_driver_version(text):
    """driver_version of a per-device `xpu-smi discovery -d N -j` output."""
    data = _json_from(text)
    return _na(data.get("driver_version"))


# sycl-ls has printed three line formats (platform, then device name, version and driver in brackets):
#   oneAPI 2024.2+:      [level_zero:gpu][level_zero:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26918]
#   oneAPI 2022.1-2024.1: [ext_oneapi_level_zero:gpu:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26241]
#                         [opencl:gpu:2] Intel(R) OpenCL Graphics, Intel(R) UHD Graphics 770 OpenCL 3.0 NEO  [23.17.26241.33]
#   oneAPI 2021-2022.0:   [level_zero:0] GPU : Intel(R) Level-Zero 1.3 [1.3.23726]   (no device name)
SYCL_LS_FORMATS = (
    re.compile(r"^\[(?P<backend>[a-z_]+):(?P<type>[a-z]+)\]\[[a-z_]+:(?P<index>\d+)\]\s+(?P<rest>.+)$"),
    re.compile(r"^\[(?P<backend>[a-z_]+):(?P<type>[a-z]+):(?P<index>\d+)\]\s+(?P<rest>.+)$"),
    re.compile(r"^\[(?P<backend>[a-z_]+):(?P<index>\d+)\]\s+(?P<type>[A-Za-z]+)\s*:\s*(?P<rest>.+)$"),
)
SYCL_LS_DRIVER = re.compile(r"^(?P<body>.*?)\s*\[(?P<driver>[^\[\]]+)\]\s*$")
SYCL_LS_VERSION = re.compile(r"\s+(?:OpenCL\s+)?\d+\.\d+(?:\s+NEO)?\s*$")


def _sycl_ls_line(line):
    """{backend, platform, name, driver} of one sycl-ls GPU line, {} for another device line, None otherwise."""
    for number, pattern in enumerate(SYCL_LS_FORMATS):
        match = pattern.match(line.strip())
        if not match:
            continue
        if match.group("type").lower() != "gpu":
            return {}
        split = SYCL_LS_DRIVER.match(match.group("rest"))
        if not split:
            return {}
        body = split.group("body")
        if number == 2:  # oldest format: platform name only
            platform, name = SYCL_LS_VERSION.sub("", body), None
        else:
            platform, _sep, name = body.partition(", ")
            name = SYCL_LS_VERSION.sub("", name).strip() or None
        backend = match.group("backend")
        backend = "level_zero" if "level_zero" in backend else backend
        return {"backend": backend, "platform": platform.strip(), "name": name, "driver": split.group("driver")}
    return None


def _sycl_ls_gpu_lines(text):
    """The Intel GPU lines sycl-ls prints, Level Zero preferred over OpenCL.

    Raises ValueError when sycl-ls printed lines but none in a format it prints.
    """
    found = {"level_zero": [], "opencl": []}
    recognized = False
    for line in (text or "").splitlines():
        entry = _sycl_ls_line(line)
        if entry is None:
            continue
        recognized = True
        if entry and "Intel" in (entry["name"] or entry["platform"]) and entry["backend"] in found:
            found[entry["backend"]].append(entry)
    if not recognized and (text or "").strip():
        raise ValueError("no line in a format sycl-ls prints")
    return found["level_zero"] or found["opencl"]


def parse_sycl_ls(text):
    """Intel GPUs from `sycl-ls` in any of its three line formats (SYCL_LS_FORMATS).

    Level Zero entries are preferred; OpenCL entries count only when there are none. sycl-ls reports
    no memory, so memory_mib is 0; the oldest format names no device ('Intel GPU', bf16 off).
    """
    return [_intel_gpu(position, entry["name"]) for position, entry in enumerate(_sycl_ls_gpu_lines(text))]


def sycl_ls_driver_version(text):
    """Driver version in brackets at the end of the first Intel GPU line sycl-ls counts."""
    entries = _sycl_ls_gpu_lines(text)
    return entries[0]["driver"] if entries else None


def parse_clinfo_list(text):
    """Intel GPUs from `clinfo -l` (platform/device tree); memory is not reported (0)."""
    gpus = []
    platform = ""
    platforms = 0
    for line in (text or "").splitlines():
        platform_match = re.match(r"^Platform #\d+:\s*(.*)$", line.strip())
        if platform_match:
            platform = platform_match.group(1)
            platforms += 1
            continue
        device_match = re.match(r"^[`|+\\-]*--\s*Device #\d+:\s*(.*)$", line.strip())
        if not device_match or "Intel" not in platform:
            continue
        name = device_match.group(1).strip()
        if "Graphics" not in platform and not re.search(r"Graphics|GPU|Arc", name):
            continue  # Intel's OpenCL CPU runtime
        gpus.append(_intel_gpu(len(gpus), name))
    if not platforms and (text or "").strip():
        raise ValueError("no 'Platform #' line")
    return gpus


# -------------------------------------------------------------------------- CPU

ARM_PARTS = {
    "0xd08": "Cortex-A72", "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2", "0xd83": "Neoverse-V3AE", "0xd84": "Neoverse-V3", "0xd8e": "Neoverse-N3",
}


def parse_cpuinfo(text):
    """{'model': str, 'bf16': bool} from /proc/cpuinfo (first processor block)."""
    fields = {}
    for line in (text or "").splitlines():
        if not line.strip():
            if fields.get("flags") or fields.get("features"):
                break
            continue
        key, _sep, value = line.partition(":")
        key = key.strip().lower()
        if key not in fields:
            fields[key] = value.strip()
    model = fields.get("model name") or fields.get("hardware") or fields.get("cpu model")
    if not model and fields.get("cpu part"):
        part = fields["cpu part"].lower()
        model = ARM_PARTS.get(part, "ARM implementer %s part %s" % (fields.get("cpu implementer", "?"), part))
    flags = set((fields.get("flags") or "").split())
    features = set((fields.get("features") or "").split())
    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags) or "bf16" in features
    return {"model": model or "unknown", "bf16": bf16}


def parse_meminfo(text):
    """MemTotal of /proc/meminfo in MiB."""
    match = re.search(r"^MemTotal:\s*(\d+)\s*kB", text or "", re.MULTILINE)
    return int(match.group(1)) // 1024 if match else 0


# -------------------------------------------------------------------- selection


def select_gpus(gpus, spec):
    """Apply the `gpus` option ("0,2"): (selected GPUs in the given order, None) or ([], error)."""
    spec = (spec or "").strip()
    if not spec:
        return list(gpus), None
    by_index = {gpu["index"]: gpu for gpu in gpus}
    have = ", ".join(str(index) for index in sorted(by_index)) or "none (no GPU was detected)"
    wanted = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            return [], ("gpus=%r: %r is not a device index. Set `gpus` in this host's host_vars to "
                        "comma-separated indices from: %s." % (spec, part, have))
        if int(part) in wanted:
            return [], "gpus=%r names device %s twice. Fix `gpus` in this host's host_vars." % (spec, part)
        wanted.append(int(part))
    missing = [index for index in wanted if index not in by_index]
    if missing:
        return [], ("gpus=%r names device(s) %s, which this host does not have; its devices are: %s. "
                    "Fix `gpus` in this host's host_vars (or remove it to use all devices)."
                    % (spec, ", ".join(str(index) for index in missing), have))
    return [by_index[index] for index in wanted], None


# ---------------------------------------------------------------- PCI inventory

PCI_VENDORS = {"10de": "nvidia", "1002": "amd", "8086": "intel"}
VENDOR_LABELS = {"nvidia": "NVIDIA", "amd": "AMD", "intel": "Intel"}
PCI_GPU_CLASSES = ("0300", "0302", "0380", "1200")  # VGA, 3D, other display, processing accelerator
PCI_VM_DRIVERS = ("vfio-pci", "pci-stub")  # devices kept for virtual machines
LSPCI_VENDOR_PREFIXES = ("NVIDIA Corporation", "Advanced Micro Devices, Inc. [AMD/ATI]", "Intel Corporation")
LSPCI_DEVICE_LINE = re.compile(
    r"^(?P<slot>(?:[0-9a-fA-F]{4,8}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7])\s+"
    r"(?P<class_name>[^\[]*?)\s*\[(?P<class>[0-9a-fA-F]{4})\]:\s*"
    r"(?P<description>.*?)\s*\[(?P<vendor>[0-9a-fA-F]{4}):(?P<device>[0-9a-fA-F]{4})\]")
LSPCI_DRIVER_LINE = re.compile(r"^\s+Kernel driver in use:\s*(?P<driver>\S+)")


def _pci_entry(slot, vendor_id, device_id, pci_class, description=None, driver=None):
    """One entry of the `pci` fact."""
    slot = slot.lower()
    if slot.count(":") == 1:
        slot = "0000:" + slot
    vendor_id, device_id = vendor_id.lower(), device_id.lower()
    vendor = PCI_VENDORS.get(vendor_id, "other")
    name = (description or "").strip()
    for prefix in LSPCI_VENDOR_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):].strip()
    if name in ("", "Device"):  # lspci's word for an ID its pci.ids does not know
        known = (AMD_PCI if vendor == "amd" else INTEL_PCI if vendor == "intel" else {}).get(device_id)
        name = known[0] if known else "PCI device %s:%s" % (vendor_id, device_id)
    return {"slot": slot, "vendor": vendor, "vendor_id": vendor_id, "device_id": device_id,
            "class": pci_class.lower(), "name": name, "driver": driver}


def parse_lspci(text):
    """The display/3D/accelerator devices (PCI_GPU_CLASSES) in `lspci -D -nn -k` output.

    Also reads `lspci -nn`, `-nnk`, `-nnkq` and grep'ed excerpts of them (a slot without a domain gets
    0000:). The driver is the 'Kernel driver in use' line under the device, else None. Raises
    ValueError when the text has lines but none in lspci -nn's device format.
    """
    devices = []
    current = None
    recognized = False
    for line in (text or "").splitlines():
        match = LSPCI_DEVICE_LINE.match(line.strip())
        if match:
            recognized = True
            current = None
            if match.group("class").lower() in PCI_GPU_CLASSES:
                current = _pci_entry(match.group("slot"), match.group("vendor"), match.group("device"),
                                     match.group("class"), match.group("description"))
                devices.append(current)
            continue
        driver = LSPCI_DRIVER_LINE.match(line)
        if driver and current is not None:
            current["driver"] = driver.group("driver")
    if not recognized and (text or "").strip():
        raise ValueError("no device line of `lspci -nn`")
    return devices


def sysfs_pci_driver(root, slot):
    """Name of the kernel driver bound to a PCI device (the `driver` link in sysfs), else None."""
    try:
        return os.path.basename(os.readlink(os.path.join(root, slot, "driver"))) or None
    except OSError:
        return None


def read_sysfs_pci(root):
    """The PCI_GPU_CLASSES devices under root (/sys/bus/pci/devices): class, vendor, device, driver link.

    sysfs has no names; they come from the AMD and Intel tables, else 'PCI device <vendor>:<device>'.
    None when root cannot be listed.
    """
    try:
        slots = sorted(os.listdir(root))
    except OSError:
        return None
    devices = []
    for slot in slots:
        base = os.path.join(root, slot)
        pci_class = re.match(r"^0x([0-9a-fA-F]{4})", read_text(os.path.join(base, "class")).strip())
        vendor_id = _hex_id(read_text(os.path.join(base, "vendor")))
        device_id = _hex_id(read_text(os.path.join(base, "device")))
        if not pci_class or pci_class.group(1).lower() not in PCI_GPU_CLASSES or not vendor_id or not device_id:
            continue
        devices.append(_pci_entry(slot, vendor_id, device_id, pci_class.group(1),
                                  driver=sysfs_pci_driver(root, slot)))
    return devices


def pci_is_gpu(entry):
    """Whether a `pci` entry makes its host a GPU host (see DOCUMENTATION for the rule)."""
    if entry["driver"] in PCI_VM_DRIVERS:
        return False
    if entry["vendor"] == "nvidia":
        return True
    if entry["vendor"] == "amd":
        return entry["device_id"] in AMD_PCI or entry["device_id"] not in AMD_APU_IDS
    if entry["vendor"] == "intel":
        return entry["device_id"] in INTEL_PCI
    return False


def pci_gpus(pci, vendor):
    """The entries of `pci` that are GPUs of vendor."""
    return [entry for entry in pci if entry["vendor"] == vendor and pci_is_gpu(entry)]


def _and(items):
    return items[0] if len(items) == 1 else "%s and %s" % (", ".join(items[:-1]), items[-1])


def join_reasons(notes):
    """One reason from the notes of a vendor's tools: 'amd-smi and rocm-smi not found', or them in order."""
    missing = [note[:-len(" not found")] for note in notes if note.endswith(" not found")]
    if missing and len(missing) == len(notes):
        return _and(missing) + " not found"
    return "; ".join(notes)


def undriven_gpus(pci, answered, reasons):
    """The `undriven` fact: [{vendor, count, names, reason}] for each vendor with GPUs on the PCI bus
    (pci_gpus) that is not in answered (the vendors whose tools listed GPUs)."""
    summary = []
    for vendor in ("nvidia", "amd", "intel"):
        devices = pci_gpus(pci, vendor)
        if devices and vendor not in answered:
            summary.append({"vendor": vendor, "count": len(devices), "names": [entry["name"] for entry in devices],
                            "reason": reasons.get(vendor) or "no %s tool was run" % VENDOR_LABELS[vendor]})
    return summary


def undriven_warning(summary, pci, source):
    """The warning for one `undriven` entry: what is on the bus, why nothing answers, what to do."""
    devices = pci_gpus(pci, summary["vendor"])
    listed = ", ".join("%s:%s %s at %s, kernel driver %s" % (entry["vendor_id"], entry["device_id"], entry["name"],
                                                            entry["slot"], entry["driver"] or "none")
                       for entry in devices)
    return ("%d %s GPU%s present (%s: %s), no driver answers: %s; install the driver (setup.yml with "
            "drivers_install: true)." % (summary["count"], VENDOR_LABELS[summary["vendor"]],
                                         "" if summary["count"] == 1 else "s", source, listed, summary["reason"]))


# ---------------------------------------------------------------------- probing


class Prober(object):
    """Runs the vendor tools through module.run_command and collects warnings.

    It also keeps, per vendor, whether its tools were run (probed), whether they listed GPUs
    (answered) and what each tool did (notes), for the `undriven` summary.
    """

    def __init__(self, module, timeout):
        self.module = module
        self.timeout = timeout
        self.warnings = []
        self.timeout_bin = module.get_bin_path("timeout")
        self.probed = set()
        self.answered = set()
        self.notes = {"nvidia": [], "amd": [], "intel": []}

    def warn(self, message):
        self.warnings.append(message)

    def note(self, vendor, message):
        if vendor:
            self.notes[vendor].append(message)

    def find(self, tool, vendor=None):
        path = self.module.get_bin_path(tool, opt_dirs=EXTRA_TOOL_DIRS)
        if not path:
            self.note(vendor, "%s not found" % tool)
        return path

    def run(self, path, args):
        """(rc, stdout + stderr) of one tool call, bounded by the timeout."""
        command = [path] + list(args)
        if self.timeout_bin:
            command = [self.timeout_bin, str(self.timeout)] + command
        rc, out, err = self.module.run_command(command, environ_update={"LC_ALL": "C"})
        if self.timeout_bin and rc == 124:
            return rc, "%s %s did not answer within %s seconds" % (path, " ".join(args), self.timeout)
        out, err = out or "", err or ""
        return rc, out + ("\n" if out and err and not out.endswith("\n") else "") + err

    def parsed(self, tool, parser, text, vendor=None):
        """parser(text), or None with a warning naming the tool and the first line it printed."""
        try:
            return parser(text)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self.warn("%s printed output this module cannot read (%s); its first line: %r. Skipping it."
                      % (tool, error, _first_line(text)))
            self.note(vendor, "%s printed nothing this module can read (first line: %r)" % (tool, _first_line(text)))
            return None

    def failed(self, vendor, tool, rc, out):
        """Note a failed call; returns the first line of its output."""
        first = _first_line(out)
        self.note(vendor, "%s failed: %s" % (tool, first))
        return first

    def found(self, vendor, result):
        self.answered.add(vendor)
        return result

    # --- PCI
    def pci_inventory(self, root):
        """(entries of the `pci` fact, 'lspci' or 'sysfs')."""
        path = self.find("lspci")
        if path:
            rc, out = self.run(path, LSPCI_LIST)
            if rc != 0:
                self.warn("lspci failed (exit %s): %s; reading %s instead." % (rc, _first_line(out), root))
            else:
                devices = self.parsed("lspci", parse_lspci, out)
                if devices is not None:
                    for entry in devices:
                        entry["driver"] = entry["driver"] or sysfs_pci_driver(root, entry["slot"])
                    return devices, "lspci"
        return read_sysfs_pci(root) or [], "sysfs"

    # --- NVIDIA
    def nvidia(self):
        self.probed.add("nvidia")
        path = self.find("nvidia-smi", "nvidia")
        if not path:
            return None
        rc, out = self.run(path, NVIDIA_QUERY)
        if rc != 0:
            kind, warning = nvidia_failure(out, rc)
            if kind == "no_cc":
                rc, out = self.run(path, NVIDIA_QUERY_NO_CC)
                if rc != 0:
                    self.failed("nvidia", "nvidia-smi", rc, out)
                    self.warn(nvidia_failure(out, rc)[1] or "nvidia-smi failed (exit %s)" % rc)
                    return None
                self.warn("This NVIDIA driver is older than 510 and cannot report compute_cap; the "
                          "compute capability comes from a table of product names. Upgrade the driver "
                          "for exact values.")
            else:
                self.failed("nvidia", "nvidia-smi", rc, out)
                self.warn(warning)
                return None
        gpus = self.parsed("nvidia-smi", parse_nvidia_smi_csv, out, "nvidia")
        if gpus is None:
            return None
        if not gpus:
            self.note("nvidia", "nvidia-smi lists no GPUs")
            self.warn("nvidia-smi is installed but lists no GPUs.")
            return None
        for gpu in gpus:
            if gpu["compute_capability"] is None:
                self.warn("Compute capability of GPU %d (%s) is unknown; bf16 is assumed off."
                          % (gpu["index"], gpu["name"]))
        rc, header = self.run(path, NVIDIA_HEADER)
        return self.found("nvidia", {"accelerator": "nvidia", "tool": "nvidia-smi", "gpus": gpus,
                                     "driver_version": nvidia_driver_version(out),
                                     "runtime_version": parse_nvidia_smi_header(header) if rc == 0 else None})

    # --- AMD
    def amd(self):
        self.probed.add("amd")
        for tool, args, parser, driver in (
                ("amd-smi", AMD_SMI_STATIC, parse_amd_smi_json, amd_smi_driver_version),
                ("rocm-smi", ROCM_SMI_QUERY, parse_rocm_smi_json, rocm_smi_driver_version)):
            path = self.find(tool, "amd")
            if not path:
                continue
            rc, out = self.run(path, args)
            if rc != 0:
                first = self.failed("amd", tool, rc, out)
                self.warn("%s failed (exit %s): %s. Check that the amdgpu driver is loaded "
                          "(`lsmod | grep amdgpu`) and that the user is in the render and video "
                          "groups." % (tool, rc, first))
                continue
            gpus = self.parsed(tool, parser, out, "amd")
            if gpus is None:
                continue
            if not gpus:
                self.note("amd", "%s lists no AMD GPUs" % tool)
                self.warn("%s is installed but lists no AMD GPUs." % tool)
                continue
            return self.found("amd", {"accelerator": "amd", "tool": tool, "gpus": gpus,
                                      "driver_version": self.parsed(tool, driver, out),
                                      "runtime_version": self.rocm_version()})
        return None

    def rocm_version(self):
        try:
            with open(ROCM_VERSION_FILE) as handle:
                return parse_rocm_version(handle.read())
        except (IOError, OSError):
            return None

    # --- Intel
    def intel(self):
        self.probed.add("intel")
        result = self.xpu_smi()
        if result:
            return self.found("intel", result)
        for tool, args, parser, driver in (("sycl-ls", SYCL_LS, parse_sycl_ls, sycl_ls_driver_version),
                                           ("clinfo", CLINFO_LIST, parse_clinfo_list, None)):
            path = self.find(tool, "intel")
            if not path:
                continue
            rc, out = self.run(path, args)
            if rc != 0:
                self.warn("%s failed (exit %s): %s" % (tool, rc, self.failed("intel", tool, rc, out)))
                continue
            gpus = self.parsed(tool, parser, out, "intel")
            if gpus is None:
                continue
            if not gpus:
                self.note("intel", "%s lists no Intel GPU" % tool)
                continue
            self.warn("Intel GPUs found with %s, which does not report device memory (memory_mib is 0). "
                      "Install xpu-smi for memory, driver and UUID." % tool)
            unnamed = [gpu for gpu in gpus if gpu["name"] == "Intel GPU"]
            if unnamed:
                self.warn("%s is from oneAPI 2022.0 or older and prints no device names; bf16 is assumed off "
                          "for %d Intel GPU(s). Install xpu-smi or a newer oneAPI." % (tool, len(unnamed)))
            return self.found("intel", {"accelerator": "intel", "tool": tool, "gpus": gpus,
                                        "driver_version": self.parsed(tool, driver, out) if driver else None,
                                        "runtime_version": None})
        return None

    def xpu_smi(self):
        path = self.find("xpu-smi", "intel")
        if not path:
            return None
        rc, out = self.run(path, XPU_SMI_LIST)
        if rc != 0:
            self.warn("xpu-smi failed (exit %s): %s. Check the Intel GPU driver and Level Zero "
                      "runtime (`ls /dev/dri/render*`)." % (rc, self.failed("intel", "xpu-smi", rc, out)))
            return None
        gpus = self.parsed("xpu-smi", parse_xpu_smi_json, out, "intel")
        if not gpus:
            if gpus is not None:
                self.note("intel", "xpu-smi lists no Intel GPUs")
                self.warn("xpu-smi is installed but lists no Intel GPUs.")
            return None
        driver = None
        for gpu in gpus:
            rc, detail = self.run(path, xpu_smi_device_args(gpu["index"]))
            details = self.parsed("xpu-smi", parse_xpu_smi_json, detail) if rc == 0 else None
            if details:
                gpu["memory_mib"] = details[0]["memory_mib"]
                gpu["uuid"] = details[0]["uuid"] or gpu["uuid"]
                driver = driver or self.parsed("xpu-smi", xpu_smi_driver_version, detail)
        return {"accelerator": "intel", "tool": "xpu-smi", "gpus": gpus,
                "driver_version": driver, "runtime_version": None}


def read_text(path):
    try:
        with open(path) as handle:
            return handle.read()
    except (IOError, OSError):
        return ""


def cpu_facts():
    cpu = parse_cpuinfo(read_text("/proc/cpuinfo"))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return {"model": cpu["model"], "cores": cores,
            "memory_mib": parse_meminfo(read_text("/proc/meminfo")), "bf16": cpu["bf16"]}


def gather(module, gpus_spec, timeout, pci_sysfs_root=PCI_SYSFS_ROOT):
    """The dsfleet_gpu fact, or raise ValueError with the message for fail_json."""
    prober = Prober(module, timeout)
    pci, source = prober.pci_inventory(pci_sysfs_root)
    found = prober.nvidia() or prober.amd() or prober.intel()
    # Detection stops at the first vendor whose tools answer; a vendor with GPUs on the bus whose
    # tools were not run yet is probed now, so that `undriven` says what its tools do.
    for vendor in ("nvidia", "amd", "intel"):
        if vendor not in prober.probed and pci_gpus(pci, vendor):
            getattr(prober, vendor)()
    undriven = undriven_gpus(pci, prober.answered,
                             dict((vendor, join_reasons(notes)) for vendor, notes in prober.notes.items()))
    for summary in undriven:
        prober.warn(undriven_warning(summary, pci, source))
    if not found:
        found = {"accelerator": "cpu", "tool": None, "gpus": [], "driver_version": None,
                 "runtime_version": None}
    selected, error = select_gpus(found["gpus"], gpus_spec)
    if error:
        raise ValueError(error)
    for gpu in selected:
        if gpu["mig"]:
            prober.warn("GPU %d (%s) has MIG enabled. dsfleet runs one rank per whole GPU and does not "
                        "use MIG instances as separate ranks; disable MIG (`nvidia-smi -i %d -mig 0`, "
                        "then reset the GPU) to train on its full memory." % (gpu["index"], gpu["name"], gpu["index"]))
        if gpu["memory_mib"] == 0 and found["tool"] not in ("sycl-ls", "clinfo"):
            prober.warn("%s reports no memory size for GPU %d (%s); memory_mib is 0."
                        % (found["tool"], gpu["index"], gpu["name"]))
    found["gpus"] = selected
    found["pci"] = pci
    found["undriven"] = undriven
    found["cpu"] = cpu_facts()
    found["warnings"] = prober.warnings
    return found


def ansible_facts(module, gather_subset, gather_timeout):
    """Ansible's own facts of ``gather_subset``, collected the way ansible.builtin.setup collects them (its
    collectors, namespace and minimal subset), so that one module call returns host and accelerator facts."""
    from ansible.module_utils.facts import ansible_collector, default_collectors
    from ansible.module_utils.facts.namespace import PrefixFactNamespace

    # ansible.builtin.setup's own minimal_gather_subset (defined inside its main(), not importable)
    minimal = frozenset(["apparmor", "caps", "cmdline", "date_time", "distribution", "dns", "env", "fips", "local",
                         "lsb", "pkg_mgr", "platform", "python", "selinux", "service_mgr", "ssh_pub_keys", "user"])
    try:
        collector = ansible_collector.get_ansible_collector(
            all_collector_classes=default_collectors.collectors,
            namespace=PrefixFactNamespace(namespace_name="ansible", prefix="ansible_"),
            filter_spec=[], gather_subset=gather_subset, gather_timeout=gather_timeout, minimal_gather_subset=minimal)
    except Exception as error:  # a subset no collector has: setup's own message
        module.fail_json(msg="gather_subset %s: %s" % (gather_subset, error))
    return collector.collect(module=module)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            gpus=dict(type="str", default=""),
            timeout=dict(type="int", default=20),
            pci_sysfs_root=dict(type="path", default=PCI_SYSFS_ROOT),
            gather_subset=dict(type="list", elements="str", default=[]),
            gather_timeout=dict(type="int", default=10),
        ),
        supports_check_mode=True,
    )
    facts = {}
    if module.params["gather_subset"]:
        facts = ansible_facts(module, module.params["gather_subset"], module.params["gather_timeout"])
    try:
        gpu = gather(module, module.params["gpus"], module.params["timeout"], module.params["pci_sysfs_root"])
    except ValueError as error:
        module.fail_json(msg=str(error))
    for warning in gpu["warnings"]:
        module.warn(warning)
    facts["dsfleet_gpu"] = gpu
    module.exit_json(changed=False, ansible_facts=facts)


if __name__ == "__main__":
    main()
