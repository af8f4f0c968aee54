"""Generation: a base model with LoRA adapters side by side (`ChatModel`: serve a version, stream an answer, batch
greedy answers), the same behind a background load (`LoadingChatModel`), and the transformers hooks streaming
uses. torch, transformers and peft are imported inside methods so the CLI stays fast."""
from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ModelNotFoundError
from ..core.settings import Settings
from .repetition import RepetitionControl, line_loop, penalize_repetition
from .resolve import BaseModel, resolve_base
from .runtime import load_model, load_tokenizer, quiet_known_warnings, set_threads


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
            from ..registry import adapter_view, verify_adapter_files

            entry = adapter_view(doc, version)
            if entry is None:
                raise ModelNotFoundError(f"adapter {version} is not registered", "see 'cl adapters'")
            self.use(version, verify_adapter_files(settings, entry))
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
        self._record(stats, produced["ids"], prompt_length, started, stop_flag, max_new_tokens)

    def _record(self, stats: GenerationStats, output_ids, prompt_length: int, started: float,
                stop_flag: threading.Event, max_new_tokens: int) -> None:
        """Fill `stats` once a streamed generation has ended."""
        new_ids = output_ids[0, prompt_length:]
        stats.prompt_tokens = prompt_length
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
