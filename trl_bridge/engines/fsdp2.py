"""FSDP2 / DTensor plumbing for BridgeTrainer: whole tensors from shards, shard-aware norms and clipping, optimizer
states gathered for engine-independent checkpoints and sharded again on load, and θ̂'s lean optimizer whose factored
statistics follow θ̂'s sharding. Every helper passes plain tensors through unchanged, so the single-process and DDP
paths use the same calls. Gathering (`full_tensor`) is a collective under FSDP2: every rank calls it in the same
order."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from transformers.optimization import Adafactor


class LeanShadowOptimizer(Adafactor):
    """θ̂'s optimizer for `shadow_storage="lean"`: Adafactor without momentum, at a fixed (scheduled) learning rate.
    Under FSDP2 its factored statistics are created as DTensors (`factored_state_placements`) before the first step."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if isinstance(p, DTensor) and p.grad is not None and p.dim() >= 2 and not self.state[p]:
                    state = self.state[p]
                    state.update(step=0, RMS=0)
                    for key, shape in (("exp_avg_sq_row", p.shape[:-1]), ("exp_avg_sq_col", p.shape[:-2] + p.shape[-1:])):
                        placements = factored_state_placements(p, key)
                        state[key] = distribute_tensor(torch.zeros(shape, dtype=torch.float32, device=p.device_mesh.device_type),
                                                       p.device_mesh, placements, src_data_rank=None)
        return super().step(closure)


def factored_state_placements(p: DTensor, key: str):
    """Adafactor's row statistics keep θ̂'s leading dimensions (sharded as θ̂ is), its column statistics drop the
    second-to-last one (replicated across that dimension's shards)."""
    n = p.dim()
    out = []
    for pl in p.placements:
        if isinstance(pl, Shard) and key == "exp_avg_sq_row" and pl.dim <= n - 2:
            out.append(Shard(pl.dim))
        elif isinstance(pl, Shard) and key == "exp_avg_sq_col" and (pl.dim <= n - 3 or pl.dim == n - 1):
            out.append(Shard(pl.dim if pl.dim <= n - 3 else n - 2))
        else:
            out.append(Replicate())
    return out


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached (a collective for FSDP2's DTensors: every rank must call it in the same order)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def assign_full(param: torch.Tensor, full: torch.Tensor):
    """Copy a full tensor into a parameter, or into this rank's shard of it."""
    with torch.no_grad():
        if isinstance(param, DTensor):
            full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full.to(param.device, param.dtype))


def sum_of_squares(tensors) -> float:
    total = sum((full_tensor(t.detach().float().pow(2).sum()) for t in tensors), torch.zeros(()))
    return float(total)


def total_grad_norm(params) -> float:
    """Total L2 norm of the gradients of `params` (DTensor-aware: the shards' norms are combined)."""
    grads = [p.grad for p in params if p.grad is not None]
    return float(full_tensor(torch.nn.utils.get_total_norm(grads))) if grads else 0.0


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the gradients of `params` to a total norm of `max_norm`; returns the norm before clipping."""
    norm = total_grad_norm(params)
    if max_norm and 0 < max_norm < float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
    return norm


def reshard(model):
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_optimizer_state(optimizer) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor gathered (collective under FSDP2)."""
    sd = optimizer.state_dict()
    return {
        "state": {i: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in st.items()} for i, st in sd["state"].items()},
        "param_groups": sd["param_groups"],
    }


def load_full_optimizer_state(optimizer, sd: dict):
    """Load a full optimizer state, sharding each tensor like its parameter when the parameters are DTensors."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_state(p, k, v) for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def shard_state(p, key: str, v):
    """One optimizer state entry, sharded like its parameter (AdamW's moments) or as `LeanShadowOptimizer` keeps it."""
    if not isinstance(p, DTensor) or not torch.is_tensor(v) or v.dim() == 0:
        return v
    placements = p.placements if v.shape == p.shape else factored_state_placements(p, key)
    return distribute_tensor(v.to(p.dtype), p.device_mesh, placements, src_data_rank=None)


def gather_output_head_with_backbone(causal_lm):
    """accelerate puts lm_head in its own FSDP unit, gathered only when lm_head.forward runs; TRL's fused LM head reads
    `lm_head.weight` without calling it. Gather it when the backbone finishes: its gradient then reaches FSDP's
    reduce-scatter."""
    head = causal_lm.get_output_embeddings()
    if isinstance(head, FSDPModule):
        causal_lm.base_model.register_forward_hook(lambda *_: head.unshard())
