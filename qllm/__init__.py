"""qllm: query-aware context memory (Q-LLM) for Hugging Face models.

Importing qllm patches nothing; it loads the native ops (``torch.ops.qllm``)
and registers the pipeline task name ``"qllm-text-generation"``.
"""

from __future__ import annotations

import torch  # noqa: F401  (the ops library needs torch loaded first)

from ._ext import _core, ops
from .cache import QLLMCache
from . import heads
from .config import QLLMConfig
from .generate import QLLMTextGenerationPipeline, build_prompt, generate, register_pipeline
from .models import default_model_path, load_model
from .patch import is_patched, patch, patched, record, set_question, unpatch

__version__ = "0.1.0"
__all__ = [
    "QLLMConfig", "QLLMCache", "patch", "unpatch", "patched", "is_patched", "set_question", "record",
    "generate", "build_prompt", "QLLMTextGenerationPipeline", "register_pipeline",
    "load_model", "default_model_path", "heads", "ops", "_core", "__version__",
]

register_pipeline()
