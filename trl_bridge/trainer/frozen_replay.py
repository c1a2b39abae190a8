"""Frozen-activation replay: pass B reuses pass A's activations of the decoder layers below every trainable weight.

Pass A (θ) and pass B (θ̂) run the same rollouts through the same weights up to the first layer that holds a
trainable parameter (θ, θ̂ or w), so those layers compute the same numbers twice. `FrozenPrefixReplay` records the
output of the highest frozen layer during pass A (one tensor per log-prob chunk) and, during pass B, makes the first
frozen layer return it and the others pass it through. Single process and DDP (`share_frozen_activations`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def frozen_prefix_length(causal_lm, trainable) -> int:
    """The number L of decoder layers below every trainable parameter, when all of them sit in layers ≥ L or in the
    final norm / output head (0 otherwise: then nothing is shared)."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return 0
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    above = {id(p) for m in (getattr(backbone, "norm", None), causal_lm.get_output_embeddings()) if m is not None
             for p in m.parameters()}
    above -= {id(p) for p in causal_lm.get_input_embeddings().parameters()}  # tied head: the embedding trains
    if any(id(p) not in layer_of and id(p) not in above for p in trainable):
        return 0
    return min((layer_of[id(p)] for p in trainable if id(p) in layer_of), default=0)


class FrozenPrefixReplay:
    """Records the highest frozen layer's output in pass A and replays it in pass B. `length` = 0: inactive."""

    def __init__(self, causal_lm, length: int):
        self.length = length
        self._acts, self._recording = [], False
        self._layers = getattr(causal_lm, causal_lm.base_model_prefix).layers[:length] if length else []
        if length:
            self._layers[-1].register_forward_hook(self._record)

    def _record(self, module, args, output):
        if self._recording:
            self._acts.append(output.detach() if torch.is_tensor(output) else output)

    @contextmanager
    def recording(self, active: bool):
        """Pass A: keep the output of the highest frozen decoder layer (one per log-prob chunk) for pass B."""
        self._acts = []
        self._recording = bool(self.length) and active
        try:
            yield
        finally:
            self._recording = False

    @contextmanager
    def replaying(self, rows=None):
        """Pass B: the frozen decoder layers return pass A's activations instead of computing them (same rollouts,
        same weights below the first trainable layer: the same numbers); with `rows`, those rows' activations."""
        if not self._acts:
            yield
            return
        recorded = self._acts
        if rows is not None:  # TRL's loss forward runs the micro-batch as one chunk: so does pass B on the subset
            recorded = [torch.cat(recorded)[rows]]
        acts = iter(recorded)

        def first(hidden_states, *args, **kwargs):
            out = next(acts, None)
            if out is None or out.shape != hidden_states.shape:
                raise RuntimeError("pass B's frozen-layer inputs differ from pass A's; set `share_frozen_activations: false`")
            return out

        saved = [layer.__dict__.get("forward") for layer in self._layers]
        for i, layer in enumerate(self._layers):
            layer.forward = first if i == 0 else (lambda hidden_states, *args, **kwargs: hidden_states)
        try:
            yield
        finally:
            for layer, forward in zip(self._layers, saved):
                del layer.forward
                if forward is not None:
                    layer.forward = forward
            self._acts = []
