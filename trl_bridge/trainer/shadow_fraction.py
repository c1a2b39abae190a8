"""`shadow_fraction` < 1 (an extension beyond the paper): pass B on a seeded random subset of whole prompt groups,
its L_RL(θ̂,w) gradient rescaled to be unbiased for the full pass."""

from __future__ import annotations

import torch


def draw_shadow_rows(group_ids: torch.Tensor, groups: int, drawn: int, seed: int, step: int) -> torch.Tensor:
    """Which local rollouts the shadow pass uses: the rows of `drawn` of the generation batch's `groups` prompt groups,
    drawn uniformly without replacement, seeded by the run's seed and the micro-step of generation (the same on every
    process; stored with the buffered rollouts, so a resumed run uses the same draw)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    chosen = torch.zeros(groups, dtype=torch.bool)
    chosen[torch.randperm(groups, generator=generator)[:drawn]] = True
    return chosen.to(group_ids.device)[group_ids]


def shadow_subset(inputs: dict, base_logps: torch.Tensor, loss_type: str, groups: int, drawn: int):
    """The micro-batch's rows of the drawn prompt groups, and the factor that makes the subset's L_RL(θ̂,w) gradient
    unbiased for the full micro-batch's. Each row is drawn with probability f = k/G (k of the generation batch's G
    groups), so (subset loss × c) / f is unbiased, where c turns the subset loss into the full loss restricted to the
    subset (TRL normalises per row for grpo/sapo/luspo/dr_grpo, per token of the micro-batch for bnpo, by a batch-wide
    constant for dapo/cispo/vespo). A micro-batch without a drawn row still runs pass B on one row, at scale 0, so
    that every process takes part in the gradient collectives. Returns (subset inputs, subset log-probs, rows, scale)."""
    chosen = inputs["bridge_shadow_rows"]
    size = chosen.numel()
    rows = chosen.nonzero().squeeze(1)
    if rows.numel() == 0:
        rows, factor = rows.new_zeros(1), 0.0
    elif loss_type == "bnpo":
        mask = inputs["completion_mask"] if inputs.get("tool_mask") is None else inputs["completion_mask"] * inputs["tool_mask"]
        factor = float(mask[rows].sum().clamp(min=1.0) / mask.sum().clamp(min=1.0))
    elif loss_type in ("grpo", "sapo", "luspo", "dr_grpo"):
        factor = rows.numel() / size
    else:  # dapo, cispo, vespo: the normaliser is num_items_in_batch, the same for any subset
        factor = 1.0
    subset = {k: v[rows] if torch.is_tensor(v) and v.dim() >= 1 and v.size(0) == size else v for k, v in inputs.items()}
    return subset, base_logps[rows], rows, factor * groups / drawn
