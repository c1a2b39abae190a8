"""The trainer wing: `BridgeTrainer` (the algorithm, `bridge_trainer.py`), `BridgeConfig`, and the modules the trainer
calls into (policy set-up, checks, frozen-activation replay, optimizers, numeric faults, KL reference, checkpoints,
the SFT stream, the model card)."""
