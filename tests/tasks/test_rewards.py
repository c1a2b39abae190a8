"""Tests for trl_bridge.tasks.rewards: math correctness in TRL's signature, seeded reward noise, and the registry."""

import pytest

from trl_bridge.tasks import rewards
from trl_bridge.tasks.rewards import (
    boxed_format_reward,
    completion_text,
    get_reward_funcs,
    math_correctness_reward,
    with_reward_noise,
)


def test_correctness_on_plain_strings():
    completions = [
        "3 + 4 = 7. So the answer is \\boxed{7}.",
        "3 + 4 = 8. So the answer is \\boxed{8}.",
        "The fraction is \\boxed{\\frac{1}{2}}",
        "No answer here.",
    ]
    got = math_correctness_reward(prompts=["p"] * 4, completions=completions, answer=["7", "7", "0.5", "7"])
    assert got == [1.0, 0.0, 1.0, 0.0]
    assert all(isinstance(r, float) for r in got)


def test_correctness_on_conversational_completions_uses_last_message():
    completions = [
        [{"role": "assistant", "content": "12 * 3 = 36\n\\boxed{36}"}],
        [{"role": "assistant", "content": "\\boxed{36}"}, {"role": "assistant", "content": "\\boxed{35}"}],
    ]
    assert math_correctness_reward(completions=completions, answer=["36", "36"], completion_ids=[[1], [2]]) == [
        1.0,
        0.0,
    ]


def test_missing_gold_scores_zero_and_missing_column_is_named():
    assert math_correctness_reward(completions=["\\boxed{1}"], answer=[None]) == [0.0]
    with pytest.raises(ValueError, match="'answer'"):
        math_correctness_reward(completions=["\\boxed{1}"], solution=["1"])
    with pytest.raises(ValueError, match="2 completions but 1"):
        math_correctness_reward(completions=["a", "b"], answer=["1"])


def test_completion_text_variants():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"text": "b"}]}]) == "ab"
    assert completion_text([]) == ""
    with pytest.raises(TypeError, match="completions"):
        completion_text(42)


def test_boxed_format_reward():
    assert boxed_format_reward(["so \\boxed{4}", "so 4", "\\boxed{}"]) == [1.0, 0.0, 0.0]


def _constant(value):
    def reward(completions, **kwargs):
        return [value] * len(completions)

    return reward


def test_noise_flips_at_expected_rate_and_is_deterministic():
    base = _constant(1.0)
    noisy_a = with_reward_noise(base, flip_prob=0.3, seed=123)
    noisy_b = with_reward_noise(base, flip_prob=0.3, seed=123)
    noisy_c = with_reward_noise(base, flip_prob=0.3, seed=7)
    batch = ["c"] * 2000
    a, b, c = noisy_a(completions=batch), noisy_b(completions=batch), noisy_c(completions=batch)
    assert a == b
    assert a != c
    assert set(a) == {0.0, 1.0}
    assert 0.25 < a.count(0.0) / len(a) < 0.35
    # the stream continues across calls rather than restarting
    assert noisy_a(completions=batch) != a


def test_noise_in_a_trainer_depends_on_the_step_not_on_the_history():
    """What makes a resumed noisy run exact: the flips at global step k do not depend on the calls before it."""
    from types import SimpleNamespace

    batch = ["c"] * 200
    at = [SimpleNamespace(global_step=k) for k in range(4)]
    uninterrupted = with_reward_noise(_constant(1.0), flip_prob=0.3, seed=5)
    flips = [uninterrupted(completions=batch, trainer_state=s) for s in at]
    resumed = with_reward_noise(_constant(1.0), flip_prob=0.3, seed=5)  # a fresh process resuming at step 2
    assert [resumed(completions=batch, trainer_state=s) for s in at[2:]] == flips[2:]
    assert flips[2] != flips[3] and 0.2 < flips[2].count(0.0) / len(batch) < 0.4
    assert uninterrupted(completions=batch, trainer_state=at[3]) != flips[3]  # a second call at one step differs


def test_noise_edge_probabilities_and_name():
    base = math_correctness_reward
    never = with_reward_noise(base, 0.0, seed=0)
    always = with_reward_noise(base, 1.0, seed=0)
    kwargs = dict(completions=["\\boxed{2}", "\\boxed{3}"], answer=["2", "2"])
    assert never(**kwargs) == [1.0, 0.0]
    assert always(**kwargs) == [0.0, 1.0]
    assert never.__name__ == "noisy_math_correctness_reward"


def test_noise_rejects_bad_arguments_and_non_binary_rewards():
    with pytest.raises(ValueError, match="flip_prob"):
        with_reward_noise(math_correctness_reward, 1.5, seed=0)
    with pytest.raises(TypeError, match="reward_func"):
        with_reward_noise("math_correctness", 0.1, seed=0)
    with pytest.raises(ValueError, match="0/1"):
        with_reward_noise(_constant(0.5), 0.1, seed=0)(completions=["x"])
    assert with_reward_noise(_constant(None), 1.0, seed=0)(completions=["x"]) == [None]


def test_registry_names_dotted_paths_and_errors():
    assert get_reward_funcs(["math_correctness"]) == [math_correctness_reward]
    assert get_reward_funcs("math_correctness, boxed_format") == [math_correctness_reward, boxed_format_reward]
    assert get_reward_funcs(["trl_bridge.tasks.rewards.boxed_format_reward"]) == [boxed_format_reward]
    custom = _constant(1.0)
    assert get_reward_funcs([custom]) == [custom]
    with pytest.raises(ValueError, match="math_correctness") as info:
        get_reward_funcs(["accuracy"])
    assert "code_execution" in str(info.value)
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        get_reward_funcs(["no_such_pkg.mod.func"])
    with pytest.raises(ValueError, match="no attribute 'nope'"):
        get_reward_funcs(["trl_bridge.tasks.rewards.nope"])
    with pytest.raises(TypeError, match="not a callable"):
        get_reward_funcs(["trl_bridge.tasks.rewards.REWARD_REGISTRY"])
    with pytest.raises(ValueError, match="no reward functions"):
        get_reward_funcs([])


def test_code_execution_is_loaded_lazily_from_humaneval_module():
    try:
        from trl_bridge.tasks.humaneval import code_execution_reward
    except ImportError:
        with pytest.raises(ImportError):
            rewards.REWARD_REGISTRY["code_execution"]()
    else:
        assert get_reward_funcs(["code_execution"]) == [code_execution_reward]
