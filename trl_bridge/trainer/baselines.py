"""The paper's strongest SFT+RL baselines, as options of the same trainer (so they run in BRIDGE's engine, on its
data, rewards and grader): CHORD and LUFFY. Each function names the paper and the reference code it follows.

CHORD (Zhang et al., arXiv:2508.11408; reference: modelscope/Trinity-RFT `mix_chord`, `MIXCHORDPolicyLossFn`):
    L = (1−μ)·L_GRPO + μ·L_SFT, on one model. CHORD-μ: μ rises linearly from 0 to `chord_mu_peak` over
    `chord_mu_warmup_steps`, then decays along a half cosine to `chord_mu_valley` over `chord_mu_decay_steps`, and stays
    there. CHORD-φ: L_SFT weighs each expert token's NLL by φ(p) = p(1−p) (p the policy's probability of the token,
    detached), a token-mean over the batch. In BridgeTrainer: λ = 1 − μ(step) with the SFT loss φ-weighted
    (`chord_phi`); `trl-bridge compare`'s `chord` runs it on θ without adapter and shadow.

LUFFY (Yan et al., arXiv:2504.14945; reference: ElliottYan/LUFFY, verl `mix_src`): mixed-policy GRPO. In each group of
    `num_generations` rollouts of a prompt, the last is replaced by the prompt's expert trace (LUFFY: 7 on-policy + 1
    off-policy); it is rewarded like any rollout, and TRL's group advantages are computed over the union. On-policy
    tokens keep GRPO's loss; off-policy tokens take −Â·f(π_θ(y_t)) with the policy shaping f(x) = x/(x+γ), γ = 0.1,
    the off-policy (expert) probability taken as 1, and no clipping (`mix_core_alg.compute_token_on_off_policy_loss`,
    `off_policy_reshape="p_div_p_0.1"`). Implemented as the equal-gradient surrogate inside TRL's own loss: on the
    off-policy rows the ratio is held at 1 (their old log-probs are the current ones, detached) and the advantage of
    token t is multiplied by f'(π)·π = γπ/(π+γ)² (detached), so ∇(−Â·w·ratio) = −Â·γπ/(π+γ)²·∇log π = ∇(−Â·f(π)).
    The logged loss value is the surrogate's, not −Â·f(π).
"""

from __future__ import annotations

import json
import math

import torch
from datasets import Dataset

LUFFY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # surrogate −Â·ratio whose gradient at ratio 1 is −Â·∇log π


# ----------------------------------------------------------------------------------------------------------------------
# CHORD
# ----------------------------------------------------------------------------------------------------------------------
def chord_mu(step: int, peak: float, valley: float, warmup_steps: int, decay_steps: int) -> float:
    """μ at optimizer step `step`: linear warm-up from 0 to `peak`, then a half-cosine decay to `valley`, then `valley`
    (Trinity-RFT `mu_schedule_function`)."""
    if step < warmup_steps:
        return step / warmup_steps * peak
    if step >= warmup_steps + decay_steps:
        return valley
    progress = (step - warmup_steps) / decay_steps
    return (peak - valley) * 0.5 * (1.0 + math.cos(math.pi * progress)) + valley


def chord_phi_nll_sum(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CHORD-φ's SFT loss, summed over the batch's expert tokens: Σ −φ(p)·log p, φ(p) = p(1−p) detached
    (`SFTPhiLossFn`; the trainer divides by the token count, as for the plain NLL)."""
    p = log_probs.detach().exp()
    return (-(p * (1.0 - p)) * log_probs)[mask].sum()


# ----------------------------------------------------------------------------------------------------------------------
# LUFFY
# ----------------------------------------------------------------------------------------------------------------------
def prompt_key(prompt) -> str:
    """A dataset prompt (a string or a list of chat messages) as a lookup key."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


class ExpertTraces:
    """The expert trace of each RL prompt, for LUFFY's off-policy rollout: the SFT dataset's completion of the same
    prompt (prompt-completion rows, or `messages` rows whose last message is the assistant's)."""

    def __init__(self, sft_dataset, tokenizer, eos_token_id: int, max_completion_length: int):
        self.tokenizer, self.eos_token_id, self.max_length = tokenizer, eos_token_id, max_completion_length
        columns = sft_dataset.column_names
        if "prompt" in columns and "completion" in columns:
            pairs = zip(sft_dataset["prompt"], sft_dataset["completion"])
        elif "messages" in columns:
            pairs = ((m[:-1], m[-1:]) for m in sft_dataset["messages"])
        else:
            raise ValueError(
                "`luffy` needs the expert trace of each RL prompt: `sft_dataset` must pair prompts with completions "
                f"('prompt' + 'completion', or 'messages'); it has columns {columns}."
            )
        self.traces = {}
        for prompt, completion in pairs:
            self.traces.setdefault(prompt_key(prompt), completion)

    @classmethod
    def for_luffy(cls, args, sft_dataset, train_dataset, tokenizer, own_generation: bool) -> "ExpertTraces | None":
        """The traces LUFFY injects (None without `luffy`), refused without an SFT dataset, without TRL's own
        generation (a `rollout_func`, `environment_factory` or `tools`) or with an RL prompt that has no trace."""
        if not args.luffy:
            return None
        if sft_dataset is None or not own_generation:
            raise ValueError("`luffy` needs `sft_dataset` (the expert traces) and TRL's own generation (no "
                             "`rollout_func`, `environment_factory` or `tools`).")
        traces = cls(sft_dataset, tokenizer, tokenizer.eos_token_id, args.max_completion_length)
        if isinstance(train_dataset, Dataset):
            traces.check_covers(train_dataset)
        return traces

    def check_covers(self, train_dataset):
        """Every RL prompt needs a trace: a group without one would silently train as plain GRPO."""
        missing = [i for i, p in enumerate(train_dataset["prompt"]) if prompt_key(p) not in self.traces]
        if missing:
            raise ValueError(
                f"`luffy`: {len(missing)} of {len(train_dataset)} RL prompts (rows {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}) have no expert trace with the same prompt in `sft_dataset`. "
                "LUFFY puts each prompt's expert trace into its group of rollouts: give every RL prompt one."
            )

    def token_ids(self, completion) -> list[int]:
        """The trace as completion token ids: its text, then EOS; truncated to `max_completion_length` (then without
        EOS, like a rollout cut at the length limit)."""
        text = completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos_token_id]
        return ids[: self.max_length]

    def inject(self, prompts, completion_ids, completions, first_global_row: int, num_generations: int):
        """Replace the last rollout of every group by the prompt's expert trace. Returns the new completion ids and
        completions and, per local row, whether it is the off-policy (expert) one."""
        completion_ids, completions, off_policy = list(completion_ids), list(completions), []
        for i, prompt in enumerate(prompts):
            expert = (first_global_row + i) % num_generations == num_generations - 1
            off_policy.append(expert)
            if expert:
                trace = self.traces[prompt_key(prompt)]
                completion_ids[i] = self.token_ids(trace)
                completions[i] = trace  # what the reward functions read, in the dataset's format
        return completion_ids, completions, off_policy


def luffy_shaping_weight(logps: torch.Tensor, gamma: float) -> torch.Tensor:
    """f'(π)·π for f(x) = x/(x+γ): the factor that turns −Â·∇log π into ∇(−Â·f(π)) (detached)."""
    p = logps.detach().exp()
    return gamma * p / (p + gamma) ** 2


def luffy_reweight(inputs: dict, logps: torch.Tensor, gamma: float):
    """On the off-policy rows of `inputs` (`luffy_off_policy`): per-token advantages Â·f'(π)·π and the ratio held at 1
    (old log-probs = the current ones, detached). Called with the loss forward's own log-probs, before TRL's loss reads
    the advantages; `inputs` is the loss's own copy of the batch."""
    rows = inputs["luffy_off_policy"]
    if not bool(rows.any()):
        return
    advantages = inputs["advantages"]
    advantages = (advantages.unsqueeze(1) if advantages.dim() == 1 else advantages).expand_as(logps).clone()
    advantages[rows] = advantages[rows] * luffy_shaping_weight(logps[rows], gamma)
    inputs["advantages"] = advantages
    old = inputs.get("old_per_token_logps")
    if old is not None:
        old = old.clone()
        old[rows] = logps[rows].detach()
        inputs["old_per_token_logps"] = old
