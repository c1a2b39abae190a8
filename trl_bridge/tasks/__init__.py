"""Tasks: training data (builtin sets, Hub and local sources), reward functions, answer grading, the benchmark registry, HumanEval and its sandbox."""
