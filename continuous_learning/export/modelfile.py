"""The Ollama Modelfile and the llama.cpp / Ollama command lines that go with an export (pure text, no IO)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# Ollama's Go-template form of the ChatML template SmolLM2's tokenizer carries (system, then user/assistant turns,
# then an open assistant turn); the legacy single-prompt form (`ollama run` without chat) is the else branch.
CHATML_TEMPLATE = """{{- if .Messages }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
{{ else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}"""
CHATML_STOPS = ("<|im_end|>", "<|im_start|>")


@dataclass(frozen=True)
class Decoding:
    """The chat's decoding settings, written into the Modelfile and the command lines so they answer alike."""

    system_prompt: str
    temperature: float
    repeat_penalty: float
    repeat_last_n: int


def is_chatml(chat_template: str | None) -> bool:
    return bool(chat_template) and "<|im_start|>" in chat_template


def _quoted(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(model_file: str, adapter_file: str | None, decoding: Decoding, chatml: bool) -> str:
    """An Ollama Modelfile whose paths are relative to the folder it sits in (Ollama resolves them so)."""
    lines = [f"FROM ./{model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if chatml:
        lines.append(f"TEMPLATE {_quoted(CHATML_TEMPLATE)}")
    else:
        lines.append("# TEMPLATE: Ollama takes the chat template stored in the GGUF file")
    lines.append(f"SYSTEM {_quoted(decoding.system_prompt)}")
    if chatml:
        lines += [f'PARAMETER stop "{stop}"' for stop in CHATML_STOPS]
    lines += [
        f"PARAMETER temperature {decoding.temperature:g}",
        f"PARAMETER repeat_penalty {decoding.repeat_penalty:g}",
        f"PARAMETER repeat_last_n {decoding.repeat_last_n}",
    ]
    return "\n".join(lines) + "\n"


def ollama_name(base_name: str, label: str) -> str:
    """A valid Ollama model name: lower case letters, digits, '.', '-', '_' and a tag."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", base_name.lower()).strip("-._") or "model"
    return f"{stem}-cl:{label}"


def _llama_flags(decoding: Decoding) -> str:
    return f"--temp {decoding.temperature:g} --repeat-penalty {decoding.repeat_penalty:g} " \
           f"--repeat-last-n {decoding.repeat_last_n}"


def commands(folder: Path, base_file: str | None, lora_file: str | None, merged_file: str | None,
             ollama_models: list[tuple[str, str]], decoding: Decoding) -> list[str]:
    """The lines a user copies: `ollama create` per (tag, Modelfile), llama-cli for a chat, llama-server for an
    OpenAI-compatible endpoint, each with the chat's decoding settings."""
    flags = _llama_flags(decoding)
    lines = [f"ollama create {tag} -f {folder / name} && ollama run {tag}" for tag, name in ollama_models]
    if base_file and lora_file:
        lines.append(f"llama-cli -m {folder / base_file} --lora {folder / lora_file} -cnv {flags}")
        lines.append(f"llama-server -m {folder / base_file} --lora {folder / lora_file} --port 8080 {flags}")
    if merged_file:
        lines.append(f"llama-cli -m {folder / merged_file} -cnv {flags}")
        lines.append(f"llama-server -m {folder / merged_file} --port 8080 {flags}")
    return lines
