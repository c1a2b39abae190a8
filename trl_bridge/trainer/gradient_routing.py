"""How pass B reuses the policy's own modules for θ̂ (BRIDGE.md §3.3 and the last term of §3.4).

Pass B runs an ordinary forward+backward through the wrapped model with θ̂ in the base parameters' storage, so DDP
all-reduces and FSDP2 reduce-scatters each parameter once per backward and gradient checkpointing recomputes with the
right weights. These context managers put θ̂ in place, route w's new gradient into w.grad scaled by −λ (and set w's
SFT gradient apart for a diagnostic), and keep the shadow's side effects (TRL's metrics and adaptive-entropy state)
out of the policy's."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor

from ..engines.fsdp2 import reshard


@contextmanager
def shadow_in_place(model, base_params, shadow_params, keep_grads: bool = False):
    """Put θ̂ in the base parameters' storage (and θ̂'s accumulated gradients in their .grad); swap back after.

    Under FSDP2 the local shards are exchanged in place (FSDP all-gathers from that storage), with every FSDP unit
    resharded first so that no gathered copy of the other weights is reused."""

    def swap():
        reshard(model)
        with torch.no_grad():
            for (_, p), s in zip(base_params, shadow_params):
                if isinstance(p, DTensor):
                    tmp = p._local_tensor.clone()
                    p._local_tensor.copy_(s._local_tensor)
                    s._local_tensor.copy_(tmp)
                else:
                    p.data, s.data = s.data, p.data
                if not keep_grads:
                    p.grad, s.grad = s.grad, p.grad

    swap()
    try:
        yield
    finally:
        swap()


@contextmanager
def grads_captured(params, into: list):
    """Append to `into` a detached copy of the gradient the enclosed backward produces for each (name, p) in `params`
    (None where it makes none), and leave p.grad holding the sum as if nothing had been set apart."""
    saved = [p.grad for _, p in params]
    for _, p in params:
        p.grad = None
    yield
    into.extend(None if p.grad is None else p.grad.detach().clone() for _, p in params)
    for (_, p), before in zip(params, saved):
        if before is not None:
            p.grad = before if p.grad is None else p.grad.add_(before)


@contextmanager
def grads_added_with_scale(params, scale: float):
    """p.grad += scale × (the gradient the enclosed backward produces), for each (name, p) in `params`. Applied to the
    gradient as DDP/FSDP leave it after the backward (a tensor hook would not fire on FSDP2's sharded parameters)."""
    saved = [p.grad for _, p in params]
    for _, p in params:
        p.grad = None
    try:
        yield
    finally:
        for (_, p), before in zip(params, saved):
            new = p.grad
            p.grad = before if new is None else (scale * new if before is None else before + scale * new)


@contextmanager
def side_effects_set_aside(trainer, entropy_state_names):
    """GRPOTrainer's `_compute_loss` logs entropy/clip/KL metrics and moves its adaptive-entropy state; keep the
    shadow's out of the policy's logs and state."""
    metrics = trainer._metrics["train"]
    lengths = {k: len(v) for k, v in metrics.items()}
    entropy_state = {k: getattr(trainer, k) for k in entropy_state_names if hasattr(trainer, k)}
    try:
        yield
    finally:
        for k in list(metrics):
            if k in lengths:
                del metrics[k][lengths[k] :]
            else:
                del metrics[k]
        for k, v in entropy_state.items():
            setattr(trainer, k, v)
