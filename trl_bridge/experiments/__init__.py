"""Experiment tooling: `trl-bridge compare` (BRIDGE against its baselines over seeds), `trl-bridge bench` (step time and memory), progress lines, and the memory arithmetic."""
