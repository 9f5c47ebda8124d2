"""Memory per device and per host of a training configuration, from the model's shape (pure).

Model states follow DeepSpeed's own estimators (deepspeed/runtime/zero/stage_1_and_2.py
``estimate_zero2_model_states_mem_needs`` and stage3.py ``estimate_zero3_model_states_mem_needs``; under ZeRO-3 the
training module builds the model inside ``deepspeed.zero.Init``, the estimator's ``zero_init=True`` case), with the
bytes per parameter that DeepSpeed's comment spells out for 16-bit training: 2 (16-bit params) + 2 (16-bit grads) + 4 (fp32 grads) + 4 (fp32 params) +
8 (Adam momentum and variance) = 2 + 18. ZeRO-1 and ZeRO-0, which DeepSpeed gives no estimator for, keep the same
components with less of them partitioned; fp32 training has no 16-bit copies (4 + 4 + 8). The host memory to load
the model counts each rank reading the whole model in the load precision: DeepSpeed's estimators assume fp32 (4
bytes); the training module loads 16-bit models in 16 bits (``load_bytes=2``).

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


def model_states(params, largest_layer, stage, offload, world, ranks_per_host, nodes, precision, zero_init=False,
                 load_bytes=4):
    """{"device": bytes per device, "host": bytes per host} of the model states; for 16-bit stage 2 and 3 with the
    defaults exactly DeepSpeed's estimators (``zero_init``: stage 3's model built partitioned by zero.Init;
    ``load_bytes``: bytes per parameter of the copy each rank loads, 4 in DeepSpeed's estimators)."""
    p, g, m, g32, o = _per_param(precision)
    rest = g + m + g32 + o  # 18 in 16-bit
    cpu = offload == "cpu"
    load = load_bytes * ranks_per_host
    if stage == 3:
        if cpu:
            device = 4 * largest_layer + int(p * params / world)
            host = params * ((rest - 2) / nodes if zero_init else max(load, (rest - 2) / nodes)) * LOAD_BUFFER
        else:
            # DeepSpeed's estimator counts 18 bytes here in 16-bit (the 16-bit partition inside); fp32 has no copy
            device = 4 * largest_layer + int((rest if p == 2 else p + rest) * params / world)
            host = (largest_layer if zero_init else params) * load * LOAD_BUFFER
    elif stage == 2:
        if cpu:
            device = p * params
            host = params * max(load_bytes * world, rest - 2) * LOAD_BUFFER
        else:
            device = p * params + int(rest * params / world)
            host = params * load * LOAD_BUFFER
    elif stage == 1:
        if cpu:
            device = (p + g) * params
            host = params * max(load_bytes * world, rest - g) * LOAD_BUFFER
        else:
            device = (p + g) * params + int((m + g32 + o) * params / world)
            host = params * load * LOAD_BUFFER
    else:
        device = (p + rest) * params
        host = params * load * LOAD_BUFFER
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
         checkpointing=False, zero_init=False, load_bytes=4):
    """Bytes one rank needs on its device and one host needs in RAM, by component."""
    states = model_states(shape["params"], shape["largest_layer"], stage, offload, world, ranks_per_host, nodes,
                          precision, zero_init, load_bytes)
    act = activations(shape, micro_batch, block_size, precision, checkpointing)
    runtime = RUNTIME_MIB[kind] * MIB
    return {"model_states": states["device"], "activations": act, "runtime": runtime,
            "device": states["device"] + act + runtime, "host": states["host"]}


def mib(value):
    return int(math.ceil(value / MIB))


# Least communication first: ZeRO-2 moves what plain data parallelism moves (reduce-scatter + all-gather = one
# all-reduce) and holds less than ZeRO-1 (which moves the same); ZeRO-3 adds an all-gather of the parameters in
# the backward pass (1.5x); offloading the optimizer adds host<->device traffic of the gradients and parameters
# every step and runs Adam on the CPU (ZeRO-Offload, Ren et al. 2021), so it comes after both.
ORDER = ((2, "none"), (3, "none"), (2, "cpu"), (3, "cpu"))


def divisors_desc(n, cap=None):
    return [d for d in range(min(n, cap or n), 0, -1) if n % d == 0]
