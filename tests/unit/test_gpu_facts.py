"""Tests of roles/gpu_facts/library/gpu_facts.py.

Parsers are tested as pure functions on the recorded tool outputs in
tests/fixtures/gpu (provenance in tests/fixtures/gpu/SOURCES.md); the module as
a whole is run as a subprocess (and once through `ansible`) with fake tools on
PATH that replay those outputs (tests/fixtures/gpu/fakes.py).

Run: .venv/bin/python -m pytest -q tests/unit/test_gpu_facts.py
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_PATH = REPO / "roles" / "gpu_facts" / "library" / "gpu_facts.py"
FIXTURES = REPO / "tests" / "fixtures" / "gpu"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gf = _load("gpu_facts_under_test", MODULE_PATH)
fakes = _load("gpu_fakes", FIXTURES / "fakes.py")


def fixture(relpath):
    return (FIXTURES / relpath).read_text()


# ---------------------------------------------------------------- NVIDIA tables

# fixture, names, memory_mib, compute capabilities, bf16, mig, driver, uuid of GPU 0
NVIDIA_CASES = [
    ("nvidia/a100_sxm4_80gb_x4_mig0.csv", ["NVIDIA A100-SXM4-80GB"] * 4, [81920] * 4, ["8.0"] * 4,
     [True] * 4, [True, False, False, False], "535.216.01", "GPU-513536b6-7d19-9063-b049-1e69664bb298"),
    ("nvidia/h100_80gb_hbm3_x1.csv", ["NVIDIA H100 80GB HBM3"], [81559], ["9.0"], [True], [False],
     "580.126.09", "GPU-81d79b08-40a0-40ae-3fc5-82b8ff8b8138"),
    ("nvidia/v100_sxm2_32gb_x2.csv", ["Tesla V100-SXM2-32GB"] * 2, [32768] * 2, ["7.0"] * 2, [False] * 2,
     [False] * 2, "525.105.17", "GPU-dae76d0e-3414-958a-8f3e-fc6682b36f31"),
    ("nvidia/rtx4090_x1.csv", ["NVIDIA GeForce RTX 4090"], [24564], ["8.9"], [True], [False], "570.133.07",
     "GPU-77860e35-a99c-0a9f-f154-58b97f45f3ba"),
    ("nvidia/rtx3090_x1.csv", ["NVIDIA GeForce RTX 3090"], [24576], ["8.6"], [True], [False], "580.142",
     "GPU-4fb6ac9a-29e1-b611-4af7-b61a99e3b92d"),
    ("nvidia/t4_x1.csv", ["Tesla T4"], [15360], ["7.5"], [False], [False], "470.82.01",
     "GPU-39cd9454-0976-646a-acef-01a35ad02034"),
    ("nvidia/titanv_rtx5880ada.csv", ["NVIDIA TITAN V", "NVIDIA RTX 5880 Ada Generation"], [12288, 49140],
     ["7.0", "8.9"], [False, True], [False, False], "570.86.15", "GPU-b5169cef-2205-c30e-f2b3-220cfa14bafd"),
    # six columns (driver 470 cannot query compute_cap): capability from the name table
    ("nvidia/v100_sxm2_16gb_470_nocc.csv", ["Tesla V100-SXM2-16GB"], [16160], ["7.0"], [False], [False],
     "470.182.03", "GPU-e0c399a2-2a6f-e687-b704-b0906db8fb71"),
]


@pytest.mark.parametrize("path,names,memory,caps,bf16,mig,driver,uuid0", NVIDIA_CASES,
                         ids=[case[0] for case in NVIDIA_CASES])
def test_parse_nvidia_smi_csv(path, names, memory, caps, bf16, mig, driver, uuid0):
    text = fixture(path)
    gpus = gf.parse_nvidia_smi_csv(text)
    assert [g["index"] for g in gpus] == list(range(len(names)))
    assert [g["name"] for g in gpus] == names
    assert [g["memory_mib"] for g in gpus] == memory
    assert [g["compute_capability"] for g in gpus] == caps
    assert [g["bf16"] for g in gpus] == bf16
    assert [g["mig"] for g in gpus] == mig
    assert {g["vendor"] for g in gpus} == {"nvidia"}
    assert {g["arch"] for g in gpus} == {None}
    assert gpus[0]["uuid"] == uuid0
    assert gf.nvidia_driver_version(text) == driver


@pytest.mark.parametrize("path,cuda", [
    ("nvidia/header_a100_535.txt", "12.2"),
    ("nvidia/header_rtx5090_610.txt", "13.3"),
    ("nvidia/a100_sxm4_80gb_x4_mig0.csv", None),
])
def test_parse_nvidia_smi_header(path, cuda):
    assert gf.parse_nvidia_smi_header(fixture(path)) == cuda


# fixture, kind, words the warning must contain (problem and fix)
NVIDIA_FAILURES = [
    ("nvidia/compute_cap_invalid.rc2.txt", "no_cc", []),
    ("nvidia/driver_not_loaded.rc9.txt", "driver", ["cannot talk to the NVIDIA driver", "kernel", "reboot"]),
    ("nvidia/driver_mismatch.rc18.txt", "mismatch", ["Driver/library version mismatch", "NVML library version: 535.161",
                                                     "reboot"]),
    ("nvidia/no_devices.rc6.txt", "none", ["finds no NVIDIA GPU", "lspci"]),
    ("nvidia/no_supported_gpus.rc255.txt", "none", ["finds no NVIDIA GPU", "No supported GPUs"]),
]


@pytest.mark.parametrize("path,kind,words", NVIDIA_FAILURES, ids=[case[0] for case in NVIDIA_FAILURES])
def test_nvidia_failure_names_problem_and_fix(path, kind, words):
    rc = int(path.split(".rc")[1].split(".")[0])
    got_kind, warning = gf.nvidia_failure(fixture(path), rc)
    assert got_kind == kind
    for word in words:
        assert word in warning


def test_nvidia_failure_unknown_text_keeps_exit_code():
    kind, warning = gf.nvidia_failure("Segmentation fault\n", 139)
    assert kind == "other" and "exit 139" in warning and "Segmentation fault" in warning


def test_parse_nvidia_smi_csv_rejects_other_output():
    with pytest.raises(ValueError):
        gf.parse_nvidia_smi_csv(fixture("nvidia/driver_mismatch.rc18.txt"))


@pytest.mark.parametrize("name,cap", [
    ("NVIDIA A100-SXM4-80GB", "8.0"), ("A100-SXM-80GB", "8.0"), ("NVIDIA A10", "8.6"), ("NVIDIA A10G", "8.6"),
    ("NVIDIA A40", "8.6"), ("NVIDIA H100 80GB HBM3", "9.0"), ("NVIDIA GH200 480GB", "9.0"), ("NVIDIA L40S", "8.9"),
    ("NVIDIA L4", "8.9"), ("NVIDIA GeForce RTX 4090", "8.9"), ("NVIDIA GeForce RTX 3090", "8.6"),
    ("NVIDIA RTX A6000", "8.6"), ("Tesla T4", "7.5"), ("Quadro RTX 4000", "7.5"), ("Tesla V100-SXM2-16GB", "7.0"),
    ("NVIDIA TITAN V", "7.0"), ("Tesla P100-PCIE-16GB", "6.0"), ("Tesla P40", "6.1"), ("Tesla K80", "3.7"),
    ("NVIDIA GeForce RTX 5090", "12.0"), ("NVIDIA B200", "10.0"), ("Some Future GPU", None),
])
def test_nvidia_cc_from_name(name, cap):
    assert gf.nvidia_cc_from_name(name) == cap


@pytest.mark.parametrize("cap,bf16", [("8.0", True), ("9.0", True), ("12.0", True), ("7.5", False),
                                      ("7.0", False), (None, False)])
def test_nvidia_bf16(cap, bf16):
    assert gf.nvidia_bf16(cap) is bf16


# ------------------------------------------------------------------- AMD tables

# fixture, names, memory_mib, archs, bf16, uuid of GPU 0, driver
ROCM_SMI_CASES = [
    ("amd/rocm_smi_rx7900xt.json", ["Radeon RX 7900 XT"], [20464], ["gfx1100"], [True], None, None),
    # old rocm-smi: no "GFX Version"; arch from the product name
    ("amd/rocm_smi_mi210_legacy.json", ["Instinct MI210"], [65520], ["gfx90a"], [True], None, None),
    ("amd/rocm_smi_mi250x_legacy_x2.json", ["AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2"] * 2, [65520] * 2,
     ["gfx90a"] * 2, [True] * 2, "0x87fc3ea34b2236f3", "6.8.5"),
    ("amd/rocm_smi_mi300x_x8.json", ["AMD Instinct MI300X"] * 8, [196592] * 8, ["gfx942"] * 8, [True] * 8,
     None, None),
    # APU: no VRAM keys in the output
    ("amd/rocm_smi_mi300a_x4_novram.json", ["AMD Instinct MI300A"] * 4, [0] * 4, ["gfx942"] * 4, [True] * 4,
     None, "6.16.13"),
    ("amd/rocm_smi_rx6800_raphael.json", ["Navi 21 [Radeon RX 6800/6800 XT / 6900 XT]", "Raphael"], [16368, 64],
     ["gfx1030", "gfx1036"], [False, False], "0x9246____________", None),
    # ROCm 4.0: the PCI device ID where the name belongs, the subsystem ID as "Card model", no VRAM asked
    ("amd/rocm_smi_mi100_0x738c.json", ["AMD Instinct MI100"], [0], ["gfx908"], [True], None, None),
    # MI100 named by its chip and product; gfx908 has bf16
    ("amd/rocm_smi_mi100_x2_arcturus.json", ["Arcturus GL-XL [AMD Instinct MI100]"] * 2, [0, 0], ["gfx908"] * 2,
     [True] * 2, None, "4.18.0-348.12.2.el8_5.x86_64"),
    # ROCm 6.0 printed the stepping in decimal: "gfx9010" is gfx90a
    ("amd/rocm_smi_mi250x_gfx9010.json", ["AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2"], [0], ["gfx90a"], [True],
     None, None),
    # a 'GPU[0] ...' line (which holds the JSON '[0]') before the JSON
    ("amd/rocm_smi_gpu0_line_before_json.txt", ["Radeon RX 7900 XT"], [20464], ["gfx1100"], [True], None, None),
]


@pytest.mark.parametrize("path,names,memory,archs,bf16,uuid0,driver", ROCM_SMI_CASES,
                         ids=[case[0] for case in ROCM_SMI_CASES])
def test_parse_rocm_smi_json(path, names, memory, archs, bf16, uuid0, driver):
    text = fixture(path)
    gpus = gf.parse_rocm_smi_json(text)
    assert [g["index"] for g in gpus] == list(range(len(names)))
    assert [g["name"] for g in gpus] == names
    assert [g["memory_mib"] for g in gpus] == memory
    assert [g["arch"] for g in gpus] == archs
    assert [g["bf16"] for g in gpus] == bf16
    assert {g["vendor"] for g in gpus} == {"amd"}
    assert {g["compute_capability"] for g in gpus} == {None}
    assert gpus[0]["uuid"] == uuid0
    assert gf.rocm_smi_driver_version(text) == driver


AMD_SMI_CASES = [
    ("amd/amd_smi_static_mi210.json", ["AMD Instinct MI210"], [65520], ["gfx90a"], [True],
     "in-kernel amdgpu (Linux 6.14.0-24-generic)"),
    ("amd/amd_smi_static_mi350x_x2.json", ["AMD Instinct MI350X"] * 2, [294896] * 2, ["gfx950"] * 2, [True] * 2,
     "6.18.3"),
    # a permission notice before the JSON, and an answer without vram or arch
    ("amd/amd_smi_static_permission_preamble.txt", ["AMD Instinct MI300X"], [0], ["gfx942"], [True], None),
]


@pytest.mark.parametrize("path,names,memory,archs,bf16,driver", AMD_SMI_CASES, ids=[case[0] for case in AMD_SMI_CASES])
def test_parse_amd_smi_json(path, names, memory, archs, bf16, driver):
    text = fixture(path)
    gpus = gf.parse_amd_smi_json(text)
    assert [g["index"] for g in gpus] == list(range(len(names)))
    assert [g["name"] for g in gpus] == names
    assert [g["memory_mib"] for g in gpus] == memory
    assert [g["arch"] for g in gpus] == archs
    assert [g["bf16"] for g in gpus] == bf16
    assert gf.amd_smi_driver_version(text) == driver


def test_parse_amd_smi_json_without_json_raises():
    with pytest.raises(ValueError):
        gf.parse_amd_smi_json(fixture("amd/amd_smi_no_amdgpu.rc255.txt"))


def test_parse_rocm_smi_json_without_json_raises():
    with pytest.raises(ValueError):
        gf.parse_rocm_smi_json(fixture("amd/rocm_smi_no_json_data.txt"))


@pytest.mark.parametrize("text,value", [
    ("GPU[0]\t\t: Not supported on the given system\n", None),  # '[0]' is JSON but no answer
    ("GPU[0]\t\t: Not supported\n{\"card0\": {}}\n", {"card0": {}}),
    ("ERROR: 2 GPU[0]: % memory use: RSMI_STATUS_NOT_SUPPORTED\n[{\"gpu\": 0}]", [{"gpu": 0}]),
    ("Permission needed [x]\n[]\n", []),
])
def test_json_from_skips_warning_lines(text, value):
    if value is None:
        with pytest.raises(ValueError):
            gf._json_from(text)
    else:
        assert gf._json_from(text) == value


# rocm-smi card fields as real versions printed them (values from the fixtures' sources): name, arch
@pytest.mark.parametrize("card,name,arch", [
    ({"Card series": "0x738c", "Card model": "0xc34", "Card SKU": "D34314"}, "AMD Instinct MI100", "gfx908"),
    ({"Card SKU": "D34314"}, "AMD Instinct MI100", "gfx908"),  # SKU only
    ({"Card series": "D34316"}, "AMD Instinct MI100", "gfx908"),  # SKU where the name belongs
    ({"Card Series": "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2", "Card Model": "0x7408", "GFX Version": "gfx9010"},
     "AMD INSTINCT MI200 (MCM) OAM LC MBA HPE C2", "gfx90a"),
    ({"Card Model": "0x7408", "Card SKU": "D65201"}, "AMD Instinct MI250X", "gfx90a"),
    ({"Card series": "Instinct MI210", "Card model": "0x0c34"}, "Instinct MI210", "gfx90a"),  # 0x0c34: subsystem
    ({"Device Name": "AMD Instinct MI300A", "Device ID": "0x74a0", "GFX Version": "gfx942"}, "AMD Instinct MI300A",
     "gfx942"),
    ({"Card Series": "0x74a5"}, "AMD Instinct MI325X", "gfx942"),
    ({"Card Model": "0x66a1"}, "AMD Radeon Pro VII/Radeon Instinct MI50", "gfx906"),
    ({"Card Model": "0x7448"}, "AMD Radeon Pro W7900", "gfx1100"),
    ({"Card Model": "0x73a3"}, "AMD Radeon PRO W6800", "gfx1030"),
    ({"Card series": "Fiji [Radeon R9 FURY / NANO Series]", "Card model": "Radeon R9 FURY X", "Card SKU": "C88001"},
     "Fiji [Radeon R9 FURY / NANO Series]", None),
    ({"Card SKU": "N/A", "Card Model": "0x1234"}, "AMD GPU", None),
])
def test_amd_rocm_card(card, name, arch):
    assert gf.amd_rocm_card(card) == (name, arch)


@pytest.mark.parametrize("value,arch", [("gfx9010", "gfx90a"), ("gfx90a", "gfx90a"), ("gfx942", "gfx942"),
                                        ("gfx1100", "gfx1100"), ("GFX908", "gfx908"), ("N/A", None), (None, None)])
def test_amd_normalize_gfx(value, arch):
    assert gf.amd_normalize_gfx(value) == arch


# the list: Instinct MI50/MI60 gfx906, MI100 gfx908, MI210/MI250/MI250X gfx90a, MI300A/MI300X/MI325X gfx942,
# Radeon Pro W6800/W7900
@pytest.mark.parametrize("device_id,name,arch", [
    ("66a0", "AMD Radeon Pro/Radeon Instinct (Vega 20)", "gfx906"), ("66a1", "AMD Radeon Pro VII/Radeon Instinct MI50",
                                                                     "gfx906"),
    ("738c", "AMD Instinct MI100", "gfx908"), ("740f", "AMD Instinct MI210", "gfx90a"),
    ("740c", "AMD Instinct MI250X/MI250", "gfx90a"), ("7408", "AMD Instinct MI250X", "gfx90a"),
    ("74a0", "AMD Instinct MI300A", "gfx942"), ("74a1", "AMD Instinct MI300X", "gfx942"),
    ("74a5", "AMD Instinct MI325X", "gfx942"), ("75a3", "AMD Instinct MI355X", "gfx950"),
    ("73a3", "AMD Radeon PRO W6800", "gfx1030"), ("7448", "AMD Radeon Pro W7900", "gfx1100"),
    ("7551", "AMD Radeon AI PRO R9700", "gfx1201"),
])
def test_amd_pci_table(device_id, name, arch):
    assert gf.AMD_PCI[device_id] == (name, arch)
    assert gf.amd_bf16(arch) is (arch not in ("gfx906", "gfx1030"))


@pytest.mark.parametrize("size,mib", [
    ({"value": 65520, "unit": "MB"}, 65520), ("65520 MB", 65520), (65520, 65520), ({"value": 64, "unit": "GB"}, 65536),
    ({"value": "N/A", "unit": "MB"}, None),
])
def test_amd_smi_size_units(size, mib):
    assert gf._mib_from_value_unit(size) == mib


@pytest.mark.parametrize("arch,bf16", [
    ("gfx90a", True), ("gfx942", True), ("gfx950", True), ("gfx1100", True), ("gfx1101", True), ("gfx1201", True),
    ("gfx908", True), ("gfx906", False), ("gfx1030", False), ("gfx1036", False), ("gfx900", False), (None, False),
])
def test_amd_bf16(arch, bf16):
    assert gf.amd_bf16(arch) is bf16


@pytest.mark.parametrize("name,arch", [
    ("AMD Instinct MI250X", "gfx90a"), ("AMD Instinct MI210", "gfx90a"), ("AMD Instinct MI300X", "gfx942"),
    ("AMD Instinct MI325X", "gfx942"), ("AMD Instinct MI355X", "gfx950"), ("AMD Instinct MI100", "gfx908"),
    ("Radeon RX 7900 XTX", "gfx1100"), ("AMD Radeon RX 7800 XT", "gfx1101"), ("Unknown board", None),
])
def test_amd_arch_from_name(name, arch):
    assert gf.amd_arch_from_name(name) == arch


@pytest.mark.parametrize("text,version", [("6.2.0-66\n", "6.2.0"), ("7.0.2\n", "7.0.2"), ("", None)])
def test_parse_rocm_version(text, version):
    assert gf.parse_rocm_version(text) == version


# ----------------------------------------------------------------- Intel tables

# fixture, names, memory_mib, bf16, uuid of device 0
XPU_SMI_CASES = [
    ("intel/xpu_smi_discovery_max1100_x2.json", ["Intel(R) Data Center GPU Max 1100"] * 2, [0, 0], [True, True],
     "00000000-0000-0029-0000-002f0bda8086"),
    ("intel/xpu_smi_discovery_d0_max1100.json", ["Intel(R) Data Center GPU Max 1100"], [49136], [True],
     "00000000-0000-0029-0000-002f0bda8086"),
    ("intel/xpu_smi_discovery_d1_max1100.json", ["Intel(R) Data Center GPU Max 1100"], [49136], [True],
     "00000000-0000-009a-0000-002f0bda8086"),
    ("intel/xpu_smi_discovery_max1550.json", ["Intel(R) Data Center GPU Max 1550"], [0], [True],
     "00000000-0000-004b-0000-002f0bd58086"),
    ("intel/xpu_smi_discovery_d0_max1550.json", ["Intel(R) Data Center GPU Max 1550"], [124488], [True],
     "00000000-0000-004b-0000-002f0bd58086"),
    ("intel/xpu_smi_discovery_arc_a770.json", ["Intel(R) Arc(TM) A770 Graphics"], [0], [True],
     "00000000-0000-0003-0000-000856a08086"),
    ("intel/xpu_smi_discovery_d0_arc_a770.json", ["Intel(R) Arc(TM) A770 Graphics"], [16384], [True],
     "00000000-0000-0003-0000-000856a08086"),
    # named only by its PCI ID: an XeHP SDV
    ("intel/xpu_smi_discovery_0x020a.json", ["Intel(R) XeHP SDV (Arctic Sound) [0x020a]"], [0], [True],
     "00000000-0000-0000-0000-020a00008086"),
]


@pytest.mark.parametrize("path,names,memory,bf16,uuid0", XPU_SMI_CASES, ids=[case[0] for case in XPU_SMI_CASES])
def test_parse_xpu_smi_json(path, names, memory, bf16, uuid0):
    gpus = gf.parse_xpu_smi_json(fixture(path))
    assert [g["name"] for g in gpus] == names
    assert [g["memory_mib"] for g in gpus] == memory
    assert [g["bf16"] for g in gpus] == bf16
    assert {g["vendor"] for g in gpus} == {"intel"}
    assert gpus[0]["uuid"] == uuid0


@pytest.mark.parametrize("path,driver", [
    ("intel/xpu_smi_discovery_d0_max1100.json", "I915_23.10.72_PSB_231129.76"),
    ("intel/xpu_smi_discovery_d0_arc_a770.json", "17013219"),
    ("intel/xpu_smi_discovery_max1100_x2.json", None),
])
def test_xpu_smi_driver_version(path, driver):
    assert gf.xpu_smi_driver_version(fixture(path)) == driver


SYCL_LS_CASES = [
    # Level Zero lines win over the OpenCL lines of the same devices
    ("intel/sycl_ls_a770_uhd750.txt", ["Intel(R) Arc(TM) A770 Graphics", "Intel(R) UHD Graphics 750"],
     [True, False], "1.3.26918"),
    ("intel/sycl_ls_max1550_x2.txt", ["Intel(R) Data Center GPU Max 1550"] * 2, [True, True], "1.3.29735"),
    # only OpenCL: counted
    ("intel/sycl_ls_arc_a770_opencl.txt", ["Intel(R) Arc(TM) A770 Graphics"], [True], "23.17.26241.33"),
    ("intel/sycl_ls_cpu_only.txt", [], [], None),
    # oneAPI 2022.1-2024.1 format: [ext_oneapi_level_zero:gpu:0] / [opencl:gpu:2]
    ("intel/sycl_ls_ext_oneapi_a770_uhd630.txt", ["Intel(R) Arc(TM) A770 Graphics", "Intel(R) UHD Graphics 630"],
     [True, False], "1.3.28454"),
    ("intel/sycl_ls_ext_oneapi_a770_26241.txt", ["Intel(R) Arc(TM) A770 Graphics"], [True], "1.3.26241"),
    # ... with devices named only by PCI ID
    ("intel/sycl_ls_ext_oneapi_0x020a.txt", ["Intel(R) XeHP SDV (Arctic Sound) [0x020a]"], [True], "1.3.23061"),
    ("intel/sycl_ls_ext_oneapi_0x0bd5_x4.txt", ["Intel(R) Data Center GPU Max 1550 [0x0bd5]"] * 4, [True] * 4,
     "1.3.24595"),
    ("intel/sycl_ls_b580_uhd770.txt", ["Intel(R) Arc(TM) B580 Graphics [0xe20b]", "Intel(R) UHD Graphics 770"],
     [True, False], "1.3.31294"),
    # oneAPI 2021 format: no device name
    ("intel/sycl_ls_legacy_2021.txt", ["Intel GPU"], [False], "1.1.19792"),
]


@pytest.mark.parametrize("path,names,bf16,driver", SYCL_LS_CASES, ids=[case[0] for case in SYCL_LS_CASES])
def test_parse_sycl_ls(path, names, bf16, driver):
    text = fixture(path)
    gpus = gf.parse_sycl_ls(text)
    assert [g["name"] for g in gpus] == names
    assert [g["bf16"] for g in gpus] == bf16
    assert [g["index"] for g in gpus] == list(range(len(names)))
    assert {g["memory_mib"] for g in gpus} <= {0}
    assert gf.sycl_ls_driver_version(text) == driver


# the two lines of the issue, one of each pre-2024.2 backend spelling: backend, name, driver
@pytest.mark.parametrize("line,backend,name,driver", [
    ("[ext_oneapi_level_zero:gpu:0] Intel(R) Level-Zero, Intel(R) Arc(TM) A770 Graphics 1.3 [1.3.26241]",
     "level_zero", "Intel(R) Arc(TM) A770 Graphics", "1.3.26241"),
    ("[opencl:gpu:2] Intel(R) OpenCL Graphics, Intel(R) UHD Graphics 770 OpenCL 3.0 NEO  [23.17.26241.33]",
     "opencl", "Intel(R) UHD Graphics 770", "23.17.26241.33"),
    ("[opencl:gpu:2] Intel(R) OpenCL HD Graphics, Intel(R) UHD Graphics 770 [0x4680] 3.0 [22.28.23726.1]",
     "opencl", "Intel(R) UHD Graphics 770 [0x4680]", "22.28.23726.1"),
    ("[level_zero:0] GPU : Intel(R) Level-Zero 1.3 [1.3.23726]", "level_zero", None, "1.3.23726"),
])
def test_sycl_ls_line_formats(line, backend, name, driver):
    entry = gf._sycl_ls_line(line)
    assert (entry["backend"], entry["name"], entry["driver"]) == (backend, name, driver)


@pytest.mark.parametrize("line", [
    "[ext_oneapi_cuda:gpu:0] NVIDIA CUDA BACKEND, Quadro P400 0.0 [CUDA 12.2]",
    "[opencl:cpu:1] Intel(R) OpenCL, Intel(R) Core(TM) i5-8350U CPU @ 1.70GHz 3.0 [2022.14.7.0.30_160000]",
    "[host:host:0] SYCL host platform, SYCL host device 1.2 [1.2]",
    "[opencl:0] CPU : Intel(R) OpenCL 2.1 [2020.11.11.0.03_160000]",
])
def test_sycl_ls_non_intel_gpu_lines_are_recognized_but_not_counted(line):
    assert gf.parse_sycl_ls(line) == []


def test_parse_sycl_ls_without_a_sycl_ls_line_raises():
    with pytest.raises(ValueError):
        gf.parse_sycl_ls(fixture("intel/sycl_ls_selector_warning_only.txt"))
    assert gf.parse_sycl_ls("") == []


@pytest.mark.parametrize("name,pci_device_id,result", [
    ("Intel(R) Graphics [0x020a]", None, ("Intel(R) XeHP SDV (Arctic Sound) [0x020a]", True)),
    ("Intel(R) Graphics [0x0bd5]", None, ("Intel(R) Data Center GPU Max 1550 [0x0bd5]", True)),
    ("Intel(R) Graphics [0x0bda]", None, ("Intel(R) Data Center GPU Max 1100 [0x0bda]", True)),
    ("Intel(R) Graphics [0x56c0]", None, ("Intel(R) Data Center GPU Flex 170 [0x56c0]", True)),
    ("Intel(R) Graphics [0x56c1]", None, ("Intel(R) Data Center GPU Flex 140 [0x56c1]", True)),
    ("Intel(R) Graphics [0x56a0]", None, ("Intel(R) Arc(TM) A770 Graphics [0x56a0]", True)),
    ("Intel(R) Graphics [0x4905]", None, ("Intel(R) Iris(R) Xe MAX Graphics (DG1) [0x4905]", False)),
    ("Intel(R) Data Center GPU Max 1100", "0xbda", ("Intel(R) Data Center GPU Max 1100", True)),
    ("Intel(R) UHD Graphics 770 [0x4680]", None, ("Intel(R) UHD Graphics 770 [0x4680]", False)),
    ("Intel(R) Graphics [0x3e92]", None, ("Intel(R) Graphics [0x3e92]", False)),
    (None, None, ("Intel GPU", False)),
])
def test_intel_device(name, pci_device_id, result):
    assert gf.intel_device(name, pci_device_id) == result


def test_parse_clinfo_list_keeps_only_intel_gpus():
    gpus = gf.parse_clinfo_list(fixture("intel/clinfo_l_rtx3090_uhd750.txt"))
    assert [(g["index"], g["name"], g["bf16"]) for g in gpus] == [(0, "Intel(R) UHD Graphics 750", False)]


def test_parse_clinfo_list_without_platforms_raises():
    with pytest.raises(ValueError):
        gf.parse_clinfo_list(fixture("amd/rocm_smi_no_json_data.txt"))


@pytest.mark.parametrize("name,bf16", [
    ("Intel(R) Data Center GPU Max 1550", True), ("Intel(R) Arc(TM) A770 Graphics", True),
    ("Intel(R) Arc(TM) Pro B60 Graphics", True), ("Intel(R) Data Center GPU Flex 170", True),
    ("Intel(R) UHD Graphics 750", False), ("Intel(R) Iris(R) Xe Graphics", False),
])
def test_intel_bf16(name, bf16):
    assert gf.intel_bf16(name) is bf16


# ------------------------------------------------------------------ PCI inventory

# fixture, [(slot, vendor, vendor_id, device_id, class, name, driver)] of the GPU-class devices,
# {vendor: count} of those that make the host a GPU host (pci_is_gpu)
LSPCI_CASES = [
    # fresh install: the NVIDIA card has no driver bound; the desktop's iGPU does not count
    ("pci/lspci_nnkq_gt1030_uhd630.txt", [
        ("0000:00:02.0", "intel", "8086", "3e92", "0300", "CoffeeLake-S GT2 [UHD Graphics 630]", "i915"),
        ("0000:01:00.0", "nvidia", "10de", "1d01", "0300", "GP108 [GeForce GT 1030]", None)], {"nvidia": 1}),
    ("pci/lspci_nnk_grep_2x_rtx3090.txt", [
        ("0000:05:00.0", "nvidia", "10de", "2204", "0300", "GA102 [GeForce RTX 3090]", "nvidia"),
        ("0000:0a:00.0", "nvidia", "10de", "2204", "0300", "GA102 [GeForce RTX 3090]", "nvidia")], {"nvidia": 2}),
    ("pci/lspci_nn_D_grep_4x_max1550.txt", [
        ("0000:%s:00.0" % bus, "intel", "8086", "0bd5", "0380", "Ponte Vecchio 1T", None)
        for bus in ("29", "3a", "9a", "ca")], {"intel": 4}),
    ("pci/lspci_nn_mi300x.txt", [
        ("0000:dd:00.0", "amd", "1002", "74a1", "1200", "Aqua Vanjaram [Instinct MI300X]", None)], {"amd": 1}),
    # the VF is bound to vfio-pci for a virtual machine and does not count
    ("pci/lspci_nnk_grep_mi300x_pf_vf.txt", [
        ("0000:85:00.0", "amd", "1002", "74a1", "1200", "Aqua Vanjaram [Instinct MI300X]", "gim"),
        ("0000:85:02.0", "amd", "1002", "74b5", "1200", "Aqua Vanjaram [Instinct MI300X VF]", "vfio-pci")],
     {"amd": 1}),
    # an ID this lspci's pci.ids does not know ("Device"); QEMU's VGA is no GPU
    ("pci/lspci_nn_qemu_amd_75c1.txt", [
        ("0000:00:01.0", "other", "1234", "1111", "0300", "PCI device 1234:1111", None),
        ("0000:00:06.0", "amd", "1002", "75c1", "1200", "PCI device 1002:75c1", None)], {"amd": 1}),
    # a laptop: the AMD APU's graphics do not count
    ("pci/lspci_Dnn_rtx3050ti_rembrandt.txt", [
        ("0000:01:00.0", "nvidia", "10de", "25a0", "0300", "GA107M [GeForce RTX 3050 Ti Mobile]", None),
        ("0000:74:00.0", "amd", "1002", "1681", "0300", "Rembrandt", None)], {"nvidia": 1}),
    ("pci/lspci_nn_vm_cirrus.txt", [
        ("0000:00:02.0", "other", "1013", "00b8", "0300", "Cirrus Logic GD 5446", None)], {}),
]
PCI_KEYS = ("slot", "vendor", "vendor_id", "device_id", "class", "name", "driver")


@pytest.mark.parametrize("path,devices,gpus", LSPCI_CASES, ids=[case[0] for case in LSPCI_CASES])
def test_parse_lspci(path, devices, gpus):
    pci = gf.parse_lspci(fixture(path))
    assert pci == [dict(zip(PCI_KEYS, device)) for device in devices]
    assert {vendor: len(gf.pci_gpus(pci, vendor)) for vendor in ("nvidia", "amd", "intel")
            if gf.pci_gpus(pci, vendor)} == gpus


def test_parse_lspci_rejects_other_output():
    with pytest.raises(ValueError):
        gf.parse_lspci(fixture("nvidia/no_devices.rc6.txt"))
    assert gf.parse_lspci("") == []


@pytest.mark.parametrize("path", ["pci/lspci_nnkq_gt1030_uhd630.txt", "pci/lspci_nnk_grep_mi300x_pf_vf.txt",
                                  "pci/lspci_nn_D_grep_4x_max1550.txt"])
def test_sysfs_inventory_matches_lspci(tmp_path, path):
    """sysfs (no lspci) lists the same devices and drivers; names only come from the AMD/Intel tables."""
    root = fakes.write_fake_sysfs(tmp_path / "pci", FIXTURES / path)
    from_lspci = gf.parse_lspci(fixture(path))
    from_sysfs = gf.read_sysfs_pci(str(root))
    drop = ("name",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in from_sysfs] == [
        {k: v for k, v in e.items() if k not in drop} for e in from_lspci]
    assert gf.read_sysfs_pci(str(tmp_path / "missing")) is None


def test_sysfs_names_come_from_the_tables(tmp_path):
    root = fakes.write_fake_sysfs(tmp_path / "pci", FIXTURES / "pci/lspci_nn_D_grep_4x_max1550.txt")
    assert {e["name"] for e in gf.read_sysfs_pci(str(root))} == {"Intel(R) Data Center GPU Max 1550"}
    root = fakes.write_fake_sysfs(tmp_path / "pci2", FIXTURES / "pci/lspci_nnkq_gt1030_uhd630.txt")
    assert [e["name"] for e in gf.read_sysfs_pci(str(root))] == ["PCI device 8086:3e92", "PCI device 10de:1d01"]


@pytest.mark.parametrize("notes,reason", [
    (["nvidia-smi not found"], "nvidia-smi not found"),
    (["amd-smi not found", "rocm-smi not found"], "amd-smi and rocm-smi not found"),
    (["xpu-smi not found", "sycl-ls not found", "clinfo not found"], "xpu-smi, sycl-ls and clinfo not found"),
    (["amd-smi not found", "rocm-smi failed: ERROR: x"], "amd-smi not found; rocm-smi failed: ERROR: x"),
])
def test_join_reasons(notes, reason):
    assert gf.join_reasons(notes) == reason


def test_undriven_summary_and_warning():
    pci = gf.parse_lspci(fixture("pci/lspci_nnk_grep_2x_rtx3090.txt"))
    undriven = gf.undriven_gpus(pci, set(), {"nvidia": "nvidia-smi not found"})
    assert undriven == [{"vendor": "nvidia", "count": 2, "names": ["GA102 [GeForce RTX 3090]"] * 2,
                         "reason": "nvidia-smi not found"}]
    assert gf.undriven_warning(undriven[0], pci, "lspci") == (
        "2 NVIDIA GPUs present (lspci: 10de:2204 GA102 [GeForce RTX 3090] at 0000:05:00.0, kernel driver nvidia, "
        "10de:2204 GA102 [GeForce RTX 3090] at 0000:0a:00.0, kernel driver nvidia), no driver answers: "
        "nvidia-smi not found; install the driver (setup.yml with drivers_install: true).")
    assert gf.undriven_gpus(pci, {"nvidia"}, {}) == []


# ------------------------------------------------------------------- CPU tables

CPUINFO_CASES = [
    ("cpu/cpuinfo_xeon_8488c_spr.txt", "Intel(R) Xeon(R) Platinum 8488C", True),
    ("cpu/cpuinfo_local_xeon_avx512bf16.txt", "Intel(R) Xeon(R) Processor", True),
    ("cpu/cpuinfo_xeon_e5_2680v4.txt", "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", False),
    ("cpu/cpuinfo_graviton1_a72.txt", "Cortex-A72", False),
    ("cpu/cpuinfo_neoverse_v3ae.txt", "Neoverse-V3AE", True),
]


@pytest.mark.parametrize("path,model,bf16", CPUINFO_CASES, ids=[case[0] for case in CPUINFO_CASES])
def test_parse_cpuinfo(path, model, bf16):
    assert gf.parse_cpuinfo(fixture(path)) == {"model": model, "bf16": bf16}


def test_parse_meminfo():
    assert gf.parse_meminfo(fixture("cpu/meminfo_local.txt")) == 24684092 // 1024
    assert gf.parse_meminfo("") == 0


# -------------------------------------------------------------- select_gpus


FOUR = gf.parse_nvidia_smi_csv(fixture("nvidia/a100_sxm4_80gb_x4_mig0.csv"))


@pytest.mark.parametrize("spec,indices", [("", [0, 1, 2, 3]), (None, [0, 1, 2, 3]), ("0,2", [0, 2]),
                                          (" 3 , 1 ", [3, 1]), ("2", [2])])
def test_select_gpus(spec, indices):
    selected, error = gf.select_gpus(FOUR, spec)
    assert error is None
    assert [g["index"] for g in selected] == indices


@pytest.mark.parametrize("spec,words", [
    ("0,4", ["device(s) 4", "0, 1, 2, 3", "host_vars"]),
    ("0,a", ["'a' is not a device index", "0, 1, 2, 3", "host_vars"]),
    ("1,1", ["device 1 twice", "host_vars"]),
])
def test_select_gpus_errors(spec, words):
    selected, error = gf.select_gpus(FOUR, spec)
    assert selected == []
    for word in words:
        assert word in error


def test_select_gpus_on_a_cpu_host_says_there_are_none():
    selected, error = gf.select_gpus([], "0")
    assert selected == [] and "no GPU was detected" in error


# ------------------------------------------------------ every fixture is used


def test_every_fixture_is_tested_and_sourced():
    sources = (FIXTURES / "SOURCES.md").read_text()
    on_disk = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*")
               if p.is_file() and p.suffix in (".csv", ".txt", ".json") and p.parent != FIXTURES}
    referenced = {case[0] for case in NVIDIA_CASES + ROCM_SMI_CASES + AMD_SMI_CASES
                                       + XPU_SMI_CASES + SYCL_LS_CASES + CPUINFO_CASES + LSPCI_CASES}
    referenced |= {case[0] for case in NVIDIA_FAILURES}
    referenced |= {"nvidia/header_a100_535.txt", "nvidia/header_rtx5090_610.txt", "amd/amd_smi_no_amdgpu.rc255.txt",
                   "intel/clinfo_l_rtx3090_uhd750.txt", "cpu/meminfo_local.txt", "amd/rocm_smi_no_json_data.txt",
                   "intel/sycl_ls_selector_warning_only.txt"}
    assert on_disk - referenced == set()
    assert [name for name in sorted(on_disk) if Path(name).name not in sources] == []


# ----------------------------------------------------- end to end (subprocess)


@pytest.fixture
def run_module(tmp_path):
    """Run gpu_facts.py as Ansible runs a module, with only the given fake tools on PATH."""

    def run(tools, **params):
        # a recorded lspci of a VM without GPUs unless the test gives one ("lspci": None: no lspci), and a
        # sysfs root without devices unless the test gives one: the real host's PCI bus never leaks in
        tools = dict(tools)
        lspci = tools.pop("lspci", "tests/fixtures/gpu/pci/lspci_nn_vm_cirrus.txt")
        if lspci:
            tools["lspci"] = {fakes.LSPCI: lspci}
        params.setdefault("pci_sysfs_root", str(tmp_path / "no-sysfs"))
        bin_dir = fakes.write_fake_tools(tmp_path / "bin", tools)
        (tmp_path / "sys").mkdir(exist_ok=True)
        timeout_link = tmp_path / "sys" / "timeout"
        if not timeout_link.exists():
            timeout_link.symlink_to(shutil.which("timeout"))
        args = tmp_path / "args.json"
        check_mode = params.pop("check_mode", False)
        args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": dict(params, _ansible_check_mode=check_mode)}))
        env = dict(os.environ, PATH=os.pathsep.join([str(bin_dir), str(tmp_path / "sys")]))
        proc = subprocess.run([sys.executable, str(MODULE_PATH), str(args)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.stdout, proc.stderr
        return json.loads(proc.stdout)

    return run


A100_NVIDIA_SMI = {fakes.NVIDIA_QUERY: "tests/fixtures/gpu/nvidia/a100_sxm4_80gb_x4_mig0.csv",
                   fakes.NVIDIA_HEADER: "tests/fixtures/gpu/nvidia/header_a100_535.txt"}


def test_e2e_nvidia_all_gpus_with_mig_warning(run_module):
    result = run_module({"nvidia-smi": A100_NVIDIA_SMI})
    assert result["changed"] is False
    facts = result["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "nvidia" and facts["tool"] == "nvidia-smi"
    assert facts["driver_version"] == "535.216.01" and facts["runtime_version"] == "12.2"
    assert [g["index"] for g in facts["gpus"]] == [0, 1, 2, 3]
    assert [g["mig"] for g in facts["gpus"]] == [True, False, False, False]
    assert all(g["bf16"] and g["memory_mib"] == 81920 for g in facts["gpus"])
    assert any("MIG enabled" in w and "separate ranks" in w for w in facts["warnings"])
    assert "has MIG enabled" in json.dumps(result["warnings"])  # also sent through module.warn
    assert facts["cpu"]["cores"] == len(os.sched_getaffinity(0))
    assert facts["cpu"]["memory_mib"] > 0 and facts["cpu"]["model"]


def test_e2e_nvidia_selection_and_check_mode(run_module):
    tools = {"nvidia-smi": A100_NVIDIA_SMI}
    facts = run_module(tools, gpus="3,1", check_mode=True)["ansible_facts"]["dsfleet_gpu"]
    assert [g["index"] for g in facts["gpus"]] == [3, 1]
    assert [g["uuid"] for g in facts["gpus"]] == ["GPU-69ec2344-ebac-b028-f88f-452abb3d7f11",
                                                   "GPU-d8594bd4-0fc3-8595-e355-7c98138f3b95"]
    assert not any("MIG" in w for w in facts["warnings"])  # the MIG GPU 0 is not used


def test_e2e_missing_index_fails_naming_real_indices(run_module):
    tools = {"nvidia-smi": A100_NVIDIA_SMI}
    result = run_module(tools, gpus="0,4")
    assert result["failed"] is True
    assert "0, 1, 2, 3" in result["msg"] and "host_vars" in result["msg"]


def test_e2e_old_driver_retries_without_compute_cap(run_module):
    tools = {"nvidia-smi": {
        fakes.NVIDIA_QUERY: "tests/fixtures/gpu/nvidia/compute_cap_invalid.rc2.txt",
        fakes.NVIDIA_QUERY_NO_CC: "tests/fixtures/gpu/nvidia/v100_sxm2_16gb_470_nocc.csv",
    }}
    facts = run_module(tools)["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "nvidia" and facts["driver_version"] == "470.182.03"
    assert [(g["name"], g["compute_capability"], g["bf16"]) for g in facts["gpus"]] == [
        ("Tesla V100-SXM2-16GB", "7.0", False)]
    assert facts["runtime_version"] is None  # the fake has no header for this host
    assert any("older than 510" in w for w in facts["warnings"])


def test_e2e_broken_nvidia_falls_through_to_amd(run_module):
    tools = {"nvidia-smi": "tests/fixtures/gpu/nvidia/driver_mismatch.rc18.txt",
             "rocm-smi": {fakes.ROCM_SMI_QUERY: "tests/fixtures/gpu/amd/rocm_smi_mi300x_x8.json"}}
    result = run_module(tools, gpus="0,7")
    facts = result["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "amd" and facts["tool"] == "rocm-smi"
    assert [(g["index"], g["arch"], g["memory_mib"], g["bf16"]) for g in facts["gpus"]] == [
        (0, "gfx942", 196592, True), (7, "gfx942", 196592, True)]
    assert any("version mismatch" in w and "reboot" in w for w in facts["warnings"])


def test_e2e_amd_smi_failure_falls_back_to_rocm_smi(run_module):
    tools = {"amd-smi": "tests/fixtures/gpu/amd/amd_smi_no_amdgpu.rc255.txt",
             "rocm-smi": {fakes.ROCM_SMI_QUERY: "tests/fixtures/gpu/amd/rocm_smi_rx7900xt.json"}}
    facts = run_module(tools)["ansible_facts"]["dsfleet_gpu"]
    assert facts["tool"] == "rocm-smi"
    assert [(g["name"], g["arch"], g["bf16"]) for g in facts["gpus"]] == [("Radeon RX 7900 XT", "gfx1100", True)]
    assert any(w.startswith("amd-smi failed (exit 255)") and "render" in w for w in facts["warnings"])


def test_e2e_amd_smi(run_module):
    tools = {"amd-smi": {fakes.AMD_SMI_STATIC: "tests/fixtures/gpu/amd/amd_smi_static_mi350x_x2.json"}}
    facts = run_module(tools)["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "amd" and facts["tool"] == "amd-smi" and facts["driver_version"] == "6.18.3"
    assert [(g["index"], g["arch"], g["memory_mib"]) for g in facts["gpus"]] == [(0, "gfx950", 294896),
                                                                                  (1, "gfx950", 294896)]


def test_e2e_amd_apu_without_vram_warns(run_module):
    tools = {"rocm-smi": "tests/fixtures/gpu/amd/rocm_smi_mi300a_x4_novram.json"}
    facts = run_module(tools)["ansible_facts"]["dsfleet_gpu"]
    assert len(facts["gpus"]) == 4 and facts["driver_version"] == "6.16.13"
    assert sum("reports no memory size" in w for w in facts["warnings"]) == 4


def test_e2e_intel_xpu_smi_per_device_memory(run_module):
    tools = {"xpu-smi": {
        fakes.XPU_SMI_LIST: "tests/fixtures/gpu/intel/xpu_smi_discovery_max1100_x2.json",
        fakes.xpu_smi_device(0): "tests/fixtures/gpu/intel/xpu_smi_discovery_d0_max1100.json",
        fakes.xpu_smi_device(1): "tests/fixtures/gpu/intel/xpu_smi_discovery_d1_max1100.json",
    }}
    facts = run_module(tools)["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "intel" and facts["tool"] == "xpu-smi"
    assert facts["driver_version"] == "I915_23.10.72_PSB_231129.76"
    assert [(g["index"], g["memory_mib"], g["bf16"]) for g in facts["gpus"]] == [(0, 49136, True), (1, 49136, True)]
    assert facts["warnings"] == []


def test_e2e_intel_sycl_ls_fallback(run_module):
    facts = run_module({"sycl-ls": "tests/fixtures/gpu/intel/sycl_ls_a770_uhd750.txt"})["ansible_facts"]["dsfleet_gpu"]
    assert facts["tool"] == "sycl-ls" and facts["driver_version"] == "1.3.26918"
    assert [(g["name"], g["bf16"], g["memory_mib"]) for g in facts["gpus"]] == [
        ("Intel(R) Arc(TM) A770 Graphics", True, 0), ("Intel(R) UHD Graphics 750", False, 0)]
    assert any("does not report device memory" in w for w in facts["warnings"])


def test_e2e_intel_clinfo_fallback(run_module):
    tools = {"sycl-ls": "tests/fixtures/gpu/intel/sycl_ls_cpu_only.txt",
             "clinfo": {fakes.CLINFO_LIST: "tests/fixtures/gpu/intel/clinfo_l_rtx3090_uhd750.txt"}}
    facts = run_module(tools)["ansible_facts"]["dsfleet_gpu"]
    assert facts["tool"] == "clinfo"
    assert [g["name"] for g in facts["gpus"]] == ["Intel(R) UHD Graphics 750"]


@pytest.mark.parametrize("nvidia_fixture,words", [
    ("nvidia/no_devices.rc6.txt", "finds no NVIDIA GPU"),
    ("nvidia/driver_not_loaded.rc9.txt", "cannot talk to the NVIDIA driver"),
    ("nvidia/no_supported_gpus.rc255.txt", "finds no NVIDIA GPU"),
])
def test_e2e_failing_nvidia_only_gives_cpu(run_module, nvidia_fixture, words):
    result = run_module({"nvidia-smi": "tests/fixtures/gpu/" + nvidia_fixture})
    facts = result["ansible_facts"]["dsfleet_gpu"]
    assert result["changed"] is False and "failed" not in result
    assert facts["accelerator"] == "cpu" and facts["tool"] is None and facts["gpus"] == []
    assert facts["driver_version"] is None and facts["runtime_version"] is None
    assert len(facts["warnings"]) == 1 and words in facts["warnings"][0]


def test_e2e_no_tools_is_a_cpu_host(run_module):
    facts = run_module({})["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "cpu" and facts["gpus"] == [] and facts["warnings"] == []
    expected = gf.parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    assert facts["cpu"] == {"model": expected["model"], "cores": len(os.sched_getaffinity(0)),
                            "memory_mib": gf.parse_meminfo(Path("/proc/meminfo").read_text()),
                            "bf16": expected["bf16"]}


def test_e2e_cpu_host_with_gpus_set_fails(run_module):
    result = run_module({}, gpus="0")
    assert result["failed"] is True and "no GPU was detected" in result["msg"]


GT1030_HOST = "tests/fixtures/gpu/pci/lspci_nnkq_gt1030_uhd630.txt"


def test_e2e_gpu_without_driver_is_not_a_silent_cpu_host(run_module):
    facts = run_module({"lspci": GT1030_HOST})["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "cpu" and facts["gpus"] == []
    assert [(e["slot"], e["vendor"], e["device_id"], e["driver"]) for e in facts["pci"]] == [
        ("0000:00:02.0", "intel", "3e92", "i915"), ("0000:01:00.0", "nvidia", "1d01", None)]
    assert facts["undriven"] == [{"vendor": "nvidia", "count": 1, "names": ["GP108 [GeForce GT 1030]"],
                                  "reason": "nvidia-smi not found"}]
    assert facts["warnings"] == [
        "1 NVIDIA GPU present (lspci: 10de:1d01 GP108 [GeForce GT 1030] at 0000:01:00.0, kernel driver none), no "
        "driver answers: nvidia-smi not found; install the driver (setup.yml with drivers_install: true)."]


def test_e2e_gpu_without_driver_from_sysfs(run_module, tmp_path):
    sysfs = fakes.write_fake_sysfs(tmp_path / "sys-pci", GT1030_HOST)
    facts = run_module({"lspci": None}, pci_sysfs_root=str(sysfs))["ansible_facts"]["dsfleet_gpu"]
    assert [(e["slot"], e["name"], e["driver"]) for e in facts["pci"]] == [
        ("0000:00:02.0", "PCI device 8086:3e92", "i915"), ("0000:01:00.0", "PCI device 10de:1d01", None)]
    assert [(u["vendor"], u["count"]) for u in facts["undriven"]] == [("nvidia", 1)]
    assert facts["warnings"][0].startswith("1 NVIDIA GPU present (sysfs: 10de:1d01 PCI device 10de:1d01 at 0000:01:00.0")


def test_e2e_failing_tool_is_the_undriven_reason(run_module):
    facts = run_module({"lspci": "tests/fixtures/gpu/pci/lspci_nnk_grep_2x_rtx3090.txt",
                        "nvidia-smi": "tests/fixtures/gpu/nvidia/driver_not_loaded.rc9.txt"})["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "cpu"
    [summary] = facts["undriven"]
    assert summary["count"] == 2 and summary["reason"].startswith(
        "nvidia-smi failed: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    assert facts["warnings"][-1].startswith("2 NVIDIA GPUs present (lspci: 10de:2204 GA102 [GeForce RTX 3090] at "
                                            "0000:05:00.0, kernel driver nvidia, 10de:2204")


def test_e2e_undriven_is_empty_when_the_tool_answers(run_module):
    facts = run_module({"lspci": "tests/fixtures/gpu/pci/lspci_nnk_grep_2x_rtx3090.txt",
                        "nvidia-smi": A100_NVIDIA_SMI})["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "nvidia" and len(facts["pci"]) == 2 and facts["undriven"] == []


def test_e2e_other_vendor_without_driver_next_to_a_working_one(run_module):
    """Detection stops at NVIDIA; the AMD accelerator on the bus still gets its tools asked."""
    facts = run_module({"lspci": "tests/fixtures/gpu/pci/lspci_nn_qemu_amd_75c1.txt",
                        "nvidia-smi": A100_NVIDIA_SMI})["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "nvidia"
    assert facts["undriven"] == [{"vendor": "amd", "count": 1, "names": ["PCI device 1002:75c1"],
                                  "reason": "amd-smi and rocm-smi not found"}]


@pytest.mark.parametrize("lspci,vendor,count,reason", [
    ("pci/lspci_nnk_grep_mi300x_pf_vf.txt", "amd", 1, "amd-smi and rocm-smi not found"),
    ("pci/lspci_nn_D_grep_4x_max1550.txt", "intel", 4, "xpu-smi, sycl-ls and clinfo not found"),
    ("pci/lspci_Dnn_rtx3050ti_rembrandt.txt", "nvidia", 1, "nvidia-smi not found"),
])
def test_e2e_undriven_per_vendor(run_module, lspci, vendor, count, reason):
    facts = run_module({"lspci": "tests/fixtures/gpu/" + lspci})["ansible_facts"]["dsfleet_gpu"]
    assert [(u["vendor"], u["count"], u["reason"]) for u in facts["undriven"]] == [(vendor, count, reason)]


@pytest.mark.parametrize("answer,warning", [
    ("nvidia/no_devices.rc6.txt", "lspci failed (exit 6): No devices were found; reading "),
    ("amd/rocm_smi_no_json_data.txt", "lspci printed output this module cannot read (no device line of `lspci -nn`); "
                                      "its first line: 'WARNING: No JSON data to report'"),
])
def test_e2e_failing_or_unreadable_lspci_falls_back_to_sysfs(run_module, tmp_path, answer, warning):
    sysfs = fakes.write_fake_sysfs(tmp_path / "sys-pci", GT1030_HOST)
    facts = run_module({"lspci": "tests/fixtures/gpu/" + answer}, pci_sysfs_root=str(sysfs))["ansible_facts"]["dsfleet_gpu"]
    assert facts["warnings"][0].startswith(warning)
    assert [(u["vendor"], u["count"]) for u in facts["undriven"]] == [("nvidia", 1)]
    assert "(sysfs: " in facts["warnings"][1]


@pytest.mark.parametrize("tool,path,first_line", [
    ("sycl-ls", "intel/sycl_ls_selector_warning_only.txt",
     "Warning: ONEAPI_DEVICE_SELECTOR environment variable is set to opencl:cpu;opencl:fpga;level_zero:3."),
    ("rocm-smi", "amd/rocm_smi_no_json_data.txt", "WARNING: No JSON data to report"),
])
def test_e2e_unreadable_answer_names_tool_and_first_line(run_module, tool, path, first_line):
    facts = run_module({tool: "tests/fixtures/gpu/" + path})["ansible_facts"]["dsfleet_gpu"]
    assert facts["accelerator"] == "cpu"
    assert facts["warnings"] == ["%s printed output this module cannot read (%s); its first line: %r. Skipping it."
                                 % (tool, "no line in a format sycl-ls prints" if tool == "sycl-ls"
                                    else "no JSON document in the tool output", first_line)]


def test_e2e_old_sycl_ls_without_device_names(run_module):
    facts = run_module({"sycl-ls": "tests/fixtures/gpu/intel/sycl_ls_legacy_2021.txt"})["ansible_facts"]["dsfleet_gpu"]
    assert facts["tool"] == "sycl-ls" and facts["driver_version"] == "1.1.19792"
    assert [(g["name"], g["bf16"]) for g in facts["gpus"]] == [("Intel GPU", False)]
    assert any("prints no device names" in w for w in facts["warnings"])


def test_e2e_rocm_smi_warning_line_before_json(run_module):
    facts = run_module({"rocm-smi": {fakes.ROCM_SMI_QUERY: "tests/fixtures/gpu/amd/rocm_smi_gpu0_line_before_json.txt"}}
                       )["ansible_facts"]["dsfleet_gpu"]
    assert facts["tool"] == "rocm-smi" and [g["arch"] for g in facts["gpus"]] == ["gfx1100"]
    assert facts["warnings"] == []


def test_e2e_through_ansible(tmp_path):
    """The module loads and runs under ansible itself; its warnings reach the user."""
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        pytest.skip("ansible is not installed next to this python")
    bin_dir = fakes.write_fake_tools(tmp_path / "bin", {"nvidia-smi": A100_NVIDIA_SMI,
                                                        "lspci": "tests/fixtures/gpu/pci/lspci_nn_vm_cirrus.txt"})
    env = dict(os.environ, PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
               ANSIBLE_LIBRARY=str(MODULE_PATH.parent), ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="0", ANSIBLE_NOCOLOR="1",
               # a user without a home directory (the unit tier runs without root) still gets a temp dir
               ANSIBLE_REMOTE_TMP=str(tmp_path / "remote-tmp"), ANSIBLE_LOCAL_TEMP=str(tmp_path / "local-tmp"))
    proc = subprocess.run([str(ansible), "localhost", "-c", "local", "-m", "gpu_facts", "-a", "gpus=2,0 pci_sysfs_root=%s" % (tmp_path / "no-sysfs"),
                           "-e", "ansible_python_interpreter=" + sys.executable],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("localhost | SUCCESS => ")
    result = json.loads(proc.stdout.split(" => ", 1)[1])
    facts = result["ansible_facts"]["dsfleet_gpu"]
    assert [g["index"] for g in facts["gpus"]] == [2, 0]
    assert facts["runtime_version"] == "12.2" and result["changed"] is False
    assert "[WARNING]: GPU 0 (NVIDIA A100-SXM4-80GB) has MIG enabled" in proc.stderr


def test_e2e_ansible_facts_come_in_the_same_call(run_module):
    """gather_subset: the facts the plan needs (network, distribution, env) beside dsfleet_gpu, one call per host;
    none of Ansible's facts without it; a subset no collector has fails naming it."""
    result = run_module({"nvidia-smi": A100_NVIDIA_SMI}, gather_subset=["!all", "!min", "network", "distribution"])
    facts = result["ansible_facts"]
    assert facts["dsfleet_gpu"]["accelerator"] == "nvidia"
    assert "lo" in facts["ansible_interfaces"] and facts["ansible_distribution"]
    assert "ansible_env" not in facts and "ansible_date_time" not in facts   # !min left the minimal facts out
    alone = run_module({"nvidia-smi": A100_NVIDIA_SMI})["ansible_facts"]
    assert sorted(alone) == ["dsfleet_gpu"]
    bad = run_module({"nvidia-smi": A100_NVIDIA_SMI}, gather_subset=["netwrok"])
    assert bad["failed"] and "netwrok" in bad["msg"], bad
