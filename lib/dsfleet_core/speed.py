"""How long one optimizer step takes on a set of devices, estimated from datasheets (pure): what the planner weighs
when it decides whether a slow or small device helps the cluster or holds it back.

DeepSpeed gives every rank the same micro batch and every step waits for the slowest rank, so a cluster of mixed
cards runs at ``world x (speed of its slowest card)``. For each candidate set of devices the planner estimates

    step = compute (slowest device) + gradient/parameter communication + offload traffic

and compares tokens per second. The figures are estimates from peak numbers, good for ratios between candidates
(which is what the decision needs), not a promise of a measured step time:

- compute: training FLOPs per token 6 x active parameters + 12 x layers x hidden x block_size (the attention
  score and context products; Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
  Using Megatron-LM", SC'21, eq. 3, per token), x 4/3 with activation checkpointing (one more forward pass), over
  the device's dense 16-bit tensor peak (fp32 peak for fp32 training) times MODEL_FLOPS_UTILIZATION.
- communication per rank and step: ZeRO-1/2 move what data parallelism moves, 2 x parameters x (n-1)/n in the
  gradient precision (reduce-scatter + all-gather), ZeRO-3 3 x (the parameters all-gathered once more in the
  backward pass): Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
  sections 7.1-7.2. Across hosts over the slowest network link (its speed from the hosts' facts, else
  ASSUMED_NETWORK_GBPS); within one host over PCIe (ASSUMED_PCIE_GBPS; NVLink is not in the facts).
- offload (ZeRO-Offload, Ren et al. 2021): each rank's 16-bit gradients to the host and 16-bit parameters back over
  PCIe, and the host's CPU Adam updating the host's share of the parameters (ASSUMED_CPU_ADAM_PARAMS_PER_S).

DEVICES: dense (no sparsity) peaks from the vendors' datasheets and architecture whitepapers, named in each row.
GeForce cards run 16-bit tensor math with fp32 accumulation, what mixed-precision training uses, at half their
fp16-accumulate rate; their row gives that rate. A device missing from the table has no estimate: the planner then
leaves nothing out for speed (only for memory) and says so.
"""

from __future__ import annotations

import re

MODEL_FLOPS_UTILIZATION = 0.40  # a typical fraction of peak for dense transformer training; the same for all
ASSUMED_NETWORK_GBPS = 10.0     # between hosts, when the facts give no link speed (common 10 GbE)
ASSUMED_PCIE_GBPS = 128.0       # within a host: 16 GB/s, PCIe 3.0 x16 per direction (4.0 x16 doubles it)
ASSUMED_CPU_ADAM_PARAMS_PER_S = 1.0e9  # DeepSpeedCPUAdam on one host's cores, order of magnitude

# (pattern on the device name, dense 16-bit tensor TFLOPS, fp32 TFLOPS, source)
DEVICES = [
    (r"\bB200\b", 2250.0, 75.0, "NVIDIA HGX B200 datasheet (4.5 PF sparse FP16/BF16 per GPU)"),
    (r"\bH200\b.*\bNVL\b", 835.5, 60.0, "NVIDIA H200 Tensor Core GPU datasheet (NVL)"),
    (r"\bH200\b", 989.4, 67.0, "NVIDIA H200 Tensor Core GPU datasheet (SXM)"),
    (r"\bH[18]00\b.*\bPCIe\b", 756.5, 51.2, "NVIDIA H100 Tensor Core GPU datasheet (PCIe; the H800 PCIe alike)"),
    (r"\bH100\b.*\bNVL\b", 835.5, 60.0, "NVIDIA H100 Tensor Core GPU datasheet (NVL)"),
    (r"\bH100\b|\bH800\b", 989.4, 67.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM)"),
    (r"\bH20\b", 148.0, 44.0, "NVIDIA H20 product brief"),
    (r"\bA100\b|\bA800\b", 312.0, 19.5, "NVIDIA A100 Tensor Core GPU datasheet"),
    (r"\bA30\b", 165.0, 10.3, "NVIDIA A30 datasheet"),
    (r"\bA40\b", 149.7, 37.4, "NVIDIA A40 datasheet"),
    (r"\bA10G?\b", 125.0, 31.2, "NVIDIA A10 datasheet"),
    (r"\bL40S\b", 362.05, 91.6, "NVIDIA L40S datasheet"),
    (r"\bL40\b", 181.05, 90.5, "NVIDIA L40 datasheet"),
    (r"\bL4\b", 121.0, 30.3, "NVIDIA L4 datasheet"),
    (r"RTX 6000 Ada", 364.25, 91.1, "NVIDIA RTX 6000 Ada Generation datasheet"),
    (r"RTX A6000", 154.8, 38.7, "NVIDIA RTX A6000 datasheet"),
    (r"RTX 5090", 209.5, 104.8, "NVIDIA RTX Blackwell GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"RTX 4090", 165.2, 82.6, "NVIDIA Ada GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"RTX 3090 Ti", 80.0, 40.0, "NVIDIA Ampere GA102 GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"RTX 3090", 71.0, 35.6, "NVIDIA Ampere GA102 GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"RTX 3080 Ti", 68.2, 34.1, "NVIDIA Ampere GA102 GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"RTX 3080", 59.5, 29.8, "NVIDIA Ampere GA102 GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"RTX 2080 Ti", 53.8, 13.4, "NVIDIA Turing GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"RTX 2080", 40.3, 10.1, "NVIDIA Turing GPU architecture whitepaper (FP16, FP32 accumulate)"),
    (r"\bTITAN V\b", 110.0, 13.8, "NVIDIA TITAN V product page"),
    (r"\bV100S\b", 130.0, 16.4, "NVIDIA V100 datasheet (V100S PCIe)"),
    (r"\bV100\b.*\bPCIE\b", 112.0, 14.0, "NVIDIA V100 datasheet (PCIe)"),
    (r"\bV100\b", 125.0, 15.7, "NVIDIA V100 datasheet (SXM2)"),
    (r"\bT4\b", 65.0, 8.1, "NVIDIA T4 datasheet"),
    # AMD: the MI250/MI250X shows up as two devices (GCDs), each half the package
    (r"\bMI300X\b", 1307.4, 163.4, "AMD Instinct MI300X datasheet"),
    (r"\bMI300A\b", 980.6, 122.6, "AMD Instinct MI300A datasheet"),
    (r"\bMI250X\b", 191.5, 47.9, "AMD Instinct MI250X datasheet (383 TFLOPS BF16 per package of two GCDs)"),
    (r"\bMI250\b", 181.0, 45.3, "AMD Instinct MI250 datasheet (362 TFLOPS BF16 per package of two GCDs)"),
    (r"\bMI210\b", 181.0, 45.3, "AMD Instinct MI210 datasheet"),
    (r"\bMI100\b", 92.3, 46.1, "AMD Instinct MI100 datasheet (fp32 matrix)"),
]


def device_peak(name, precision):
    """(TFLOPS for this precision, source) of a device by its reported name, or None when it is not in DEVICES."""
    for pattern, tensor16, fp32, source in DEVICES:
        if re.search(pattern, name or "", re.IGNORECASE):
            return (tensor16 if precision in ("bf16", "fp16") else fp32), source
    return None


def flops_per_token(shape, block_size, checkpointing):
    """Training FLOPs per token (forward + backward; see the module docstring)."""
    base = 6 * shape["params_active"] + 12 * shape["layers"] * shape["hidden"] * block_size
    return base * 4 / 3 if checkpointing else base


def step_time(shape, stage, offload, micro_batch, grad_accum, block_size, precision, checkpointing, hosts,
              link_gbps=None):
    """{"compute", "communication", "offload", "step" seconds, "slowest"} of one optimizer step, or None when a
    device has no datasheet figure. ``hosts``: [{"name", "slots", "device_names": [per rank]}] taking part."""
    world = sum(h["slots"] for h in hosts)
    peaks = []
    for h in hosts:
        for name in h["device_names"]:
            peak = device_peak(name, precision)
            if peak is None:
                return None
            peaks.append((peak[0], name))
    slowest = min(peaks)
    tokens = micro_batch * grad_accum * block_size
    compute = flops_per_token(shape, block_size, checkpointing) * tokens / (slowest[0] * 1e12 * MODEL_FLOPS_UTILIZATION)
    grad_bytes = 2 if precision in ("bf16", "fp16") else 4
    volume = (3 if stage == 3 else 2) * shape["params"] * grad_bytes * (world - 1) / world if world > 1 else 0
    gbps = (link_gbps or ASSUMED_NETWORK_GBPS) if len(hosts) > 1 else ASSUMED_PCIE_GBPS
    communication = volume * 8 / (gbps * 1e9)
    off = 0.0
    if offload == "cpu":
        traffic = 2 * shape["params"] * grad_bytes / world  # a rank's gradients down and parameters up, its own link
        off = traffic * 8 / (ASSUMED_PCIE_GBPS * 1e9) + shape["params"] / len(hosts) / ASSUMED_CPU_ADAM_PARAMS_PER_S
    return {"compute": compute, "communication": communication, "offload": off,
            "step": compute + communication + off, "slowest": slowest[1], "tokens": tokens * world}
