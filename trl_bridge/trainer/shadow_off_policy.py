"""`shadow_off_policy="truncated_is"` (BRIDGE.md §5, an open point of the paper): pass B learns from rollouts sampled
from π(θ+w), not from π(θ̂+w); each token's advantage is re-weighted by min(π(θ̂+w)/π(θ+w), C), detached, with both
policies' log-probs at sampling time."""

from __future__ import annotations

import torch


def behaviour_logps(output: dict, use_vllm: bool, vllm_importance_sampling_correction: bool):
    """The log-probs that truncated IS divides by: the policy the rollouts are corrected to. With vLLM and TRL's
    importance-sampling correction, TRL already re-weights every token by π(θ+w)/π_vLLM in both passes, so the
    shadow's ratio is against π(θ+w) at sampling time; with vLLM uncorrected, against vLLM's own sampling log-probs;
    otherwise against π(θ+w) at sampling time (None: pass A's log-probs, θ and w have not moved since)."""
    if use_vllm and not vllm_importance_sampling_correction:
        return output.get("sampling_per_token_logps")
    return output.get("old_per_token_logps")


def truncated_is_advantages(advantages, shadow_logps, behaviour_logps, cap: float):
    ratio = torch.exp(shadow_logps - behaviour_logps).clamp(max=cap)
    return (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages) * ratio


def reweight_shadow_advantages(shadow_inputs: dict, inputs: dict, base_logps, cap: float):
    """Re-weight `shadow_inputs["advantages"]` for pass B. With θ̂'s log-probs at sampling time kept (GRPOTrainer keeps
    old log-probs) this is done now and None is returned. Otherwise θ and θ̂ have not moved since sampling: the ratio is
    pass B's own log-probs over pass A's, and the returned function applies it as soon as pass B has computed them
    (before TRL's loss reads the advantages)."""
    behaviour = inputs.get("behaviour_per_token_logps", base_logps)
    if "shadow_old_per_token_logps" in inputs:
        shadow_inputs["advantages"] = truncated_is_advantages(
            inputs["advantages"], inputs["shadow_old_per_token_logps"], behaviour, cap)
        return None

    def reweight(shadow_logps):
        shadow_inputs["advantages"] = truncated_is_advantages(shadow_inputs["advantages"], shadow_logps, behaviour, cap)
    return reweight
