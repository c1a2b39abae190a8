"""BridgeTrainer's model card: BRIDGE (with the citation), the base model, the task, data, hyper-parameters, a summary
(held-out accuracy before → after when measured, mean reward over the last quarter of training) and usage."""

from __future__ import annotations

from .model_setup import model_name as _model_name

CARD_HYPERPARAMETERS = (
    "bridge_lambda", "bridge_lambda_end", "bridge_lambda_warmup_steps", "learning_rate", "adapter_learning_rate",
    "shadow_learning_rate", "lora_r", "lora_alpha", "trainable_base_parameters", "shadow_off_policy", "loss_type",
    "beta", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "max_completion_length",
    "sft_per_device_train_batch_size", "sft_max_length", "max_steps", "seed",
)
CARD_METRICS = ("reward", "bridge/sft_loss", "bridge/rl_loss", "bridge/rl_loss_shadow", "bridge/cooperative_gain", "bridge/lambda")


def write_bridge_model_card(trainer, model_name=None, dataset_name=None):
    from .reporting import training_summary, write_model_card

    args = trainer.args
    hparams = {k: getattr(args, k) for k in CARD_HYPERPARAMETERS}
    summary = training_summary(trainer.state.log_history, fraction=0.25, keys=CARD_METRICS)
    datasets = trainer.card_datasets or ([dataset_name] if isinstance(dataset_name, str) else list(dataset_name or []))
    pushed = args.push_to_hub and args.hub_model_id
    write_model_card(
        args.output_dir,
        base_model=trainer.card_base_model or getattr(trainer, "_given_model_name", None)
        or _model_name(trainer.accelerator.unwrap_model(trainer.model)),
        datasets=datasets,
        hyperparameters=hparams,
        final_metrics=summary["last"],
        eval_results=trainer.card_eval_results,
        model_name=model_name,
        summary=summary,
        heldout=trainer.card_heldout,
        task=trainer.card_task,
        usage_model=args.hub_model_id if pushed else None,
    )
