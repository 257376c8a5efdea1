"""Loads the native parts: ``qllm._core`` (C core on NumPy) and ``qllm._C``
(registers ``torch.ops.qllm``).  Importing them has no side effect beyond op
registration."""

from __future__ import annotations

try:
    from . import _core  # noqa: F401
    from . import _C  # noqa: F401  (registers torch.ops.qllm.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "qllm's native extension is not built or does not match this Python/torch "
        f"({exc}). Build it with `make build` (or `pip install --no-build-isolation "
        "--no-deps -e .`)."
    ) from exc

import torch

ops = torch.ops.qllm
