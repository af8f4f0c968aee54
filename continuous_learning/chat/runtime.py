"""The model runtime around transformers: the offline hub environment, quiet logs, the device, threads, and
loading a resolved base model's tokenizer and weights. torch and transformers are imported inside functions so the
CLI stays fast; importing this module changes nothing (not even os.environ)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import ModelNotFoundError
from ..core.settings import Settings

if TYPE_CHECKING:
    from .resolve import BaseModel

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


def quiet_transformers() -> None:
    """Progress bars and advisory warnings from transformers would drown the chat."""
    offline_hub()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    quiet_known_warnings()

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

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(base.path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(base: BaseModel, load_in_4bit: bool = False, for_training: bool = False,
               quantized_cache: Path | None = None):
    """The base model: full precision for chat on CPU, bf16 on GPU, NF4 with double quantisation for QLoRA.

    `quantized_cache`: a folder where the CPU's NF4 copy of the base is kept once quantized (quantizing the bundled
    135M model takes about 4 s on a CPU, loading the quantized copy 0.6 s; the weights are bit-identical)."""
    offline_hub()
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    on_gpu = device() == "cuda"
    gpu = int(os.environ.get("LOCAL_RANK", "0"))  # each data-parallel process on its own GPU
    kwargs: dict = {"local_files_only": True}
    copy = _nf4_copy(base, quantized_cache) if load_in_4bit and not on_gpu and quantized_cache else None
    source, hint = base.path, "check --base-model"
    if load_in_4bit:
        kwargs["device_map"] = {"": gpu} if on_gpu else "cpu"
        kwargs["dtype"] = torch.bfloat16
        if copy is not None and (copy / "config.json").is_file():  # already quantized: its config says how
            source, hint = str(copy), f"delete {copy}; the next run quantizes the base again"
        else:
            kwargs["quantization_config"] = _nf4_config()
    else:
        kwargs["dtype"] = torch.bfloat16 if on_gpu else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot load base model from {source}: {exc}", hint) from None
    if copy is not None and source == base.path:
        _save_once(model, copy)
    if not load_in_4bit and on_gpu:
        model.to(f"cuda:{gpu}")
    if not for_training:
        model.eval()
    return model


def _nf4_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _nf4_copy(base: BaseModel, cache: Path) -> Path:
    """Where the CPU's NF4 copy of `base` is kept: keyed by its weights and the libraries that wrote it."""
    import bitsandbytes
    import transformers

    material = f"{base.sha256}|nf4-double-bf16|{transformers.__version__}|{bitsandbytes.__version__}"
    return cache / f"nf4-{hashlib.sha256(material.encode()).hexdigest()[:20]}"


def _save_once(model, folder: Path) -> None:
    """Write the quantized copy beside its final name, then rename it into place (another process may win)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    model.save_pretrained(str(partial))
    try:
        os.rename(partial, folder)
    except OSError:  # another process renamed its copy first
        shutil.rmtree(partial, ignore_errors=True)
