"""Evaluation: `trl-bridge eval` on the benchmark registry (transformers or vLLM generation), and the in-training benchmark callback."""
