"""Memory per device and per host of a training configuration, from the model's shape (pure).

Model states follow DeepSpeed's own estimators (deepspeed/runtime/zero/stage_1_and_2.py
``estimate_zero2_model_states_mem_needs`` and stage3.py ``estimate_zero3_model_states_mem_needs``; under ZeRO-3 the
training module builds the model inside ``deepspeed.zero.Init``, the estimator's ``zero_init=True`` case), with the
bytes per parameter that DeepSpeed's comment spells out for 16-bit training: 2 (16-bit params) + 2 (16-bit grads) +
4 (fp32 grads) + 4 (fp32 params) + 8 (Adam momentum and variance) = 2 + 18. ZeRO-1 and ZeRO-0, which DeepSpeed gives
no estimator for, keep the same components with less of them partitioned. fp32 training keeps the same components
in 4 bytes: DeepSpeed clones the fp32 master partition (``single_partition_of_fp32_groups``) and flattens the
gradient partition for the step even when the model is fp32 already, 4 + 20 from ZeRO-1 on (measured: bench/load_memory.py;
without ZeRO the torch optimizer steps an fp32 model directly: 4 + 4 + 8). The
host memory to load the model counts each rank reading the whole model in the load precision: DeepSpeed's
estimators assume fp32 (4 bytes); the training module loads 16-bit models in 16 bits (``load_bytes=2``).

Beside the model states, each rank holds the activations of its micro batch and DeepSpeed's communication buffers
(``buffers()``), with the gradient of the largest tensor (tied embeddings: the lm head's and the embedding's
gradients, then their sum). The optimizer step adds nothing: the plan renders torch's fused AdamW, which updates in
place (the single-tensor and foreach paths hold ``exp_avg_sq.sqrt()`` of the whole partition, 4-8 bytes per
parameter more: measured 0.9 GB on the 0.5B bench model); offloaded, DeepSpeed's CPU Adam updates in place too.

Activations per micro batch use Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv:2205.05198), eq. 1: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit; transformers trains with SDPA
attention, which keeps no s x s score matrix, so the 5*a*s/h term is left out. With activation checkpointing each
layer keeps its 2*s*b*h-byte input and one layer is recomputed at a time. The logits add b*s*V*8 bytes (fp32
logits and their gradient). A runtime allowance covers the process (Python, torch, DeepSpeed, transformers, the
tokenizer and data: about 1 GB resident on a CPU rank, measured), the CUDA/ROCm context and allocator fragmentation.
"""

from __future__ import annotations

import math

MIB = 2 ** 20
RUNTIME_MIB = {"gpu": 1024, "cpu": 1024}
DEVICE_USE = 0.90          # a plan may fill this much of a device; the rest is headroom
LOAD_BUFFER = 1.5          # DeepSpeed's additional_buffer_factor for host memory


def _per_param(precision):
    """Bytes per parameter: (params, grads, fp32 master params, fp32 grads, optimizer states)."""
    if precision in ("bf16", "fp16"):
        return 2, 2, 4, 4, 8
    return 4, 4, 4, 4, 8


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
            # DeepSpeed's estimator counts 18 bytes here in 16-bit (the 16-bit partition inside); fp32 keeps its
            # 4-byte partition beside the same 20
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
        # without ZeRO an fp32 model is stepped by the torch optimizer itself (DeepSpeed's optimizer sanity check
        # wraps nothing): no master copy, no flattened gradients; 16-bit keeps the fp32 master and its gradients
        device = (p + rest) * params if p == 2 else (p + g + o) * params
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


# The most a CPU rank's ZeRO-1/2 bucket holds (elements): 32 Mi elements, 64 MiB in bf16. gloo's cost per collective
# is a fixed ~ms plus the bytes; at tens of MB a bucket the fixed part is noise, and the RAM it costs stays small.
CPU_BUCKET_MAX = 1 << 25


def buckets(shape, stage, kind="gpu"):
    """DeepSpeed's communication buffer sizes (elements) scaled to the model, as transformers' ``HfDeepSpeedConfig``
    fills ``"auto"`` (integrations/deepspeed.py ``trainer_config_finalize``): the reduce bucket hidden^2, ZeRO-3's
    prefetch bucket 0.9 hidden^2 and persistence threshold 10 hidden. DeepSpeed's defaults (5e8 elements for the
    reduce and all-gather buckets) are sized for the largest models: 1.9 GB per rank for an fp32 reduce bucket,
    whatever the model. ``stage3_max_live_parameters`` keeps DeepSpeed's default.

    CPU ranks (``kind`` "cpu") reduce over gloo, where each small collective costs far more than its bytes: there
    the ZeRO-1/2 buckets hold the whole model up to ``CPU_BUCKET_MAX`` elements (a small model: one reduce and one
    all-gather a step).
    Measured (bench/vs_trainer.py, 2 CPU ranks, 26M Llama, bf16): 972 tokens/s against 807 with hidden^2 buckets;
    the host's RAM pays the bucket (``buffers()`` counts it)."""
    h = int(shape["hidden"])
    square = h * h + (h * h) % 2  # ZeRO-1/2 assert the all-gather bucket is a multiple of 2 elements
    if kind == "cpu" and stage in (1, 2):
        whole = min(max(int(shape["params"]), square), CPU_BUCKET_MAX)
        square = whole + whole % 2
    out = {"reduce_bucket_size": square}
    if stage == 3:
        out.update({"stage3_prefetch_bucket_size": int(0.9 * h * h), "stage3_param_persistence_threshold": 10 * h})
    elif stage in (1, 2):
        out["allgather_bucket_size"] = square
    return out


def buffers(shape, stage, precision, kind="gpu"):
    """Bytes of DeepSpeed's communication buffers on one rank with ``buckets()``: the contiguous reduce bucket
    (stage_1_and_2.py ``setup_buckets``, stage3.py's IPG buffer; ZeRO-1 stages it in fp32, ``overlap_comm`` is off
    so there is one), ZeRO-3's prefetched parameters, and in ZeRO-1/2 the gradient of a tensor larger than the
    bucket, which bypasses it and is reduced in place (``extra_large_param_to_reduce``)."""
    if stage == 0:
        return 0
    p, g = _per_param(precision)[:2]
    sizes = buckets(shape, stage, kind)
    reduce = sizes["reduce_bucket_size"] * (4 if stage == 1 else g)
    if stage == 3:
        return reduce + sizes["stage3_prefetch_bucket_size"] * p
    if shape["largest_layer"] <= sizes["reduce_bucket_size"]:
        return reduce
    return reduce + shape["largest_layer"] * g * (2 if shape.get("tied_embeddings") else 1)


def torch_states(shape, strategy, shard, precision, ranks_per_host):
    """{"device", "host"} bytes of the model states under torch's own strategies (train/dsfleet_torch.py), which
    keep the model in fp32 (the optimizer's master weights) and compute in 16 bits through autocast (DDP) or FSDP's
    mixed-precision policy:

    - ``ddp``: fp32 parameters, fp32 gradients (DDP's buckets are views of them) and AdamW's two fp32 states: 16
      bytes a parameter; every rank builds the whole fp32 model on the host first (4 bytes a parameter each).
    - ``fsdp``: the same 16 bytes a parameter divided over ``shard`` ranks (every rank for full sharding, one host's
      for hybrid), plus what is unsharded while it computes: the root's parameters (embeddings, lm head, final
      norm: FSDP2 keeps the root gathered through forward and backward) and two decoder layers (the one computing
      and the one prefetched), in the compute dtype, with their fp32 gradients before the reduce-scatter. Only rank
      0 builds the real model on the host (the others build it on the meta device)."""
    P = shape["params"]
    if strategy == "ddp":
        return {"device": 16 * P, "host": int(4 * P * ranks_per_host * LOAD_BUFFER)}
    compute = 2 if precision in ("bf16", "fp16") else 4
    root = shape["embedding"] + shape["lm_head"]  # lm_head is 0 when tied
    unsharded = root + 2 * shape["per_layer"]
    return {"device": int(16 * P / shard) + (compute + 4) * unsharded, "host": int(4 * P * LOAD_BUFFER)}


def need(shape, stage, offload, micro_batch, block_size, precision, world, ranks_per_host, nodes, kind,
         checkpointing=False, zero_init=False, load_bytes=4, strategy="deepspeed", shard=None):
    """Bytes one rank needs on its device and one host needs in RAM, by component (``strategy`` fsdp/ddp:
    ``torch_states``; ``shard``: the ranks an FSDP shard is divided over)."""
    if strategy == "deepspeed":
        states = model_states(shape["params"], shape["largest_layer"], stage, offload, world, ranks_per_host, nodes,
                              precision, zero_init, load_bytes)
        buf = buffers(shape, stage, precision, kind)
    else:
        states, buf = torch_states(shape, strategy, shard or world, precision, ranks_per_host), 0
    act = activations(shape, micro_batch, block_size, precision, checkpointing)
    runtime = RUNTIME_MIB[kind] * MIB
    return {"model_states": states["device"], "activations": act, "buffers": buf, "runtime": runtime,
            "device": states["device"] + act + buf + runtime, "host": states["host"]}


def mib(value):
    return int(math.ceil(value / MIB))


# Least communication first: ZeRO-2 moves what plain data parallelism moves (reduce-scatter + all-gather = one
# all-reduce) and holds less than ZeRO-1 (which moves the same); ZeRO-3 adds an all-gather of the parameters in
# the backward pass (1.5x); offloading the optimizer adds host<->device traffic of the gradients and parameters
# every step and runs Adam on the CPU (ZeRO-Offload, Ren et al. 2021), so it comes after both.
ORDER = ((2, "none"), (3, "none"), (2, "cpu"), (3, "cpu"))
# CPU ranks: a rank's device memory is its host's, so there is nothing to offload to; and DeepSpeed's ZeRO-3 on CPU
# ranks (gloo) holds more than ZeRO-2, not less (measured, bench/load_memory.py: a 0.5B fp32 model on 2 ranks peaks
# at about 11 GB per rank under ZeRO-3 against 9.5 GB under ZeRO-2, and ZeRO-3's resident memory grows over the
# first steps), so the plan never picks it there; a user may still set zero_stage=3 (the plan warns).
CPU_ORDER = ((2, "none"),)
ZERO3_ON_CPU_WARNING = ("zero_stage=3 on CPU ranks: DeepSpeed's ZeRO-3 over gloo holds more memory per rank than "
                        "ZeRO-2 does, and more with every step at first (measured: bench/load_memory.py); the "
                        "memory estimate above is DeepSpeed's formula, not that; prefer -e zero_stage=2 on CPU hosts")


def divisors_desc(n, cap=None):
    return [d for d in range(min(n, cap or n), 0, -1) if n % d == 0]
