"""Base model resolution, adapter loading and generation, importable from one place.

The code lives in `runtime` (offline environment, quiet logs, device, loading), `resolve` (base model setting ->
loadable folder, GGUF conversion cache), `repetition` (penalties and line-loop checks) and `generation`
(`ChatModel`, `LoadingChatModel`); this module re-exports their public names for the many modules that import
them from here. Nothing here downloads, and importing it changes nothing (torch and transformers load lazily).
"""
from __future__ import annotations

from ..registry import file_sha256
from .generation import (
    ChatModel,
    GenerationStats,
    LoadingChatModel,
    ProgressCallback,
    adapter_name,
    answer_once,
)
from .repetition import (
    PARTIAL_COPY_CHARS,
    STRUCTURAL_LINE_CHARS,
    RepetitionControl,
    line_loop,
    looping_tokens,
    penalize_repetition,
    token_pieces,
    wasted_lines,
)
from .resolve import BUNDLED_FILE, BUNDLED_PACKAGE, HOW_TO_GET_BUNDLED, BaseModel, bundled_gguf, resolve_base
from .runtime import (
    OFFLINE_ENVIRONMENT,
    device,
    load_model,
    load_tokenizer,
    offline_hub,
    quiet_known_warnings,
    quiet_transformers,
    set_threads,
)

__all__ = [
    "BUNDLED_FILE", "BUNDLED_PACKAGE", "HOW_TO_GET_BUNDLED", "OFFLINE_ENVIRONMENT", "PARTIAL_COPY_CHARS",
    "STRUCTURAL_LINE_CHARS", "BaseModel", "ChatModel", "GenerationStats", "LoadingChatModel", "ProgressCallback",
    "RepetitionControl", "adapter_name", "answer_once", "bundled_gguf", "device", "file_sha256", "line_loop",
    "load_model", "load_tokenizer", "looping_tokens", "offline_hub", "penalize_repetition", "quiet_known_warnings",
    "quiet_transformers", "resolve_base", "set_threads", "token_pieces", "wasted_lines",
]
