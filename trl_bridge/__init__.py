"""trl-bridge: BRIDGE (cooperative SFT + RL, arXiv 2509.06948) on top of TRL's GRPOTrainer."""

__version__ = "0.1.0"

__all__ = ["BridgeConfig", "BridgeTrainer", "TrainingInterrupted"]


def __getattr__(name):  # lazy: `import trl_bridge` stays cheap for the CLI and the evaluator
    if name == "BridgeConfig":
        from .trainer.bridge_config import BridgeConfig

        return BridgeConfig
    if name == "BridgeTrainer":
        from .trainer.bridge_trainer import BridgeTrainer

        return BridgeTrainer
    if name == "TrainingInterrupted":
        from .trainer.checkpointing import TrainingInterrupted

        return TrainingInterrupted
    raise AttributeError(f"module 'trl_bridge' has no attribute {name!r}")
