"""PyTorch's own strategies for train.py: FSDP (FSDP2 ``fully_shard``) and DDP, behind the engine calls train.py
makes of a DeepSpeed engine (``engine(**batch)``, ``backward``, ``step`` once per micro batch, ``get_lr``,
``get_global_grad_norm``, ``save_checkpoint``/``load_checkpoint``), so the training loop, the metrics, the
checkpoint bookkeeping and the export are the same whatever the strategy.

What each strategy does with the model (built in fp32: the optimizer's master weights):

- ``ddp``: every rank holds the whole model; ``DistributedDataParallel`` all-reduces the gradients (in buckets
  that the gradients are views of) at the last micro batch of a step; bf16/fp16 through ``torch.autocast``.
- ``fsdp``: each decoder layer (the classes the model names in ``_no_split_modules``, found from the model) and
  then the root are wrapped with ``fully_shard``; ``sharding="full"`` shards over every rank (like ZeRO-3),
  ``"hybrid"`` shards within a host and replicates across hosts (HSDP: a 2-D device mesh, hosts x local ranks).
  bf16/fp16 through FSDP's ``MixedPrecisionPolicy`` (16-bit compute, fp32 gradient reduction). Only rank 0 builds
  the real model; the others build it on the meta device, and rank 0's weights are broadcast into every rank's
  shards (``set_model_state_dict(..., broadcast_from_rank0=True)``), so no rank but the first ever holds the whole
  model. Non-persistent buffers (rotary frequencies) are broadcast too: they are in no state dict.

Checkpoints (there is no shared filesystem: every rank finds what it needs on its own host's disk):

- ``fsdp``: each rank writes its own shards of the model and the optimizer (``get_state_dict``: DTensors, saved
  as their local tensors) to ``<tag>/fsdp_rank_<R>.pt``; a rank loads its own file back into the same layout
  (same world size and sharding: the marker records them), so the continuation is exact.
- ``ddp``: the states are the same on every rank; each host's local rank 0 writes ``<tag>/ddp_state.pt``.
Both add ``<tag>/client_state.pt`` (the step, the LR scheduler, the loss scaler) on each host.
``full_weights(tag_dir)`` rebuilds the whole model's weights from a tag's files gathered in one folder (FSDP2
shards every parameter along dim 0 in rank order: ranks 0..shard_group-1 concatenated; DDP: its copy), for
export_hf.py and playbooks/export.yml.

The end-of-run export gathers the full state dict (``full_state_dict=True``) on rank 0 and writes it with
save_pretrained, as the DeepSpeed path does.
"""
import math
import os
from pathlib import Path

STRATEGIES = ("deepspeed", "fsdp", "ddp")
SHARDINGS = ("full", "hybrid")
DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def fsdp_api():
    """(fully_shard, MixedPrecisionPolicy) from the installed torch: torch.distributed.fsdp from 2.6, the
    _composable module before; None when this torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
        except ImportError:
            return None
    return fully_shard, MixedPrecisionPolicy


def device_for(local_rank):
    """This rank's device, from the accelerator the plan names (DS_ACCELERATOR: cuda on NVIDIA and ROCm, xpu, cpu)."""
    import torch
    kind = os.environ.get("DS_ACCELERATOR") or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if kind == "xpu":
        torch.xpu.set_device(local_rank)
        return torch.device("xpu", local_rank)
    return torch.device("cpu")


def init_distributed(timeout_s, device):
    """The process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): gloo on CPU,
    NCCL (RCCL) on CUDA/ROCm, XCCL on XPU."""
    import datetime

    import torch.distributed as dist
    backend = {"cuda": "nccl", "xpu": "xccl"}.get(device.type, "gloo")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if device.type != "cpu" else {}))


def decoder_layer_classes(model):
    """The classes to wrap one FSDP unit each: those the model names in ``_no_split_modules`` (transformers lists
    its decoder layer there), else the class of the largest ``nn.ModuleList``'s items. Raises ValueError when the
    model has neither."""
    import torch
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if lists:
        return {type(max(lists, key=len)[0])}
    raise ValueError(f"{type(model).__name__} names no decoder layer (_no_split_modules) and has no ModuleList")


def fsdp_mesh(device, sharding, local_size):
    """The device mesh: 1-D over every rank (full), or hosts x local ranks (hybrid; ranks are contiguous per
    host, so the shard dimension is one host's ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    world = dist.get_world_size()
    if sharding == "hybrid":
        if world % local_size:
            raise ValueError(f"fsdp_sharding=hybrid needs the same ranks on every host; {world} ranks do not divide "
                             f"into hosts of {local_size}")
        return init_device_mesh(device.type, (world // local_size, local_size), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world,))


def build_fsdp(build, device, precision, sharding, local_size, rank):
    """The model sharded with fully_shard. ``build(meta)`` returns the fp32 model (``meta``: on the meta device,
    no weights). Rank 0 builds the real one; its weights reach every rank's shards by broadcast."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    api = fsdp_api()
    if api is None:
        raise ValueError(f"strategy=fsdp needs FSDP2 (fully_shard), which torch {torch.__version__} lacks; run "
                         "setup.yml to install the pinned torch, or use -e strategy=deepspeed")
    fully_shard, MixedPrecisionPolicy = api
    if rank == 0:
        model = build(False)
        full = model.state_dict()
    else:
        with torch.device("meta"):
            model = build(True)
        full = {}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()} if rank == 0 else {}
    layers = decoder_layer_classes(model)
    mesh = fsdp_mesh(device, sharding, local_size)
    policy = MixedPrecisionPolicy(param_dtype=getattr(torch, DTYPES[precision]), reduce_dtype=torch.float32) \
        if precision in DTYPES else MixedPrecisionPolicy()
    for module in model.modules():
        if type(module) in layers:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for name, buf in model.named_buffers():  # rotary frequencies & co: in no state dict, garbage after to_empty
        if rank == 0:
            buf.copy_(buffers[name].to(buf.device))
        dist.broadcast(buf, 0)
    return model, {"layer_classes": sorted(c.__name__ for c in layers), "mesh": list(mesh.shape)}


def build_ddp(build, device):
    import torch
    model = build(False).to(device)
    wrapped = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type != "cpu" else None, gradient_as_bucket_view=True)
    return model, wrapped


class TorchEngine:
    """What train.py calls on a DeepSpeed engine, for a model under FSDP2 or DDP: ``step()`` is called once per
    micro batch and steps the optimizer at the last of ``grad_accum``, as DeepSpeed's does."""

    def __init__(self, strategy, model, wrapped, optimizer, scheduler, device, grad_accum, clipping, precision,
                 rank, local_rank, sharding=None):
        import torch
        self.strategy, self.module, self.wrapped = strategy, model, wrapped
        self.optimizer, self.scheduler, self.device = optimizer, scheduler, device
        self.gas, self.clipping, self.precision = grad_accum, clipping, precision
        self.rank, self.local_rank, self.sharding = rank, local_rank, sharding
        self.micro, self.global_steps, self.norm = 0, 0, None
        # fp16 needs loss scaling (bf16 and fp32 do not); FSDP2's gradients are DTensors, which GradScaler takes
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.autocast = strategy == "ddp" and precision in DTYPES

    def _boundary(self):
        return (self.micro + 1) % self.gas == 0

    def __call__(self, **batch):
        import torch
        sync = self._boundary()  # gradients are reduced only at the last micro batch of a step
        if self.strategy == "ddp":
            self.wrapped.require_backward_grad_sync = sync
        else:
            self.wrapped.set_requires_gradient_sync(sync)
        if self.autocast:
            with torch.autocast(self.device.type, dtype=getattr(torch, DTYPES[self.precision])):
                return self.wrapped(**batch)
        return self.wrapped(**batch)

    def backward(self, loss):
        scaled = loss / self.gas  # DeepSpeed scales by the accumulation too: a step's gradient is the mean
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def step(self):
        import torch
        boundary = self._boundary()
        self.micro += 1
        if not boundary:
            return
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.clipping if self.clipping > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.norm = float(norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self):
        return self.norm if self.norm is not None and math.isfinite(self.norm) else None

    def train(self):
        self.wrapped.train()

    def eval(self):
        self.wrapped.eval()

    # -- checkpoints ---------------------------------------------------------------------------------------

    def _client(self, client_state):
        return {"client": client_state, "scheduler": self.scheduler.state_dict(), "micro": self.micro,
                "global_steps": self.global_steps,
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def save_checkpoint(self, ckpt_dir, tag, client_state):
        import torch
        import torch.distributed as dist
        folder = Path(ckpt_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_state_dict
            model_sd, optim_sd = get_state_dict(self.wrapped, self.optimizer)
            mesh = next((p.device_mesh for p in self.module.parameters() if hasattr(p, "device_mesh")), None)
            # shard_group: the ranks one replica is sharded over (ranks 0..shard_group-1 hold one whole copy; the
            # export concatenates their dim-0 shards)
            torch.save({"model": _local(model_sd), "optim": _local(optim_sd), "sharding": self.sharding,
                        "world_size": dist.get_world_size(), "rank": self.rank,
                        "shard_group": mesh.shape[-1] if mesh is not None else dist.get_world_size()},
                       _atomic(folder / f"fsdp_rank_{self.rank}.pt"))
            os.replace(folder / f"fsdp_rank_{self.rank}.pt.partial", folder / f"fsdp_rank_{self.rank}.pt")
        elif self.local_rank == 0:
            torch.save({"model": self.module.state_dict(), "optim": self.optimizer.state_dict()},
                       _atomic(folder / "ddp_state.pt"))
            os.replace(folder / "ddp_state.pt.partial", folder / "ddp_state.pt")
        if self.local_rank == 0:
            torch.save(self._client(client_state), _atomic(folder / "client_state.pt"))
            os.replace(folder / "client_state.pt.partial", folder / "client_state.pt")

    def load_checkpoint(self, ckpt_dir, tag):
        """Load ``tag`` as this rank wrote it; returns (folder, the client_state saved with it)."""
        import torch
        folder = Path(ckpt_dir) / tag
        if self.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
            saved = torch.load(folder / f"fsdp_rank_{self.rank}.pt", map_location=self.device, weights_only=False)
            model_sd, optim_sd = get_state_dict(self.wrapped, self.optimizer)  # the layout (and the Adam states)
            set_state_dict(self.wrapped, self.optimizer, model_state_dict=_into(model_sd, saved["model"]),
                           optim_state_dict=_into(optim_sd, saved["optim"]))
        else:
            saved = torch.load(folder / "ddp_state.pt", map_location=self.device, weights_only=False)
            self.module.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optim"])
        client = torch.load(folder / "client_state.pt", map_location="cpu", weights_only=False)
        self.scheduler.load_state_dict(client["scheduler"])
        self.micro, self.global_steps = client["micro"], client["global_steps"]
        if self.scaler and client.get("scaler"):
            self.scaler.load_state_dict(client["scaler"])
        return str(folder), client["client"]

    # -- export ----------------------------------------------------------------------------------------------

    def full_state_dict(self):
        """The whole model's weights on rank 0 (CPU), None on the other ranks; every rank must call it."""
        if self.strategy == "ddp":
            return None  # rank 0's module holds them already
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if self.rank == 0 else None


def _atomic(path):
    return Path(str(path) + ".partial")


def _local(tree):
    """A state dict with every DTensor replaced by this rank's local shard (plain tensors, loadable anywhere)."""
    if isinstance(tree, dict):
        return {k: _local(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_local(v) for v in tree]
    if hasattr(tree, "to_local"):
        return tree.to_local().detach().clone()
    return tree


def _into(template, saved):
    """``saved`` (local shards) rebuilt into the template's DTensors (same mesh and placements), for
    set_state_dict; plain values are taken as saved."""
    if isinstance(template, dict):
        missing = [k for k in template if k not in saved]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing[:3]}: it was written by another model or layout")
        return {k: _into(v, saved[k]) for k, v in template.items()}
    if isinstance(template, list):
        return [_into(t, s) for t, s in zip(template, saved)]
    if hasattr(template, "to_local"):
        from torch.distributed.tensor import DTensor
        local = saved.to(template.to_local().device, dtype=template.dtype)
        if tuple(local.shape) != tuple(template.to_local().shape):
            raise ValueError(f"a saved shard has shape {tuple(local.shape)}, this layout holds "
                             f"{tuple(template.to_local().shape)}: the checkpoint was written by another layout")
        return DTensor.from_local(local, template.device_mesh, template.placements, run_check=False,
                                  shape=template.shape, stride=template.stride())
    return saved


def full_weights(tag_dir):
    """The whole model's state dict from an FSDP or DDP tag whose files are all in ``tag_dir`` (None if the tag is
    DeepSpeed's). Raises ValueError naming what is missing."""
    import torch
    tag_dir = Path(tag_dir)
    if (tag_dir / "ddp_state.pt").is_file():
        return torch.load(tag_dir / "ddp_state.pt", map_location="cpu", weights_only=False)["model"]
    files = sorted(tag_dir.glob("fsdp_rank_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        return None
    first = torch.load(files[0], map_location="cpu", weights_only=False)
    group = int(first.get("shard_group") or first["world_size"])
    have = {int(p.stem.rsplit("_", 1)[1]): p for p in files}
    missing = [r for r in range(group) if r not in have]
    if missing:
        raise ValueError(f"{tag_dir} lacks the FSDP shards of rank(s) {missing} (ranks 0..{group - 1} hold one copy)")
    shards = [first["model"]] + [torch.load(have[r], map_location="cpu", weights_only=False)["model"]
                                 for r in range(1, group)]
    return {k: torch.cat([s[k] for s in shards], dim=0) if getattr(v, "dim", lambda: 0)() > 0 else v
            for k, v in first["model"].items()}
