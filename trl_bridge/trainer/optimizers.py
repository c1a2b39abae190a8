"""The optimizers and learning-rate schedules of θ, θ̂ and w: the same optimizer class and schedule shape for all three
(each from its own peak learning rate), θ's in the Trainer's `optimizer`, θ̂'s and w's beside it."""

from __future__ import annotations

from transformers import get_scheduler

from ..engines.fsdp2 import LeanShadowOptimizer


def make_optimizer(trainer, named_params, lr: float, lean: bool = False):
    """The Trainer's optimizer class and kwargs (`optim`, `optim_args`, weight decay by the Trainer's own grouping) on
    `named_params` at peak `lr`. `lean` (θ̂ with `shadow_storage="lean"`): no first moment, second moment factored
    into row and column statistics."""
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    groups = [
        {"params": [p for n, p in named_params if n in decay], "weight_decay": trainer.args.weight_decay},
        {"params": [p for n, p in named_params if n not in decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if lean:
        return LeanShadowOptimizer(groups, lr=lr, beta1=None, relative_step=False, scale_parameter=False,
                                   warmup_init=False)
    optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    return optimizer_cls(groups, **{**optimizer_kwargs, "lr": lr})


def make_scheduler(args, optimizer, num_training_steps: int):
    """The same schedule shape for θ, θ̂ and w, each from its own peak lr (BridgeConfig made min_lr relative; the
    polynomial schedule's absolute `lr_end` is scaled here by this optimizer's peak over θ's)."""
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "polynomial":
        peak = optimizer.param_groups[0]["lr"]
        kwargs["lr_end"] = kwargs.get("lr_end", 1e-7) * (peak / args.learning_rate if args.learning_rate else 0.0)
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=kwargs,
    )
