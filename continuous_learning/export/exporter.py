"""Export a registered adapter (or the champion, or the base) where local users chat: llama.cpp, Ollama, and
servers that take a plain Hugging Face model.

Formats, written into one folder (default `exports/<version>/` in the workspace) with a manifest:
- gguf-lora:   the adapter in llama.cpp's LoRA format, plus the F16 base GGUF it belongs to (`--lora`, Ollama ADAPTER);
- gguf-merged: the adapter merged into the full-precision base weights (PEFT merge_and_unload), as F16 and/or Q8_0;
- hf-merged:   the same merged model as a safetensors folder with tokenizer and config.
An Ollama Modelfile goes beside the GGUF files. Failed and tainted adapters are refused; every adapter file is
checked against the sha256 the registry recorded before anything is read.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ..core.errors import InputError, RegistryError
from ..core.settings import Settings
from . import gguf_files
from .modelfile import Decoding, commands, is_chatml, modelfile, ollama_name

FORMATS = ("gguf-lora", "gguf-merged", "hf-merged")
DEFAULT_QUANTS = ("f16", "q8_0")  # F16 answers exactly like PyTorch; Q8_0 is half the size
REFUSED_STATUSES = {
    "failed": "its training failed, so its weights are not a finished model",
    "tainted": "it was trained on data a user asked to forget",
}
Progress = Callable[[str], None]


@dataclass
class ExportedFile:
    kind: str  # base-gguf, lora-gguf, merged-gguf, hf-merged, modelfile
    path: Path
    bytes: int
    quant: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "bytes": self.bytes, "quant": self.quant}


@dataclass
class ExportResult:
    label: str  # the version, or 'base'
    version: str | None
    base_name: str
    folder: Path
    files: list[ExportedFile] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"label": self.label, "version": self.version, "base_model": self.base_name, "folder": str(self.folder),
                "files": [f.to_dict() for f in self.files], "commands": self.commands,
                "seconds": round(self.seconds, 1)}

    def file(self, kind: str, quant: str | None = None) -> Path | None:
        return next((f.path for f in self.files if f.kind == kind and (quant is None or f.quant == quant)), None)


@dataclass(frozen=True)
class Source:
    """What is exported: the base alone (version None) or one verified adapter folder on it."""

    label: str
    version: str | None
    adapter_folder: Path | None


# --- choosing and checking what to export --------------------------------------------------------------------------
def resolve_source(settings: Settings, doc: dict, requested: str) -> Source:
    """VERSION, 'champion' or 'base' -> a Source whose adapter files matched their recorded sha256."""
    from ..registry import adapter, verify_adapter_files

    if requested == "base":
        return Source("base", None, None)
    version = requested
    if requested == "champion":
        version = doc.get("champion")
        if version is None:
            raise RegistryError("there is no champion yet: the base model is serving",
                                "export 'base', or a version listed by 'cl adapters'")
    entry = adapter(doc, version)
    reason = REFUSED_STATUSES.get(entry.get("status", ""))
    if reason:
        raise RegistryError(f"adapter {version} is {entry['status']}: {reason}; refusing to export it",
                            "export the champion or another version listed by 'cl adapters'")
    return Source(version, version, verify_adapter_files(settings, {"version": version, **entry}))


def check_same_base(doc: dict, source: Source, base) -> None:
    if source.version is None:
        return
    from ..registry import registered_adapter

    trained_on = registered_adapter(doc, source.version).base_model
    recorded = trained_on.get("sha256")
    if recorded and recorded != base.sha256:
        name = trained_on.get("name", "another base")
        raise RegistryError(f"adapter {source.version} was trained on {name} (sha256 {recorded[:12]}), not on the "
                            f"configured base {base.name} (sha256 {base.sha256[:12]})",
                            "pass the base it was trained on with --base-model")


def check_formats(formats: tuple[str, ...], quants: tuple[str, ...]) -> None:
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError(f"unknown export format {', '.join(unknown) or '(none)'}", f"choose from {', '.join(FORMATS)}")
    bad = [q for q in quants if q not in gguf_files.QUANTS]
    if bad or not quants:
        raise InputError(f"unknown quantization {', '.join(bad) or '(none)'}",
                         f"choose from {', '.join(gguf_files.QUANTS)}")


def output_folder(settings: Settings, out: Path | None, label: str) -> Path:
    """The export folder, created and checked writable now rather than after minutes of converting."""
    folder = (out.expanduser() if out else settings.home / "exports" / label).resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".cl-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise InputError(f"cannot write the export to {folder}: {reason}",
                         "choose a writable folder with --out") from None
    return folder


# --- loading -------------------------------------------------------------------------------------------------------
def source_gguf(base) -> Path | None:
    """The GGUF file a base was converted from (its tokenizer metadata is copied as llama.cpp wrote it)."""
    marker = Path(base.path) / "cl_fingerprint.json"
    if not marker.exists():
        return None
    source = Path(orjson.loads(marker.read_bytes()).get("source") or "")
    return source if source.suffix == ".gguf" and source.is_file() else None


def load_full_precision(base):
    """The base in float32 on the CPU: merging into rounded or quantized weights would round the adapter too."""
    from ..chat.runtime import quiet_transformers as _quiet_transformers

    _quiet_transformers()  # offline first: huggingface_hub reads that once, when transformers imports it
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32, local_files_only=True)
    return model.eval()


def merged_model(model, adapter_folder: Path):
    from peft import PeftModel

    from ..chat.models import quiet_known_warnings

    quiet_known_warnings()
    return PeftModel.from_pretrained(model, str(adapter_folder)).merge_and_unload().eval()


def read_config(base) -> dict:
    return orjson.loads((Path(base.path) / "config.json").read_bytes())


# --- writing -------------------------------------------------------------------------------------------------------
class Writer:
    """Writes the files of one export into its folder and keeps the list."""

    def __init__(self, settings: Settings, base, source: Source, folder: Path, progress: Progress):
        self.settings, self.base, self.source, self.folder, self.progress = settings, base, source, folder, progress
        self.config = read_config(base)
        self.result = ExportResult(source.label, source.version, base.name, folder)
        self._tokenizer_header = None

    def tokenizer_header(self):
        if self._tokenizer_header is None:
            gguf, folder = source_gguf(self.base), Path(self.base.path)
            self._tokenizer_header = (gguf_files.tokenizer_from_gguf(gguf) if gguf else
                                      gguf_files.tokenizer_from_hf(folder, int(self.config["vocab_size"])))
        return self._tokenizer_header

    def add(self, kind: str, path: Path, quant: str | None = None) -> Path:
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        self.result.files.append(ExportedFile(kind, path, size, quant))
        return path

    def model_gguf(self, kind: str, name: str, state: dict, quant: str, title: str) -> Path:
        self.progress(f"writing {name}")
        path = gguf_files.write_model(self.folder / name, self.config, state, self.tokenizer_header(), quant, title)
        return self.add(kind, path, quant)

    def lora_gguf(self, name: str) -> Path:
        from safetensors.torch import load_file

        folder = self.source.adapter_folder
        self.progress(f"writing {name}")
        adapter_config = orjson.loads((folder / "adapter_config.json").read_bytes())
        state = load_file(str(folder / "adapter_model.safetensors"))
        title = f"{self.base.name} cl adapter {self.source.label}"
        path = gguf_files.write_lora(self.folder / name, self.config, state, adapter_config, title)
        return self.add("lora-gguf", path)

    def hf_folder(self, model, name: str) -> Path:
        from ..chat.models import load_tokenizer

        self.progress(f"writing {name}/")
        target, partial = self.folder / name, self.folder / f"{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(str(partial))
        load_tokenizer(self.base).save_pretrained(str(partial))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        return self.add("hf-merged", target)

    def text(self, kind: str, name: str, content: str) -> Path:
        path = self.folder / name
        partial = path.with_name(path.name + ".partial")
        partial.write_text(content, encoding="utf-8")
        os.replace(partial, path)
        return self.add(kind, path)


def decoding(settings: Settings) -> Decoding:
    chat = settings.chat
    return Decoding(chat.system_prompt, chat.temperature, chat.repetition_penalty, chat.repetition_window)


def _file_names(base_name: str, source: Source) -> dict[str, str]:
    stem = base_name if source.version is None else f"{base_name}-{source.label}"
    return {"base": f"{base_name}-f16.gguf", "lora": f"{stem}-lora-f16.gguf", "merged": stem + "-{quant}.gguf",
            "hf": "hf-merged" if source.version else "hf"}


def write_all(writer: Writer, formats: tuple[str, ...], quants: tuple[str, ...]) -> None:
    """Base GGUF and LoRA first (from the unmerged weights), then the merge, then the merged forms."""
    source, names = writer.source, _file_names(writer.base.name, writer.source)
    model = load_full_precision(writer.base)
    title = writer.base.name
    if "gguf-lora" in formats and source.version is not None:
        writer.model_gguf("base-gguf", names["base"], model.state_dict(), "f16", title)
        writer.lora_gguf(names["lora"])
    if source.version is not None and ("gguf-merged" in formats or "hf-merged" in formats):
        writer.progress(f"merging adapter {source.label} into the float32 base")
        model = merged_model(model, source.adapter_folder)
        title = f"{writer.base.name} + cl adapter {source.label} (merged)"
    if "gguf-merged" in formats:
        for quant in quants:
            writer.model_gguf("merged-gguf", names["merged"].format(quant=quant), model.state_dict(), quant, title)
    if "hf-merged" in formats:
        writer.hf_folder(model, names["hf"])


def write_modelfiles(writer: Writer) -> list[tuple[str, str]]:
    """Modelfile (base + ADAPTER) and Modelfile.merged (the merged F16, else the first merged file)."""
    from ..chat.models import load_tokenizer

    result, chat = writer.result, decoding(writer.settings)
    chatml = is_chatml(load_tokenizer(writer.base).chat_template)
    tag = ollama_name(writer.base.name, result.label)
    models = []
    base, lora = result.file("base-gguf"), result.file("lora-gguf")
    if base and lora:
        writer.text("modelfile", "Modelfile", modelfile(base.name, lora.name, chat, chatml))
        models.append((tag, "Modelfile"))
    merged = result.file("merged-gguf", "f16") or result.file("merged-gguf")
    if merged:
        name = "Modelfile.merged" if models else "Modelfile"
        writer.text("modelfile", name, modelfile(merged.name, None, chat, chatml))
        models.append((tag.replace(":", ":merged-") if models else tag, name))
    return models


def export_model(settings: Settings, requested: str, formats: tuple[str, ...] = FORMATS,
                 quants: tuple[str, ...] = DEFAULT_QUANTS, out: Path | None = None,
                 progress: Progress | None = None) -> ExportResult:
    """Export VERSION / 'champion' / 'base' in the given formats; returns the files written and the commands."""
    from .. import registry
    from ..chat.models import resolve_base, set_threads

    started, progress = time.perf_counter(), progress or (lambda _message: None)
    check_formats(formats, quants)
    doc = registry.load(settings)
    source = resolve_source(settings, doc, requested)
    base = resolve_base(settings)
    check_same_base(doc, source, base)
    if any(f.startswith("gguf") for f in formats):
        gguf_files.check_supported(read_config(base))
    writer = Writer(settings, base, source, output_folder(settings, out, source.label), progress)
    set_threads(settings)
    write_all(writer, formats, quants)
    models = write_modelfiles(writer)
    result = writer.result
    base_file, lora, merged = result.file("base-gguf"), result.file("lora-gguf"), result.file("merged-gguf")
    result.commands = commands(writer.folder, base_file and base_file.name, lora and lora.name,
                               merged and merged.name, models, decoding(settings))
    result.seconds = time.perf_counter() - started
    writer.text("manifest", "export.json", orjson.dumps(manifest(result, base), option=orjson.OPT_INDENT_2).decode())
    return result


def manifest(result: ExportResult, base) -> dict:
    from ..core.records import utc_now

    return {**result.to_dict(), "base_sha256": base.sha256, "created_at": utc_now()}
