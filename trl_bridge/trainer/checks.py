"""What BridgeTrainer checks before step 1: its arguments and datasets, the RL batch shape, the engines it refuses,
the chat template, and one probe of every reward function. Each failure names the field or function at fault and
says what to use instead."""

from __future__ import annotations

import asyncio
import math

import torch
from datasets import Dataset
from trl import GRPOConfig
from trl.data_utils import is_conversational
from trl.trainer.utils import is_async_callable

from .bridge_config import BridgeConfig
from .dataset_checks import validate_rl_dataset, validate_sft_dataset

PROBE_COMPLETION = "The answer is \\boxed{0}."


def check_arguments(model, args, train_dataset, sft_dataset, optimizers, environment_factory):
    """BridgeTrainer's own arguments, before anything is built. Returns the BridgeConfig to train with: None becomes
    the defaults, a plain GRPOConfig keeps every value it sets (with BRIDGE's defaults for the rest, and a warning)."""
    if args is None:
        name = model if isinstance(model, str) else model.config._name_or_path
        args = BridgeConfig(f"{str(name).split('/')[-1]}-BRIDGE")
    elif isinstance(args, GRPOConfig) and not isinstance(args, BridgeConfig):
        args = BridgeConfig.from_grpo_config(args)
    if not isinstance(args, BridgeConfig):
        raise TypeError(f"`args` must be a BridgeConfig (it extends GRPOConfig), got {type(args).__name__}.")
    if optimizers != (None, None):
        raise ValueError("`optimizers` is not supported: BRIDGE builds one optimizer per parameter set (θ, θ̂, w).")
    if train_dataset is None and environment_factory is None:
        raise ValueError("`train_dataset` is required unless an `environment_factory` is provided.")  # GRPOTrainer's
    if isinstance(train_dataset, Dataset):
        validate_rl_dataset(train_dataset, name="`train_dataset` (RL prompts)")
        check_one_generation_batch(train_dataset, args)
    if sft_dataset is None and not args.lambda_is_always_one():
        raise ValueError(
            "`sft_dataset` is required: BRIDGE needs expert reasoning traces for L_SFT (only a run with "
            "bridge_lambda = 1 throughout, i.e. GRPO, can go without)."
        )
    if sft_dataset is not None:
        validate_sft_dataset(sft_dataset, name="`sft_dataset` (expert traces)")
    return args


def check_one_generation_batch(train_dataset: Dataset, args):
    """TRL's sampler only yields whole generation batches: with fewer distinct prompts than one batch needs, the epoch
    is empty and training stops at step 0, saving an untrained model. Refuse that before anything is built."""
    needed = args.generation_batch_size // args.num_generations
    if len(train_dataset) < needed:
        raise ValueError(
            f"`train_dataset` has {len(train_dataset)} prompts, but one generation batch needs {needed} distinct prompts "
            f"(generation_batch_size {args.generation_batch_size} = per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x {args.world_size} process(es) x steps_per_generation "
            f"{args.steps_per_generation}, divided by num_generations {args.num_generations}); with fewer, no batch is "
            "ever drawn and nothing trains. Add prompts, or lower per_device_train_batch_size / steps_per_generation."
        )


def refuse_unsupported_engines(trainer):
    """Engines BRIDGE cannot run correctly are refused here, before any step (an accelerate config sets them)."""
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            "BridgeTrainer does not support DeepSpeed: its engine steps θ inside backward() (the shadow pass would "
            "step θ a second time) and θ̂ and w, outside its optimizer, would never have their gradients reduced. "
            "Use FSDP2: `accelerate launch --config_file configs/accelerate/fsdp2.yaml ...`."
        )
    if trainer.is_fsdp_enabled:
        if trainer.args.sync_ref_model:
            raise ValueError(
                "BridgeTrainer does not support `sync_ref_model=True` under FSDP: the reference is synced from the "
                "merged policy θ+w, which is not gathered from the shards for it. Set `sync_ref_model=False` (the "
                "reference stays the initial policy) or train without FSDP."
            )
        if not trainer.accelerator.is_fsdp2:
            raise ValueError(
                "BridgeTrainer does not support FSDP1 (TRL's fused LM head reads the flattened shard of "
                "lm_head.weight). Use FSDP2: `fsdp_version: 2` in the accelerate config "
                "(configs/accelerate/fsdp2.yaml)."
            )
        sd_type = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
        if "FULL_STATE_DICT" not in sd_type:
            raise ValueError(
                f"BridgeTrainer under FSDP2 needs `fsdp_state_dict_type: FULL_STATE_DICT` (got {sd_type}): the merged "
                "π(θ+w) export and BRIDGE's checkpoints gather full tensors."
            )


def check_chat_template(processing_class, train_dataset, sft_dataset):
    """Conversational rows need the tokenizer's chat template; without one they would fail at step 1 (RL prompts)
    or inside the tokenizer with no word of which data or setting is at fault (expert traces)."""
    if getattr(processing_class, "chat_template", None):
        return
    for name, dataset in (("train_dataset` (RL prompts", train_dataset), ("sft_dataset` (expert traces", sft_dataset)):
        if isinstance(dataset, Dataset) and len(dataset) and is_conversational(dataset[0]):
            raise ValueError(
                f"`{name}) is conversational (lists of {{role, content}} messages), but the tokenizer "
                "(`processing_class`) has no chat template to render it. Use the tokenizer of a chat/instruct model, "
                "set `processing_class.chat_template`, or give plain-text "
                "prompts (`prompt_style: plain` in trl-bridge train)."
            )


def probe_reward_funcs(trainer, num_rows: int = 8, first_row_only: bool = False):
    """Call every reward function before any step, as in training (async functions are awaited on GRPOTrainer's event
    loop), with a fixed completion: on the first RL row alone, then on the first `num_rows` rows. Refused: a function
    that raises; one that does not return a list with one float (or None) per completion; ±inf (TRL would zero the
    advantages of the group); NaN on every row (TRL reads NaN like None, "no reward", so such a function never gives
    one); and reward functions that together give no reward on any probed row. `first_row_only`: the first call alone
    (the CLI's early check). Skipped when a `rollout_func` or an `environment_factory` supplies what the reward
    functions read (extra fields, `environments`).

    The number of calls is part of a run's numbers: a noisy reward (`with_reward_noise`) keys its draws by the call's
    number within the step, and the recorded runs were made with these probe calls before step 1."""
    if not isinstance(trainer.train_dataset, Dataset) or not trainer.probe_reward_funcs_before_training:
        return
    rows = [trainer.train_dataset[i] for i in range(min(num_rows, len(trainer.train_dataset)))]
    rewarded = [False] * len(rows)
    for func, name in zip(trainer.reward_funcs, trainer.reward_func_names):
        if isinstance(func, torch.nn.Module):  # a reward model always scores
            rewarded = [True] * len(rows)
            continue
        _call_on_rows(trainer, func, name, rows[:1])
        if first_row_only:
            continue
        values = _call_on_rows(trainer, func, name, rows)
        numbers = [math.nan if v is None else v for v in values]
        if any(math.isinf(v) for v in numbers):
            raise ValueError(f"Reward function {name!r} returned an infinite reward ({values}) when probed, before "
                             "training, on the first RL rows: rewards must be finite (TRL turns the group's "
                             "advantages into NaN and then zeroes them: the group teaches nothing).")
        if all(math.isnan(v) for v in numbers) and not all(v is None for v in values):
            raise ValueError(f"Reward function {name!r} returned NaN for every one of the first {len(rows)} RL rows "
                             "when probed before training: TRL reads NaN as 'no reward', so it would never reward "
                             "anything. Return a number, or None for the rows it does not apply to.")
        rewarded = [r or not math.isnan(v) for r, v in zip(rewarded, numbers)]
    if not first_row_only and not any(rewarded):
        raise ValueError(f"No reward function gave a reward (all returned None) for any of the first {len(rows)} "
                         f"RL rows when probed before training ({trainer.reward_func_names}): the RL loss would be zero. "
                         "Check that the reward functions apply to this dataset.")


def _call_on_rows(trainer, func, name, rows) -> list:
    """The function's rewards for `rows` with the probe completion: floats, None where it gave none."""
    prompts = [row["prompt"] for row in rows]
    completions = [[{"role": "assistant", "content": PROBE_COMPLETION}] if is_conversational({"prompt": p})
                   else PROBE_COMPLETION for p in prompts]
    extra = {k: [row[k] for row in rows] for k in rows[0] if k not in ("prompt", "completion", "completion_ids")}
    kwargs = dict(prompts=prompts, completions=completions, completion_ids=[[0]] * len(rows),
                  trainer_state=trainer.state, log_extra=lambda *a: None, log_metric=lambda *a: None, **extra)
    try:
        if is_async_callable(func):
            out = asyncio.run_coroutine_threadsafe(func(**kwargs), trainer.async_loop).result()
        else:
            out = func(**kwargs)
    except Exception as err:
        raise RuntimeError(
            f"Reward function {name!r} raised {type(err).__name__}: {err} when probed, before training, with the "
            f"first {len(rows)} RL row(s) (columns passed: {sorted(extra)}). Fix the function or the dataset columns "
            "it reads."
        ) from err
    if not isinstance(out, (list, tuple)) or not all(v is None or isinstance(v, (int, float)) for v in out):
        raise TypeError(
            f"Reward function {name!r} must return a list with one float (or None) per completion; for "
            f"{len(rows)} completion(s) it returned {out!r}."
        )
    if len(out) != len(rows):
        raise TypeError(f"Reward function {name!r} returned {len(out)} rewards for {len(rows)} completions.")
    return [None if v is None else float(v) for v in out]
