"""The settings sections: one frozen dataclass per `cl.toml` section, every knob with its default and help text.

Every section checks its own ranges when it is built (`__post_init__`), so consumers never re-check a knob. The
loader that fills them from flags, environment and `cl.toml` lives in `settings`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

BUNDLED_MODEL = "bundled:SmolLM2-135M-Instruct"
DEFAULT_KNOWLEDGE_PATTERNS = (
    r"\b(?:lot|batch|part|order|serial)\s*(?:no\.?|number|#)?\s*[A-Z]{1,4}-?\d{1,6}[A-Z]?\b",
)


RANGE_HINT = "fix it in cl.toml, the environment (CL_<SECTION>_<NAME>) or the flag"
TRAIN_HINT = "change the flag, the [train] section of cl.toml or the CL_TRAIN_* variable"
OBJECTIVES = ("auto", "sft", "kto", "dpo")  # what ratings train (train.preference implements them)
REHEARSAL_MODES = ("kl", "sft", "off")  # against forgetting (train.rehearsal implements them)
KL_REFERENCES = ("base", "parent")  # whom the KL term holds a warm-started adapter to


def _knob(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):  # every instance gets its own copy: a shared default could be mutated
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _require(section: str, config: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise one ConfigError naming the first knob whose check failed: `(field, ok, rule)`."""
    for name, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{section}.{name} must be {rule}, got {getattr(config, name)!r}", RANGE_HINT)


def _probability(value: float) -> bool:
    return 0 < value < 1


def _strings(values: list) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) and v.strip() for v in values)


@dataclass(frozen=True)
class ModelConfig:
    base_model: str = _knob(BUNDLED_MODEL, "Base model: 'bundled:...', a local HF folder, a hub id in the HF cache, or "
                                           "a .gguf file")
    cache_dir: str = _knob("", "Where converted base models are cached, shared by workspaces (default: ~/.cache/cl)")
    threads: int = _knob(0, "Torch CPU threads (0 = torch default)")

    def __post_init__(self) -> None:
        _require("model", self, [("threads", self.threads >= 0, ">= 0 (0 = torch default)")])


@dataclass(frozen=True)
class ChatConfig:
    system_prompt: str = _knob("You are a helpful assistant.", "System prompt of new chat sessions")
    max_new_tokens: int = _knob(256, "Longest answer in tokens")
    temperature: float = _knob(0.0, "0 = greedy decoding")
    top_p: float = _knob(0.9, "Nucleus sampling when temperature > 0")
    context_tokens: int = _knob(0, "Context window kept for history (0 = the model's own limit)")
    ask_comment: bool = _knob(False, "Ask for a free-text comment after each rating")
    repetition_penalty: float = _knob(1.1, "Divide the scores of tokens seen in the last repetition_window tokens "
                                           "by this (llama.cpp's repeat_penalty; 1.0 = off)")
    repetition_window: int = _knob(64, "Tokens (prompt and answer) the repetition penalty looks back on")
    frequency_penalty: float = _knob(0.0, "OpenAI-style: subtract this times a token's count in the answer so far")
    presence_penalty: float = _knob(0.0, "OpenAI-style: subtract this from tokens the answer already used")
    max_blank_lines: int = _knob(3, "Stop an answer after this many blank lines in a row (0 = never)")
    max_repeated_lines: int = _knob(1, "Stop an answer once this many lines in a row repeat earlier lines of it "
                                       "(blank lines, code fences and lines under 8 characters aside; 0 = never)")

    def __post_init__(self) -> None:
        _require("chat", self, [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("context_tokens", self.context_tokens >= 0, ">= 0 (0 = the model's own limit)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1.0 = off)"),
            ("repetition_window", self.repetition_window >= 0, ">= 0"),
            ("max_blank_lines", self.max_blank_lines >= 0, ">= 0 (0 = never)"),
            ("max_repeated_lines", self.max_repeated_lines >= 0, ">= 0 (0 = never)"),
        ])


@dataclass(frozen=True)
class PrivacyConfig:
    entities: list = _knob(
        ["EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "PERSON",
         "STREET_ADDRESS", "DATE_OF_BIRTH", "PASSPORT", "NATIONAL_ID"],
        "Entity types redacted before anything is written (Presidio names, plus STREET_ADDRESS, DATE_OF_BIRTH, "
        "PASSPORT, NATIONAL_ID); secrets (keys, tokens, passwords, private keys) are always redacted",
    )
    score_threshold: float = _knob(0.35, "Minimum Presidio score for a span to be redacted")
    flag_threshold: float = _knob(0.2, "Spans scoring between this and score_threshold flag the turn as possible PII")
    max_text_chars: int = _knob(20000, "Longest accepted text (characters) per message or correction")
    max_comment_chars: int = _knob(2000, "Longest accepted feedback comment (characters)")

    def __post_init__(self) -> None:
        _require("privacy", self, [
            ("entities", _strings(self.entities), "a list of entity names"),
            ("score_threshold", 0 <= self.score_threshold <= 1, "in [0, 1]"),
            ("flag_threshold", 0 <= self.flag_threshold <= self.score_threshold,
             f"in [0, privacy.score_threshold ({self.score_threshold})]"),
            ("max_text_chars", self.max_text_chars >= 1, ">= 1"),
            ("max_comment_chars", self.max_comment_chars >= 1, ">= 1"),
        ])


@dataclass(frozen=True)
class KnowledgeConfig:
    patterns: list = _knob(list(DEFAULT_KNOWLEDGE_PATTERNS), "Regexes whose matches are aggregated as facts")


@dataclass(frozen=True)
class CurateConfig:
    helpful_threshold: int = _knob(4, "Score at or above which a turn counts as helpful")
    unhelpful_threshold: int = _knob(2, "Score at or below which a turn counts as unhelpful")
    include_unrated: bool = _knob(False, "Also train on turns nobody rated")
    min_chars: int = _knob(2, "Shortest prompt/answer kept")
    max_chars: int = _knob(8000, "Longest prompt/answer kept")
    blocklist: list = _knob([], "Words or phrases; turns containing any are dropped (case-insensitive)")
    near_dup_threshold: float = _knob(0.8, "Jaccard similarity above which two examples are near duplicates")
    domain_cap: float = _knob(0.5, "Largest share of a snapshot one domain may take (1.0 = no cap)")
    eval_fraction: float = _knob(0.1, "Share of examples held out for evaluation")
    replay_fraction: float = _knob(0.3, "Replay sample from earlier snapshots, as a share of the new examples")
    retention_days: int = _knob(0, "Drop raw interactions older than this on every curate (0 = keep)")
    seed: int = _knob(0, "Seed for splits and replay sampling")


@dataclass(frozen=True)
class TrainConfig:
    load_in_4bit: bool = _knob(True, "QLoRA: base weights in 4-bit NF4 (bitsandbytes)")
    lora_r: int = _knob(16, "LoRA rank")
    lora_alpha: int = _knob(32, "LoRA alpha")
    lora_dropout: float = _knob(0.05, "LoRA dropout")
    target_modules: str = _knob("all-linear", "Modules that get LoRA ('all-linear' or comma-separated names)")
    learning_rate: float = _knob(1e-3, "Peak learning rate (small incremental batches need a high one)")
    epochs: int = _knob(12, "Passes over the snapshot's examples: the step count follows the data (0 = max_steps)")
    min_steps: int = _knob(40, "Fewest optimizer steps of a run (a handful of examples still gets enough updates)")
    max_steps: int = _knob(300, "Most optimizer steps of a run (bounds the time a large snapshot takes)")
    batch_size: int = _knob(1, "Examples per micro-batch")
    grad_accum: int = _knob(1, "Micro-batches per optimizer step")
    max_seq_len: int = _knob(512, "Longest training sequence in tokens")
    warmup_ratio: float = _knob(0.05, "Share of steps for linear warm-up")
    weight_decay: float = _knob(0.0, "AdamW weight decay")
    gradient_checkpointing: bool = _knob(False, "Trade compute for memory (pays off on long sequences / big models)")
    checkpoint_every: int = _knob(20, "Save a resumable checkpoint every N steps")
    vary_system_prompt: bool = _knob(True, "Train each example under varied system prompts (none, the chat's, others)")
    rehearsal: str = _knob("kl", "Against forgetting: 'kl' (stay close to the base on everyday prompts), 'sft', 'off'")
    rehearsal_examples: int = _knob(156, "Everyday prompts answered by the base model for rehearsal (0 = off)")
    rehearsal_weight: float = _knob(4.0, "Weight of the rehearsal term (the KL coefficient, or the SFT loss weight)")
    rehearsal_per_step: int = _knob(2, "Rehearsal prompts in each optimizer step (kl)")
    kl_reference: str = _knob("base", "What the KL term holds a warm-started adapter to: 'base' (the frozen base) or "
                                      "'parent' (the champion it starts from; measured once per champion)")
    objective: str = _knob("auto", "What ratings train: 'auto' (SFT, plus KTO for answers rated unhelpful and DPO for "
                                   "corrections when the snapshot has them), 'sft', 'kto', 'dpo'")
    # with 1, the fp32 model a peer loads saw rejected answers only ~0.5 nats/token less likely after a default run
    preference_weight: float = _knob(3.0, "Weight of the preference terms (KTO for answers rated unhelpful, DPO for "
                                          "corrections) beside the SFT loss and the KL term")
    packing: bool = _knob(True, "Pack several examples into one row (padding-free, no cross-example attention)")
    group_by_length: bool = _knob(True, "Batch examples of similar length together")
    num_processes: int = _knob(1, "Data-parallel processes (Accelerate / torchrun; 1 = this process only)")
    seed: int = _knob(0, "Random seed")

    def __post_init__(self) -> None:
        """Reject impossible hyperparameters before anything heavy is loaded; names every bad field."""
        problems = _train_problems(self)
        if problems:
            raise ConfigError("; ".join(problems), TRAIN_HINT)


def target_modules(cfg: TrainConfig) -> str | list[str]:
    """`train.target_modules` as PEFT takes it: 'all-linear', or the list of module names."""
    text = cfg.target_modules.strip()
    if text == "all-linear":
        return text
    return [name.strip() for name in text.split(",") if name.strip()]


def _train_problems(cfg: TrainConfig) -> list[str]:
    """One message per bad [train] knob (all of them, unlike the other sections, which name the first)."""
    checks = [
        (cfg.lora_r >= 1, f"train.lora_r must be >= 1 (got {cfg.lora_r})"),
        (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0, f"train.lora_alpha must be > 0 (got {cfg.lora_alpha})"),
        (0.0 <= cfg.lora_dropout < 1.0, f"train.lora_dropout must be in [0, 1) (got {cfg.lora_dropout})"),
        (bool(target_modules(cfg)),
         "train.target_modules is empty (use 'all-linear' or names like 'q_proj,v_proj')"),
        (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0,
         f"train.learning_rate must be a positive number (got {cfg.learning_rate})"),
        (cfg.epochs >= 0, f"train.epochs must be >= 0 (got {cfg.epochs})"),
        (cfg.max_steps >= 1, f"train.max_steps must be >= 1 (got {cfg.max_steps})"),
        (cfg.min_steps >= 0, f"train.min_steps must be >= 0 (got {cfg.min_steps}; max_steps wins when it is lower)"),
        (cfg.batch_size >= 1, f"train.batch_size must be >= 1 (got {cfg.batch_size})"),
        (cfg.grad_accum >= 1, f"train.grad_accum must be >= 1 (got {cfg.grad_accum})"),
        (cfg.max_seq_len >= 8, f"train.max_seq_len must be >= 8 (got {cfg.max_seq_len})"),
        (0.0 <= cfg.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1) (got {cfg.warmup_ratio})"),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
         f"train.weight_decay must be >= 0 (got {cfg.weight_decay})"),
        (cfg.checkpoint_every >= 0, f"train.checkpoint_every must be >= 0 (got {cfg.checkpoint_every}; 0 = never)"),
        (cfg.seed >= 0, f"train.seed must be >= 0 (got {cfg.seed})"),
        (cfg.num_processes >= 1, f"train.num_processes must be >= 1 (got {cfg.num_processes})"),
        (cfg.rehearsal in REHEARSAL_MODES,
         f"train.rehearsal must be one of {', '.join(REHEARSAL_MODES)} (got {cfg.rehearsal!r})"),
        (cfg.kl_reference in KL_REFERENCES,
         f"train.kl_reference must be one of {', '.join(KL_REFERENCES)} (got {cfg.kl_reference!r})"),
        (cfg.rehearsal_examples >= 0, f"train.rehearsal_examples must be >= 0 (got {cfg.rehearsal_examples})"),
        (cfg.rehearsal_per_step >= 1, f"train.rehearsal_per_step must be >= 1 (got {cfg.rehearsal_per_step})"),
        (math.isfinite(cfg.preference_weight) and cfg.preference_weight >= 0,
         f"train.preference_weight must be >= 0 (got {cfg.preference_weight})"),
        (math.isfinite(cfg.rehearsal_weight) and cfg.rehearsal_weight >= 0,
         f"train.rehearsal_weight must be >= 0 (got {cfg.rehearsal_weight})"),
        (cfg.objective in OBJECTIVES,
         f"train.objective must be one of {', '.join(OBJECTIVES)} (got {cfg.objective!r})"),
    ]
    return [text for ok, text in checks if not ok]


@dataclass(frozen=True)
class EvalConfig:
    eval_file: str = _knob("eval/qa_eval.jsonl", "Keyword QA file (relative to the workspace; without it, questions "
                                                 "are derived from the snapshot)")
    general_file: str = _knob("", "Everyday-questions file for the forgetting check ('' = the shipped one)")
    general_tolerance: float = _knob(0.1, "Non-inferiority margin: everyday accuracy may be at most this much lower")
    alpha: float = _knob(0.05, "Significance level of the everyday non-inferiority test")
    gain_alpha: float = _knob(0.1, "Significance level of the gain test on the target questions (one-sided McNemar)")
    min_questions: int = _knob(5, "Fewer target questions than this: the held-out loss decides the gain")
    loss_margin: float = _knob(0.05, "With too few questions, the held-out loss must fall by at least this share")
    max_new_tokens: int = _knob(64, "Answer length during evaluation")
    batch_size: int = _knob(128, "Most prompts generated together (finished answers leave the batch, so large "
                                 "batches cost little; fewer when their key/value cache would pass 2 GB)")

    def __post_init__(self) -> None:
        _require("eval", self, [
            ("general_tolerance", 0 <= self.general_tolerance < 1, "in [0, 1)"),
            ("alpha", _probability(self.alpha), "between 0 and 1 (exclusive)"),
            ("gain_alpha", _probability(self.gain_alpha), "between 0 and 1 (exclusive)"),
            ("min_questions", self.min_questions >= 0, ">= 0"),
            ("loss_margin", 0 <= self.loss_margin < 1, "in [0, 1)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
        ])


@dataclass(frozen=True)
class DriftConfig:
    reference: str = _knob("champion", "Reference window: 'champion' (its training data) or 'YYYY-MM-DD..YYYY-MM-DD'")
    recent_days: int = _knob(7, "Recent window: the last N days of interactions")
    psi_warn: float = _knob(0.1, "Population Stability Index at or above which drift is a warning")
    psi_alert: float = _knob(0.25, "Population Stability Index at or above which drift is an alert")
    ks_alpha: float = _knob(0.05, "Significance level of the Kolmogorov-Smirnov tests")
    helpful_alpha: float = _knob(0.05, "Significance level of the helpful-rate drop test (concept drift)")
    bins: int = _knob(10, "Quantile bins for numeric features")
    min_samples: int = _knob(30, "Fewest interactions per window for a verdict")
    min_rated: int = _knob(10, "Fewest rated turns per window for the helpful-rate (concept drift) test")

    def __post_init__(self) -> None:
        _require("drift", self, [
            ("recent_days", self.recent_days >= 1, "at least 1 day"),
            ("psi_warn", self.psi_warn > 0, "> 0"),
            ("psi_alert", self.psi_alert >= self.psi_warn, f">= drift.psi_warn ({self.psi_warn})"),
            ("ks_alpha", _probability(self.ks_alpha), "between 0 and 1 (exclusive)"),
            ("helpful_alpha", _probability(self.helpful_alpha), "between 0 and 1 (exclusive)"),
            ("bins", self.bins >= 2, ">= 2"),
            ("min_samples", self.min_samples >= 1, ">= 1"),
            ("min_rated", self.min_rated >= 1, ">= 1"),
        ])


@dataclass(frozen=True)
class ABConfig:
    traffic: float = _knob(0.1, "Default share of new chat sessions answered by the candidate")
    min_samples: int = _knob(30, "Fewest rated turns per arm before a promotion")
    alpha: float = _knob(0.05, "Significance level of the two-proportion z-test")
    min_improvement: float = _knob(0.02, "Smallest helpful-rate gain (absolute, 0.02 = 2 points) that promotes")

    def __post_init__(self) -> None:
        _require("ab", self, [("traffic", _probability(self.traffic), "between 0 and 1 (exclusive)"),
                              ("min_samples", self.min_samples >= 1, ">= 1"),
                              ("alpha", _probability(self.alpha), "between 0 and 1 (exclusive)"),
                              ("min_improvement", self.min_improvement >= 0, ">= 0")])


@dataclass(frozen=True)
class HealthConfig:
    auto_rollback: bool = _knob(True, "Roll back a champion whose helpful rate degrades significantly")
    min_samples: int = _knob(30, "Fewest rated turns of the champion (and its predecessor) before judging")
    degradation_factor: float = _knob(0.8, "Roll back when champion rate < factor x predecessor rate (and significant)")
    alpha: float = _knob(0.05, "Significance level of the degradation test")

    def __post_init__(self) -> None:
        _require("health", self, [("min_samples", self.min_samples >= 1, ">= 1"),
                                  ("degradation_factor", 0 < self.degradation_factor <= 1, "in (0, 1]"),
                                  ("alpha", _probability(self.alpha), "between 0 and 1 (exclusive)")])


@dataclass(frozen=True)
class CycleConfig:
    min_new_rated: int = _knob(10, "Fewest new rated interactions that make a curate due")
    curate_cron: str = _knob("0 3 * * *", "Schedule of curation (cron; default daily 03:00)")
    train_cron: str = _knob("0 4 * * 0", "Schedule of training + eval + gate (cron; default Sundays 04:00)")
    eval_cron: str = _knob("0 5 1 * *", "Schedule of the full evaluation (cron; default the 1st, 05:00)")
    gate_promote: bool = _knob(True, "`cl cycle` promotes a newly trained candidate that passes the eval gate")
    ab_promote: bool = _knob(False, "`cl cycle` stops a running A/B test and promotes its candidate once the promotion "
                                    "criteria hold")
    eval_max_age_days: int = _knob(30, "`cl cycle` re-evaluates the champion when its latest eval is older than this")

    def __post_init__(self) -> None:
        _require("cycle", self, [("min_new_rated", self.min_new_rated >= 0, ">= 0"),
                                 ("eval_max_age_days", self.eval_max_age_days >= 0, ">= 0")])


@dataclass(frozen=True)
class ServeConfig:
    host: str = _knob("127.0.0.1", "Address `cl serve` binds to (loopback by default)")
    port: int = _knob(8000, "Port of `cl serve`")
    max_request_bytes: int = _knob(1_000_000, "Largest accepted request body")
    queue_size: int = _knob(32, "Requests waiting for the model before new ones get 503")
    max_tokens: int = _knob(512, "Largest max_tokens a request may ask for")
    allowed_hosts: list = _knob(["127.0.0.1", "::1", "localhost"],
                                "Host names `cl serve` answers to, plus serve.host (others: 400, no DNS rebinding)")
    allowed_origins: list = _knob([], "Browser origins that may call `cl serve` ('http://localhost:3000'); others: 403")

    def __post_init__(self) -> None:
        _require("serve", self, [
            ("port", 0 <= self.port <= 65535, "a port number (0-65535)"),
            ("max_request_bytes", self.max_request_bytes >= 1, ">= 1"),
            ("queue_size", self.queue_size >= 1, "at least 1"),
            ("max_tokens", self.max_tokens >= 1, "at least 1"),
            ("allowed_hosts", _strings(self.allowed_hosts), "a list of host names"),
            ("allowed_origins", _strings(self.allowed_origins), "a list of origins"),
        ])


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "chat": ChatConfig,
    "privacy": PrivacyConfig,
    "knowledge": KnowledgeConfig,
    "curate": CurateConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "drift": DriftConfig,
    "ab": ABConfig,
    "health": HealthConfig,
    "cycle": CycleConfig,
    "serve": ServeConfig,
}
