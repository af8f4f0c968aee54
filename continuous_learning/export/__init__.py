"""Exports for the tools local users already chat with: GGUF for llama.cpp and Ollama (a LoRA adapter beside its
F16 base, or the adapter merged into the weights) and a merged Hugging Face folder. torch, transformers and peft
are imported inside the functions that need them, so `cl --help` stays fast."""
from __future__ import annotations

from .exporter import DEFAULT_QUANTS, FORMATS, ExportResult, export_model

__all__ = ["DEFAULT_QUANTS", "FORMATS", "ExportResult", "export_model"]
