"""The library versions BridgeTrainer is tested against, checked when `trl_bridge.trainer.bridge_config` is imported.

BridgeTrainer overrides private methods of TRL's `GRPOTrainer` and of transformers' `Trainer` (`_compute_loss`,
`_generate_and_score_completions`, `_clip_grad_norm`, `_load_from_checkpoint`, ...). A release outside the tested
range may rename or re-sequence them, and BRIDGE would then train wrongly without an error. `pyproject.toml` pins the
same ranges, but an install with `--no-deps` or a newer environment can bypass the pin, so the check runs at import.
Setting `TRL_BRIDGE_ALLOW_UNTESTED_VERSIONS=1` turns the error into a warning (for trying a new release on purpose).
"""

from __future__ import annotations

import os
import warnings
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Keep in sync with `pyproject.toml` (tests/trainer/test_grpo_compat.py checks that they agree).
TESTED_VERSIONS = {"trl": ">=1.16,<1.17", "transformers": ">=5.0,<6"}
OVERRIDE_ENV = "TRL_BRIDGE_ALLOW_UNTESTED_VERSIONS"


def check_versions(get_version=version) -> None:
    """Raise `ImportError` naming the tested range when an installed trl/transformers lies outside it."""
    problems = []
    for package, spec in TESTED_VERSIONS.items():
        try:
            installed = get_version(package)
        except PackageNotFoundError:
            problems.append(f"{package} is not installed (tested: {package}{spec})")
            continue
        if Version(installed) not in SpecifierSet(spec, prereleases=True):
            problems.append(f"{package} {installed} is installed, but trl-bridge is tested with {package}{spec}")
    if not problems:
        return
    message = (
        "; ".join(problems) + ". BridgeTrainer overrides private GRPOTrainer/Trainer methods, so an untested version "
        f"may train wrongly without an error. Install the tested versions (`pip install 'trl{TESTED_VERSIONS['trl']}' "
        f"'transformers{TESTED_VERSIONS['transformers']}'`), or set {OVERRIDE_ENV}=1 to try anyway."
    )
    if os.environ.get(OVERRIDE_ENV, "0") == "1":
        warnings.warn(message, UserWarning, stacklevel=2)
        return
    raise ImportError(message)
