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
    with the next tool. The module never changes the host.
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
requirements:
  - Linux (reads C(/proc/cpuinfo) and C(/proc/meminfo)).
  - The vendor tool of the host's GPUs on C(PATH) or in C(/opt/rocm/bin), if it has GPUs.
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


def xpu_smi_device_args(index):
    """Arguments of the per-device xpu-smi call (memory, driver, UUID)."""
    return ["discovery", "-d", str(index), "-j"]


ROCM_VERSION_FILE = "/opt/rocm/.info/version"
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
    """Decode the first JSON document in text; tools print warnings before it."""
    text = text or ""
    for pos, char in enumerate(text):
        if char in "[{":
            try:
                return json.JSONDecoder().raw_decode(text[pos:])[0]
            except ValueError:
                continue
    raise ValueError("no JSON document in the tool output")


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

AMD_BF16_ARCH = re.compile(r"^gfx(90a|94[0-9a-f]|95[0-9a-f]|11[0-9a-f]{2}|12[0-9a-f]{2})$")


def amd_arch_from_name(name):
    """GFX target for a known product name, else None."""
    for pattern, arch in AMD_ARCH_BY_NAME:
        if re.search(pattern, name or "", re.IGNORECASE):
            return arch
    return None


def amd_bf16(arch):
    """bf16 on CDNA2+ (gfx90a, gfx94x, gfx95x) and RDNA3+ (gfx11xx, gfx12xx)."""
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
        name = _na(asic.get("market_name")) or _na((entry.get("board") or {}).get("product_name")) or "AMD GPU"
        arch = _na(asic.get("target_graphics_version")) or amd_arch_from_name(name)
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


def _rocm_name(card):
    for key in ("Card Series", "Card series", "Market Name", "Device Name", "Card SKU", "Card Model", "Card model"):
        value = _na(card.get(key))
        if value and not re.match(r"^0x[0-9a-fA-F]+$", value):
            return value
    return "AMD GPU"


def parse_rocm_smi_json(text):
    """GPUs from `rocm-smi --showproductname --showmeminfo vram --json`.

    Old rocm-smi versions print no 'GFX Version'; the arch then comes from the name.
    """
    data = _json_from(text)
    gpus = []
    for key, card in sorted(data.items(), key=lambda item: _to_int(item[0]) or 0):
        match = re.match(r"^card(\d+)$", key)
        if not match or not isinstance(card, dict):
            continue
        name = _rocm_name(card)
        arch = _na(card.get("GFX Version")) or amd_arch_from_name(name)
        memory_bytes = _to_int(_na(card.get("VRAM Total Memory (B)")))
        gpus.append(_gpu(match.group(1), "amd", name, (memory_bytes or 0) // 1048576, arch=arch,
                         bf16=amd_bf16(arch), uuid=_na(card.get("Unique ID"))))
    return gpus


def rocm_smi_driver_version(text):
    """'Driver version' of the 'system' entry, when rocm-smi prints one."""
    data = _json_from(text)
    return _na((data.get("system") or {}).get("Driver version"))


def parse_rocm_version(text):
    """ROCm version from /opt/rocm/.info/version ('6.2.0-66' -> '6.2.0')."""
    match = re.match(r"\s*([0-9]+(?:\.[0-9]+)*)", text or "")
    return match.group(1) if match else None


# ------------------------------------------------------------------------ Intel


def intel_bf16(name):
    """bf16 on Data Center GPU Max (Ponte Vecchio) and the Xe-HPG/Xe2 parts (Arc, Flex)."""
    return bool(re.search(r"GPU Max|\bArc\b|Arc\(TM\)|GPU Flex", name or ""))


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
        name = _na(device.get("device_name")) or "Intel GPU"
        memory_bytes = _to_int(_na(device.get("memory_physical_size_byte")))
        gpus.append(_gpu(device["device_id"], "intel", name, (memory_bytes or 0) // 1048576,
                         bf16=intel_bf16(name), uuid=_na(device.get("uuid"))))
    return gpus


def xpu_smi_driver_version(text):
    """driver_version of a per-device `xpu-smi discovery -d N -j` output."""
    data = _json_from(text)
    return _na(data.get("driver_version"))


SYCL_LS_LINE = re.compile(
    r"^\[(?P<backend>[a-z_]+):gpu\]\[[a-z_]+:(?P<index>\d+)\]\s+(?P<platform>[^,]+),\s+"
    r"(?P<name>.+?)\s+(?:OpenCL \S+(?: NEO)?|\d+\.\d+)\s+\[(?P<driver>[^\]]+)\]\s*$")


def _sycl_ls_gpu_lines(text):
    """Matches of the Intel GPU lines sycl-ls prints, Level Zero preferred over OpenCL."""
    found = {"level_zero": [], "opencl": []}
    for line in (text or "").splitlines():
        match = SYCL_LS_LINE.match(line.strip())
        if not match or "Intel" not in match.group("name"):
            continue
        backend = "level_zero" if "level_zero" in match.group("backend") else match.group("backend")
        if backend in found:
            found[backend].append(match)
    return found["level_zero"] or found["opencl"]


def parse_sycl_ls(text):
    """Intel GPUs from `sycl-ls` lines like
    '[level_zero:gpu][level_zero:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26241]'.

    Level Zero entries are preferred; OpenCL entries count only when there are none.
    sycl-ls reports no memory, so memory_mib is 0.
    """
    return [_gpu(position, "intel", m.group("name"), bf16=intel_bf16(m.group("name")))
            for position, m in enumerate(_sycl_ls_gpu_lines(text))]


def sycl_ls_driver_version(text):
    """Driver version in brackets at the end of the first Intel GPU line sycl-ls counts."""
    matches = _sycl_ls_gpu_lines(text)
    return matches[0].group("driver") if matches else None


def parse_clinfo_list(text):
    """Intel GPUs from `clinfo -l` (platform/device tree); memory is not reported (0)."""
    gpus = []
    platform = ""
    for line in (text or "").splitlines():
        platform_match = re.match(r"^Platform #\d+:\s*(.*)$", line.strip())
        if platform_match:
            platform = platform_match.group(1)
            continue
        device_match = re.match(r"^[`|+\\-]*--\s*Device #\d+:\s*(.*)$", line.strip())
        if not device_match or "Intel" not in platform:
            continue
        name = device_match.group(1).strip()
        if "Graphics" not in platform and not re.search(r"Graphics|GPU|Arc", name):
            continue  # Intel's OpenCL CPU runtime
        gpus.append(_gpu(len(gpus), "intel", name, bf16=intel_bf16(name)))
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


# ---------------------------------------------------------------------- probing


class Prober(object):
    """Runs the vendor tools through module.run_command and collects warnings."""

    def __init__(self, module, timeout):
        self.module = module
        self.timeout = timeout
        self.warnings = []
        self.timeout_bin = module.get_bin_path("timeout")

    def warn(self, message):
        self.warnings.append(message)

    def find(self, tool):
        return self.module.get_bin_path(tool, opt_dirs=EXTRA_TOOL_DIRS)

    def run(self, path, args):
        """(rc, stdout + stderr) of one tool call, bounded by the timeout."""
        command = [path] + list(args)
        if self.timeout_bin:
            command = [self.timeout_bin, str(self.timeout)] + command
        rc, out, err = self.module.run_command(command, environ_update={"LC_ALL": "C"})
        if self.timeout_bin and rc == 124:
            return rc, "%s %s did not answer within %s seconds" % (path, " ".join(args), self.timeout)
        return rc, (out or "") + (err or "")

    def parsed(self, tool, parser, text):
        try:
            return parser(text)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self.warn("%s printed output this module cannot read (%s); skipping it." % (tool, error))
            return None

    # --- NVIDIA
    def nvidia(self):
        path = self.find("nvidia-smi")
        if not path:
            return None
        rc, out = self.run(path, NVIDIA_QUERY)
        if rc != 0:
            kind, warning = nvidia_failure(out, rc)
            if kind == "no_cc":
                rc, out = self.run(path, NVIDIA_QUERY_NO_CC)
                if rc != 0:
                    self.warn(nvidia_failure(out, rc)[1] or "nvidia-smi failed (exit %s)" % rc)
                    return None
                self.warn("This NVIDIA driver is older than 510 and cannot report compute_cap; the "
                          "compute capability comes from a table of product names. Upgrade the driver "
                          "for exact values.")
            else:
                self.warn(warning)
                return None
        gpus = self.parsed("nvidia-smi", parse_nvidia_smi_csv, out)
        if gpus is None:
            return None
        if not gpus:
            self.warn("nvidia-smi is installed but lists no GPUs.")
            return None
        for gpu in gpus:
            if gpu["compute_capability"] is None:
                self.warn("Compute capability of GPU %d (%s) is unknown; bf16 is assumed off."
                          % (gpu["index"], gpu["name"]))
        rc, header = self.run(path, NVIDIA_HEADER)
        return {"accelerator": "nvidia", "tool": "nvidia-smi", "gpus": gpus,
                "driver_version": nvidia_driver_version(out),
                "runtime_version": parse_nvidia_smi_header(header) if rc == 0 else None}

    # --- AMD
    def amd(self):
        for tool, args, parser, driver in (
                ("amd-smi", AMD_SMI_STATIC, parse_amd_smi_json, amd_smi_driver_version),
                ("rocm-smi", ROCM_SMI_QUERY, parse_rocm_smi_json, rocm_smi_driver_version)):
            path = self.find(tool)
            if not path:
                continue
            rc, out = self.run(path, args)
            if rc != 0:
                first = out.strip().splitlines()[0] if out.strip() else "no output"
                self.warn("%s failed (exit %s): %s. Check that the amdgpu driver is loaded "
                          "(`lsmod | grep amdgpu`) and that the user is in the render and video "
                          "groups." % (tool, rc, first))
                continue
            gpus = self.parsed(tool, parser, out)
            if gpus is None:
                continue
            if not gpus:
                self.warn("%s is installed but lists no AMD GPUs." % tool)
                continue
            return {"accelerator": "amd", "tool": tool, "gpus": gpus,
                    "driver_version": self.parsed(tool, driver, out),
                    "runtime_version": self.rocm_version()}
        return None

    def rocm_version(self):
        try:
            with open(ROCM_VERSION_FILE) as handle:
                return parse_rocm_version(handle.read())
        except (IOError, OSError):
            return None

    # --- Intel
    def intel(self):
        result = self.xpu_smi()
        if result:
            return result
        for tool, args, parser, driver in (("sycl-ls", SYCL_LS, parse_sycl_ls, sycl_ls_driver_version),
                                           ("clinfo", CLINFO_LIST, parse_clinfo_list, None)):
            path = self.find(tool)
            if not path:
                continue
            rc, out = self.run(path, args)
            if rc != 0:
                self.warn("%s failed (exit %s): %s" % (tool, rc, (out.strip().splitlines() or ["no output"])[0]))
                continue
            gpus = self.parsed(tool, parser, out)
            if not gpus:
                continue
            self.warn("Intel GPUs found with %s, which does not report device memory (memory_mib is 0). "
                      "Install xpu-smi for memory, driver and UUID." % tool)
            return {"accelerator": "intel", "tool": tool, "gpus": gpus,
                    "driver_version": driver(out) if driver else None, "runtime_version": None}
        return None

    def xpu_smi(self):
        path = self.find("xpu-smi")
        if not path:
            return None
        rc, out = self.run(path, XPU_SMI_LIST)
        if rc != 0:
            self.warn("xpu-smi failed (exit %s): %s. Check the Intel GPU driver and Level Zero "
                      "runtime (`ls /dev/dri/render*`)." % (rc, (out.strip().splitlines() or ["no output"])[0]))
            return None
        gpus = self.parsed("xpu-smi", parse_xpu_smi_json, out)
        if not gpus:
            if gpus is not None:
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


def gather(module, gpus_spec, timeout):
    """The dsfleet_gpu fact, or raise ValueError with the message for fail_json."""
    prober = Prober(module, timeout)
    found = prober.nvidia() or prober.amd() or prober.intel()
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
    found["cpu"] = cpu_facts()
    found["warnings"] = prober.warnings
    return found


def main():
    module = AnsibleModule(
        argument_spec=dict(
            gpus=dict(type="str", default=""),
            timeout=dict(type="int", default=20),
        ),
        supports_check_mode=True,
    )
    try:
        facts = gather(module, module.params["gpus"], module.params["timeout"])
    except ValueError as error:
        module.fail_json(msg=str(error))
    for warning in facts["warnings"]:
        module.warn(warning)
    module.exit_json(changed=False, ansible_facts={"dsfleet_gpu": facts})


if __name__ == "__main__":
    main()
