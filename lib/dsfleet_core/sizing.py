"""Memory per device and per host of a training configuration, from the model's shape (pure).

Model states follow DeepSpeed's own estimators (deepspeed/runtime/zero/stage_1_and_2.py
``estimate_zero2_model_states_mem_needs`` and stage3.py ``estimate_zero3_model_states_mem_needs``, the ``zero_init=False``
case: today's training module loads the whole model on every rank), with the bytes per parameter that DeepSpeed's
comment spells out for 16-bit training: 2 (16-bit params) + 2 (16-bit grads) + 4 (fp32 grads) + 4 (fp32 params) +
8 (Adam momentum and variance) = 2 + 18. ZeRO-1 and ZeRO-0, which DeepSpeed gives no estimator for, keep the same
components with less of them partitioned; fp32 training has no 16-bit copies (4 + 4 + 8).

Activations per micro batch use Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), eq. 1: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit; transformers trains with SDPA
attention, which keeps no s x s score matrix, so the 5*a*s/h term is left out. With activation checkpointing each
layer keeps its 2*s*b*h-byte input and one layer is recomputed at a time. The logits add b*s*V*8 bytes (fp32
logits and their gradient). A runtime allowance covers the CUDA/ROCm context and allocator fragmentation.
"""

from __future__ import annotations

import math

MIB = 2 ** 20
RUNTIME_MIB = {"gpu": 1024, "cpu": 512}
DEVICE_USE = 0.90          # a plan may fill this much of a device; the rest is headroom
LOAD_BUFFER = 1.5          # DeepSpeed's additional_buffer_factor for host memory


def _per_param(precision):
    """Bytes per parameter: (params, grads, fp32 master params, fp32 grads, optimizer states)."""
    if precision in ("bf16", "fp16"):
        return 2, 2, 4, 4, 8
    return 4, 4, 0, 0, 8


def model_states(params, largest_layer, stage, offload, world, ranks_per_host, nodes, precision):
    """{"device": bytes per device, "host": bytes per host} of the model states; for 16-bit stage 2 and 3 exactly
    DeepSpeed's estimators (zero_init=False)."""
    p, g, m, g32, o = _per_param(precision)
    rest = g + m + g32 + o  # 18 in 16-bit
    cpu = offload == "cpu"
    if stage == 3:
        if cpu:
            device = 4 * largest_layer + int(p * params / world)
            host = params * max(4 * ranks_per_host, (rest - 2) / nodes) * LOAD_BUFFER
        else:
            # DeepSpeed's estimator counts 18 bytes here in 16-bit (the 16-bit partition inside); fp32 has no copy
            device = 4 * largest_layer + int((rest if p == 2 else p + rest) * params / world)
            host = params * 4 * ranks_per_host * LOAD_BUFFER
    elif stage == 2:
        if cpu:
            device = p * params
            host = params * max(4 * world, rest - 2) * LOAD_BUFFER
        else:
            device = p * params + int(rest * params / world)
            host = params * 4 * ranks_per_host * LOAD_BUFFER
    elif stage == 1:
        if cpu:
            device = (p + g) * params
            host = params * max(4 * world, rest - g) * LOAD_BUFFER
        else:
            device = (p + g) * params + int((m + g32 + o) * params / world)
            host = params * 4 * ranks_per_host * LOAD_BUFFER
    else:
        device = (p + rest) * params
        host = params * 4 * ranks_per_host * LOAD_BUFFER
    return {"device": int(device), "host": int(host)}


def activations(shape, micro_batch, block_size, precision, checkpointing=False):
    """Activation bytes of one micro batch on one rank (see the module docstring for the formula)."""
    s, b, h, L, V = block_size, micro_batch, shape["hidden"], shape["layers"], shape["vocab"]
    scale = 1 if precision in ("bf16", "fp16") else 2
    per_layer = 34 * s * b * h * scale
    logits = 8 * b * s * V
    if checkpointing:
        return 2 * s * b * h * scale * L + per_layer + logits
    return per_layer * L + logits


def need(shape, stage, offload, micro_batch, block_size, precision, world, ranks_per_host, nodes, kind,
         checkpointing=False):
    """Bytes one rank needs on its device and one host needs in RAM, by component."""
    states = model_states(shape["params"], shape["largest_layer"], stage, offload, world, ranks_per_host, nodes,
                          precision)
    act = activations(shape, micro_batch, block_size, precision, checkpointing)
    runtime = RUNTIME_MIB[kind] * MIB
    return {"model_states": states["device"], "activations": act, "runtime": runtime,
            "device": states["device"] + act + runtime, "host": states["host"]}


def mib(value):
    return int(math.ceil(value / MIB))


def candidates(shape, precision, micro_batch, block_size, world, ranks_per_host, nodes, kind):
    """Every (stage, offload, micro batch) from least to most sharded, at the given micro batch and below."""
    out = []
    for stage in (0, 1, 2, 3):
        for offload in ("none", "cpu"):
            if stage == 0 and offload == "cpu":
                continue  # DeepSpeed offloads from ZeRO-1 on
            for mb in sorted({micro_batch, max(1, micro_batch // 2), 1}, reverse=True):
                n = need(shape, stage, offload, mb, block_size, precision, world, ranks_per_host, nodes, kind)
                out.append({"zero_stage": stage, "offload": offload, "micro_batch": mb,
                            "device_mib": mib(n["device"]), "host_mib": mib(n["host"])})
    return out
