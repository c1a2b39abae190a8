"""θ̂ stored as a bf16 delta from θ (`shadow_storage="bf16_delta"`): θ̂ = θ + d, d in bfloat16, sharded like θ.

Why a delta: at small learning rates a bf16 θ̂ would round its own updates away (a weight of size ~0.02 has a bf16
spacing of ~1e-4), while d = θ̂ − θ is small, so bf16's relative precision applies to the gap between the two copies.
Bytes per trainable parameter that θ̂ keeps between steps: d (2) + the factored, momentum-free Adafactor statistics of
`LeanShadowOptimizer` (rows + columns; a 1-D weight keeps its own second moment). Transient, per step:

    pass B      θ̂ = fl(θ + d) is written into θ's own storage, in place; θ is restored bit for bit afterwards from
                fl(θ̂ − d) and a 1-byte correction of its bit pattern (`_Restore`, exact; the rare element that the byte
                cannot correct, |θ| ≪ |d|, is kept exactly beside it). θ̂'s gradient arrives in θ's `.grad` (fp32) and
                is added to θ̂'s bf16 gradient accumulator: in one process, weight by weight during the backward (a
                post-accumulate-grad hook, so no full fp32 gradient of θ̂ is ever held); under DDP and FSDP2, which
                all-reduce / reduce-scatter `.grad` at the end of the backward, right after it.
    θ first     with one micro-batch per step, θ steps right after pass A (`step_base`: d ← θ_old + d − θ_new, θ̂
                unmoved), so that pass B runs without θ's gradient held; the update below then finds no gradient of θ.
    the update  `BridgeCallback.on_pre_optimizer_step`, weight by weight: θ̂ᵢ = θᵢ + dᵢ is materialised in fp32 and
                stepped by θ̂'s optimizer with its clipped gradient, θᵢ is stepped by θ's own optimizer (its gradient
                then released, so the Trainer's step that follows leaves θ as it is), and dᵢ ← round(θ̂ᵢ − θᵢ_new). One
                weight's fp32 θ̂ at a time; d stays relative to the current θ, so θ̂ is an absolute copy: θ's step does
                not move it.

The rounding to bf16 is stochastic (unbiased: round-to-nearest would freeze d whenever θ̂'s step minus θ's is below
half of d's spacing, and θ̂ would then follow θ). Its random bits are a hash of (seed, step, parameter, element index
in the full tensor): a resumed run draws the same bits as the uninterrupted one, and one process, DDP and FSDP2 the
same bits as each other. With gradient accumulation, θ̂'s gradient is accumulated in
bf16 (one rounding per micro-batch); DDP then all-reduces on every micro-batch (`sync_each_batch`), since the
accumulator lives outside DDP's reach. The measured drift from the full fp32 shadow: docs/cost.md."""

from __future__ import annotations

import contextlib
import math

import torch
from torch.distributed.tensor import DTensor

from ..engines.fsdp2 import full_tensor, reshard, sum_of_squares

DELTA_DTYPE = torch.bfloat16


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t._local_tensor if isinstance(t, DTensor) else t


def free(t: torch.Tensor):
    """Release a tensor's memory, keeping the tensor (shape, dtype, sharding) to allocate it again."""
    local(t).untyped_storage().resize_(0)


def allocate(t: torch.Tensor):
    t = local(t)
    t.untyped_storage().resize_(t.numel() * t.element_size())


def stochastic_round(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 → bf16, rounding up in magnitude with probability (the dropped 16 bits) / 2^16 (`noise`: uniform 16-bit
    integers, one per element): unbiased."""
    return ((x.contiguous().view(torch.int32) + noise.view(x.shape).to(torch.int32)) & -65536).view(torch.float32) \
        .to(DELTA_DTYPE)


_MASK63 = (1 << 63) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64's finaliser; int64 products wrap), applied elementwise."""
    for shift, mult in ((30, -4658895280553007687), (27, -7723592293110705685)):
        x = (x ^ ((x >> shift) & (_MASK63 >> (shift - 1)))) * mult
    return x ^ ((x >> 31) & (_MASK63 >> 30))


def global_start(t: torch.Tensor) -> int:
    """The index in the full, flattened tensor of this rank's first element of `t` (0 unless FSDP2 shards it)."""
    if not isinstance(t, DTensor):
        return 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in t.placements):
        raise ValueError(f"bf16_delta's rounding supports θ sharded along dimension 0 (FSDP2's default), not {t.placements}")
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return offset[0] * math.prod(t.shape[1:]) if t.dim() else 0


def rounding_noise(t: torch.Tensor, key: int, start: int = 0) -> torch.Tensor:
    """Uniform 16-bit integers for the elements of `t` (a plain tensor whose first element has index `start` in the
    full, flattened weight), a function of `key` and of each element's index: the same bits whether the weight is
    whole (one process, DDP) or sharded by FSDP2 along dimension 0, and however it is chunked."""
    index = torch.arange(start, start + t.numel(), device=t.device, dtype=torch.int64)
    return (_mix(index + _mix(torch.tensor(key, dtype=torch.int64, device=t.device))) >> 16) & 0xFFFF


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns as int64 integers in the floats' order (−0.0 below +0.0), one step per representable float."""
    bits = x.view(torch.int32).long()
    return torch.where(bits < 0, -bits - (1 << 31) - 1, bits)


def _from_order_key(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key < 0, -key - 1 - (1 << 31), key)
    return bits.to(torch.int32).view(torch.float32)


# Elements per chunk of the elementwise work, whatever the weight's size. On a CPU: temporaries of at most 64 KiB
# (int64), below glibc's mmap threshold, so they are served from the heap and reused (larger ones were mapped and unmapped
# per chunk, or kept resident after the threshold rose). On a GPU: larger chunks, fewer kernel launches (8 MiB
# temporaries from torch's caching allocator). The results do not depend on the chunking.
CHUNK = 1 << 13
CHUNK_GPU = 1 << 20


def chunks(*tensors):
    """(offset, matching flat chunks of same-sized tensors) — views: writing to them writes the tensors."""
    flat = [t.view(-1) for t in tensors]
    size = CHUNK if flat[0].device.type == "cpu" else CHUNK_GPU
    for start in range(0, flat[0].numel(), size):
        yield start, [f[start : start + size] for f in flat]


class _Restore:
    """How to get θ back bit for bit after θ̂ = fl(θ + d) overwrote it: θ = fl(θ̂ − d) moved by `steps` representable
    floats (int8: almost always 0 or ±1), except at `where`, whose exact values are kept in `values`. Writes θ̂ into
    θ's storage, chunk by chunk."""

    def __init__(self, theta: torch.Tensor, delta: torch.Tensor):
        self.steps = torch.empty(theta.shape, dtype=torch.int8, device=theta.device)
        where, values = [], []
        for start, (th, d, st) in chunks(theta, delta, self.steps):
            shadow = th + d.float()
            steps = _order_key(th) - _order_key(shadow - d.float())
            far = (steps.abs() > 127).nonzero().squeeze(1)
            where.append(far + start)
            values.append(th[far].clone())
            st.copy_(steps.clamp(-127, 127))
            th.copy_(shadow)
        self.where = torch.cat(where) if where else torch.zeros(0, dtype=torch.long, device=theta.device)
        self.values = torch.cat(values) if values else theta.new_zeros(0)

    def apply(self, theta_storage: torch.Tensor, delta: torch.Tensor):
        for _, (th, d, st) in chunks(theta_storage, delta, self.steps):
            th.copy_(_from_order_key(_order_key(th - d.float()) + st.long()))
        theta_storage.view(-1)[self.where] = self.values


class DeltaShadow:
    """θ̂ for `shadow_storage="bf16_delta"`: the deltas d, θ̂'s bf16 gradient accumulators, and θ̂'s fp32 parameter
    slots that its optimizer steps (allocated only between the shadow's update and θ's)."""

    def __init__(self, base_params, seed: int):
        self.base = [p for _, p in base_params]
        bad = [n for n, p in base_params if p.dtype != torch.float32]
        if bad:
            raise ValueError(f"shadow_storage='bf16_delta' needs fp32 base weights θ; {bad[:3]} are not.")
        self.deltas = [torch.zeros_like(p, dtype=DELTA_DTYPE) for p in self.base]  # θ̂ ← θ⁰: d = 0
        self.slots = []
        for p in self.base:
            slot = torch.nn.Parameter(torch.empty_like(p))
            free(slot)
            self.slots.append(slot)
        self.grads: list[torch.Tensor | None] = [None] * len(self.base)
        self.seed = seed

    # ---- pass B --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def in_place(self, model, keep_grads: bool = False, hooks: bool = False):
        """θ̂ = fl(θ + d) in θ's storage; θ̂'s new gradient into its bf16 accumulator (unless `keep_grads`: no
        backward runs); θ restored bit for bit after. `hooks` (one process, no DDP/FSDP2 reducing `.grad` after the
        backward): each weight's fp32 gradient is folded into the accumulator and freed as soon as the backward has
        made it, so no full fp32 gradient of θ̂ is ever held."""
        reshard(model)
        restores, saved_grads, handles = [], [], []
        with torch.no_grad():
            for i, (p, d) in enumerate(zip(self.base, self.deltas)):
                restores.append(_Restore(local(p), local(d)))
                if not keep_grads:
                    saved_grads.append(p.grad)
                    p.grad = None
                    if hooks:
                        handles.append(p.register_post_accumulate_grad_hook(lambda p, i=i: self._accumulate(i, p)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            reshard(model)
            with torch.no_grad():
                for i, (p, d, restore) in enumerate(zip(self.base, self.deltas, restores)):
                    if not keep_grads:
                        self._accumulate(i, p)
                        p.grad = saved_grads[i]
                    restore.apply(local(p), local(d))

    @torch.no_grad()
    def _accumulate(self, i: int, p: torch.Tensor):
        """θ̂'s gradient accumulator i += p.grad (rounded to bf16); p.grad freed."""
        new, p.grad = p.grad, None
        if new is not None:
            acc = self.grads[i]
            self.grads[i] = new.to(DELTA_DTYPE) if acc is None else (acc.float() + new).to(DELTA_DTYPE)

    # ---- the update: θ̂ and θ together, weight by weight ---------------------------------------------------------
    def grad_norm(self) -> float:
        return sum_of_squares(g for g in self.grads if g is not None) ** 0.5

    def divergence_sq(self) -> float:
        """‖θ̂ − θ‖² = ‖d‖²."""
        return sum_of_squares(self.deltas)

    def drop_grads(self):
        self.grads = [None] * len(self.grads)

    def _key(self, step: int, i: int) -> int:
        return ((self.seed * 1_000_003 + step) * 1_000_033 + i) % (1 << 62)

    @torch.no_grad()
    def step_base(self, base_optimizer, step: int):
        """θ's own step alone, before pass B, weight by weight: θᵢ is stepped by θ's `base_optimizer` (its gradient,
        already clipped, then released) and dᵢ ← round(θᵢ_old + dᵢ − θᵢ), so that θ̂ stays where it is. One weight's
        fp32 θᵢ_old at a time."""
        grads = [p.grad for p in self.base]
        for p in self.base:  # each optimizer step below sees one weight's gradient only
            p.grad = None
        for i, (p, d) in enumerate(zip(self.base, self.deltas)):
            if grads[i] is None:
                continue
            old = local(p).clone()
            p.grad, grads[i] = grads[i], None
            base_optimizer.step()
            p.grad = None
            key, start = self._key(step, len(self.base) + i), global_start(d)  # bits apart from `step`'s rounding
            for offset, (dc, oc, pc) in chunks(local(d), old, local(p)):
                dc.copy_(stochastic_round((oc - pc) + dc.float(), rounding_noise(dc, key, start + offset)))
            del old

    @torch.no_grad()
    def step(self, optimizer, norm: float, max_norm: float, base_optimizer, step: int):
        """θ̂ ← θ̂ − α ∇θ̂ L_RL(θ̂,w) and θ's own step, weight by weight, so that at most one weight's θ̂ is ever in
        fp32: for weight i, θ̂ᵢ = θᵢ + dᵢ is materialised in its fp32 slot and stepped by θ̂'s `optimizer` with its
        gradient clipped like `clip_grad_norm` does (total norm `norm` to `max_norm`); θᵢ is stepped by θ's
        `base_optimizer` alone (its gradient, already clipped by the Trainer, is then released: the Trainer's own
        `optimizer.step()` right after finds no gradient on θ and leaves it); dᵢ ← round(θ̂ᵢ − θᵢ), stochastically,
        with bits keyed by (seed, `step`, i, element)."""
        coef = min(1.0, max_norm / (norm + 1e-6)) if 0 < max_norm < float("inf") else 1.0
        base_grads = [p.grad for p in self.base]
        for p in self.base:  # each optimizer step below sees one weight's gradient only
            p.grad = None
        for i, (p, d, slot) in enumerate(zip(self.base, self.deltas, self.slots)):
            allocate(slot)
            torch.add(local(p), local(d).float(), out=local(slot))
            grad, self.grads[i] = self.grads[i], None
            if grad is not None:  # a weight without gradient keeps θ̂ (the optimizer would skip it)
                slot.grad = grad.float() * coef if coef < 1.0 else grad.float()
                optimizer.step()
                slot.grad = None
            if base_grads[i] is not None:
                p.grad, base_grads[i] = base_grads[i], None
                base_optimizer.step()
                p.grad = None
            key, start = self._key(step, i), global_start(d)
            for offset, (dc, sc, pc) in chunks(local(d), local(slot), local(p)):
                dc.copy_(stochastic_round(sc - pc, rounding_noise(dc, key, start + offset)))
            free(slot)

    # ---- checkpoints and reads -----------------------------------------------------------------------------------
    def full_shadow(self, i: int) -> torch.Tensor:
        """θ̂ of parameter i as a full fp32 tensor (a collective under FSDP2)."""
        return full_tensor(self.base[i]) + full_tensor(self.deltas[i]).float()

    def bytes_per_parameter(self, optimizer) -> float:
        """Bytes θ̂ keeps between steps per trainable parameter: d and its optimizer's state (this rank's shards)."""
        held = sum(local(d).numel() * local(d).element_size() for d in self.deltas)
        for state in optimizer.state.values():
            held += sum(local(v).numel() * local(v).element_size() for v in state.values() if torch.is_tensor(v))
        return held / max(1, sum(local(p).numel() for p in self.base))
