"""The model a run trains: the base loaded (4-bit NF4 through bitsandbytes, or full precision) and frozen, a PEFT
LoRA adapter on it (new, warm-started from the champion or restored from a checkpoint), the optimizer and schedule,
and the bitsandbytes CPU layout quirks. torch, peft and bitsandbytes are imported inside functions."""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

from ..chat.models import BaseModel, load_model
from ..core.errors import ConfigError, TrainingFailed
from ..core.settings import TrainConfig, target_modules
from .config import lr_multiplier, warmup_steps


@dataclasses.dataclass
class BuiltModel:
    """The trainable PEFT model and how to call it, with the seconds its parts took."""

    model: object
    autocast: bool  # bf16 autocast: for the 4-bit base, and on GPUs
    logits_to_keep: bool
    timings: dict


def require_bitsandbytes(cfg: TrainConfig) -> None:
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("train.load_in_4bit needs bitsandbytes, which is not installed",
                          "pip install bitsandbytes, or train with --no-4bit")


def _frozen_base(base: BaseModel, cfg: TrainConfig, timings: dict, model_cache: Path | None):
    """The base model with every weight frozen, prepared for k-bit training or gradient checkpointing."""
    from peft import prepare_model_for_kbit_training

    started = time.perf_counter()
    model = load_model(base, load_in_4bit=cfg.load_in_4bit, for_training=True, quantized_cache=model_cache)
    timings["load_base_s"] = time.perf_counter() - started
    model.config.use_cache = False
    checkpointing_kwargs = {"use_reentrant": False}
    if cfg.load_in_4bit:  # freezes the base, upcasts norms/embeddings to fp32 (~0.03 s, +~150 MB for SmolLM2)
        kbit_started = time.perf_counter()
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs,
        )
        timings["prepare_kbit_s"] = time.perf_counter() - kbit_started
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    return model


def build_model(base: BaseModel, cfg: TrainConfig, source: Path | None, model_cache: Path | None = None) -> BuiltModel:
    """The LoRA model in training mode: loaded from `source` (a checkpoint or the warm-start adapter), else new.
    `model_cache`: where the CPU's 4-bit copy of the base is kept (None: quantize it on every load)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    timings: dict = {}
    model = _frozen_base(base, cfg, timings, model_cache)
    if source is not None:
        model = PeftModel.from_pretrained(model, str(source), is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=target_modules(cfg), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if source is not None and cfg.lora_dropout != model.peft_config["default"].lora_dropout:
        set_dropout(model, cfg.lora_dropout)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingFailed("no trainable LoRA parameters",
                             "check train.target_modules against the model's layer names")
    model.train()
    timings["model_s"] = time.perf_counter() - started  # base load + k-bit preparation + LoRA
    autocast = cfg.load_in_4bit or model.device.type == "cuda"
    return BuiltModel(model, autocast, accepts_logits_to_keep(model), timings)


def set_dropout(model, p: float) -> None:
    import torch

    model.peft_config["default"].lora_dropout = p
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict) and "default" in dropouts:
            dropouts["default"] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()


def build_optimizer(model, cfg: TrainConfig, steps: int):
    """AdamW on the LoRA weights with linear warm-up and decay; returns (optimizer, scheduler)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = warmup_steps(cfg, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, steps, warmup))
    return optimizer, scheduler


def bnb_4bit_layers(model) -> list:
    return [m for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]


def keep_bnb_training_layout(model) -> None:
    """bitsandbytes (0.50, CPU with AVX512-BF16) repacks a Linear4bit weight for a faster inference kernel on the
    first forward in eval mode without grad; that kernel has no backward, so every later training step would get
    no gradient through the frozen base layers (only through the LoRA paths: ~8x smaller gradients, slow learning).
    Keeping the 4-bit layers in training mode (they have no dropout) avoids the repack during held-out loss."""
    for module in bnb_4bit_layers(model):
        module.training = True


def unpack_bnb_cpu_weights(model) -> int:
    """Undo that inference repacking if someone evaluated this model before training it. Returns layers fixed."""
    fixed = 0
    for module in bnb_4bit_layers(model):
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            unpacked = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            module.weight.data, module.weight.quant_state = unpacked
            module.quant_state = module.weight.quant_state
            fixed += 1
    return fixed


def accepts_logits_to_keep(model) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def release_memory() -> None:
    """Collect what the run dropped, and hand cached GPU memory back."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
