"""GGUF files for llama.cpp and Ollama, written with the `gguf` package (ggml-org's own reader/writer).

Two kinds: a Llama-family model (F16 or Q8_0) from Hugging Face weights, and a PEFT LoRA adapter in llama.cpp's
adapter format. Names and layout follow llama.cpp's convert_hf_to_gguf.py / convert_lora_to_gguf.py: tensor names
come from gguf's TensorNameMap; q/k projections are permuted to llama.cpp's rotary layout (for an adapter, the rows
of lora_B); 1-D tensors stay F32; an adapter carries general.type=adapter, adapter.type=lora, adapter.lora.alpha
and llama.cpp scales it by alpha / rank, as PEFT does. The tokenizer and chat template are copied from the GGUF
file the base came from when there is one (byte for byte what llama.cpp's own converter wrote), else built from
the Hugging Face tokenizer as convert_hf_to_gguf.py does for GPT-2 style BPE vocabularies.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import InputError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
QUANTS = ("f16", "q8_0")
HOW_TO_CONVERT_OTHERS = "export --format hf-merged and convert it with llama.cpp's convert_hf_to_gguf.py"
# general.* keys that describe the model (copied from the source GGUF); the rest are written for each file.
_OWN_GENERAL_KEYS = {"general.architecture", "general.type", "general.file_type", "general.quantization_version",
                     "general.alignment", "general.name"}
Header = Callable[[Any], None]  # adds key/value pairs to a gguf.GGUFWriter


# --- the base model's shape ----------------------------------------------------------------------------------------
def check_supported(config: dict) -> None:
    """Refuse, with the way out, what this writer does not convert (it knows the Llama family, e.g. SmolLM2)."""
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(f"GGUF export knows {', '.join(SUPPORTED_ARCHITECTURES)}, not {arch}", HOW_TO_CONVERT_OTHERS)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise InputError(f"GGUF export does not carry rope scaling '{rope.get('rope_type')}'", HOW_TO_CONVERT_OTHERS)
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise InputError("GGUF export does not carry attention/MLP biases", HOW_TO_CONVERT_OTHERS)


def _rope_theta(config: dict) -> float:
    return float((config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0)


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama_header(config: dict) -> Header:
    """The `llama.*` hyperparameters llama.cpp reads, from a Hugging Face config.json."""

    def add(writer) -> None:
        writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(int(config["hidden_size"]))
        writer.add_block_count(int(config["num_hidden_layers"]))
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(int(config["num_attention_heads"]))
        writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps") or 1e-6))
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(_head_dim(config))

    return add


# --- tensors -------------------------------------------------------------------------------------------------------
def permute_for_rope(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face keeps each head's rotary halves apart; llama.cpp interleaves them (convert_hf_to_gguf's permute)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _name_map(config: dict):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))


def gguf_name(name_map, hf_name: str) -> str:
    mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise InputError(f"no GGUF name for tensor '{hf_name}'", HOW_TO_CONVERT_OTHERS)
    return mapped


def _rope_heads(config: dict, hf_name: str) -> int | None:
    if hf_name.endswith("self_attn.q_proj.weight"):
        return int(config["num_attention_heads"])
    if hf_name.endswith("self_attn.k_proj.weight"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def model_tensors(state: dict, config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight of a Hugging Face Llama state dict."""
    name_map = _name_map(config)
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", True):
            continue  # llama.cpp reuses token_embd as the output layer when there is no output.weight
        array = tensor.detach().float().cpu().numpy()
        heads = _rope_heads(config, hf_name)
        yield gguf_name(name_map, hf_name), permute_for_rope(array, heads) if heads else array


def check_lora_config(adapter_config: dict) -> float:
    """The adapter.lora.alpha llama.cpp needs for PEFT's scale; refuses what llama.cpp's adapter format cannot say."""
    unsupported = {
        "use_dora": "DoRA", "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
        "modules_to_save": "fully trained modules", "fan_in_fan_out": "fan-in/fan-out weights",
        "lora_bias": "LoRA biases",
    }
    for key, what in unsupported.items():
        if adapter_config.get(key):
            raise InputError(f"the adapter uses {what}, which llama.cpp's LoRA format cannot carry",
                             "export --format gguf-merged or hf-merged instead")
    if adapter_config.get("bias", "none") != "none":
        raise InputError("the adapter trains biases, which llama.cpp's LoRA format cannot carry",
                         "export --format gguf-merged or hf-merged instead")
    alpha, rank = float(adapter_config["lora_alpha"]), int(adapter_config["r"])
    return alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha  # rsLoRA scales by alpha/sqrt(r)


def lora_tensors(lora_state: dict, config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(name.lora_a / name.lora_b, float32 array) pairs from a PEFT adapter_model.safetensors state dict."""
    name_map, pairs = _name_map(config), {}
    for key, tensor in lora_state.items():
        kind = "a" if ".lora_A." in key else "b" if ".lora_B." in key else None
        if kind is None:
            raise InputError(f"the adapter holds '{key}', which is not a LoRA A/B matrix",
                             "export --format gguf-merged or hf-merged instead")
        hf_name = key.removeprefix("base_model.model.").replace(f".lora_{kind.upper()}.weight", ".weight")
        pairs.setdefault(hf_name, {})[kind] = tensor.detach().float().cpu().numpy()
    for hf_name, pair in sorted(pairs.items()):
        heads, name = _rope_heads(config, hf_name), gguf_name(name_map, hf_name)
        yield f"{name}.lora_a", pair["a"]
        yield f"{name}.lora_b", permute_for_rope(pair["b"], heads) if heads else pair["b"]


# --- the tokenizer -------------------------------------------------------------------------------------------------
def tokenizer_from_gguf(path: Path) -> Header:
    """The tokenizer, chat template and descriptive general.* keys of an existing GGUF file, copied unchanged."""
    fields = _copied_fields(str(path), path.stat().st_mtime_ns)

    def add(writer) -> None:
        for key, value, vtype, sub_type in fields:
            writer.add_key_value(key, value, vtype, sub_type)

    return add


@functools.lru_cache(maxsize=2)
def _copied_fields(path: str, _mtime_ns: int) -> tuple:
    """Parsing a GGUF header takes seconds (100k tokenizer strings): once per file and process."""
    from gguf import GGUFReader, GGUFValueType

    fields = []
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("tokenizer.") or (key.startswith("general.") and key not in _OWN_GENERAL_KEYS):
            sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), field.types[0], sub_type))
    return tuple(fields)


def pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer: GPT-2's split ('gpt-2'), or the same after splitting
    digits one by one ('smollm', as SmolLM2 was trained)."""
    steps = [step or {} for step in ((spec or {}).get("pretokenizers") or []
                                     if (spec or {}).get("type") == "Sequence" else [spec or {}])]
    kinds = [step.get("type") for step in steps]
    gpt2_split = bool(steps) and steps[-1].get("type") == "ByteLevel" and steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and gpt2_split:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and gpt2_split and steps[0].get("individual_digits"):
        return "smollm"
    raise InputError(f"GGUF export does not know this tokenizer's pre-tokenizer ({kinds})", HOW_TO_CONVERT_OTHERS)


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their types by id, as convert_hf_to_gguf's get_vocab_base builds them."""
    from gguf import TokenType

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def tokenizer_from_hf(folder: Path, vocab_size: int) -> Header:
    """A GPT-2 style BPE tokenizer (tokens, types, merges, special ids, chat template) from a Hugging Face folder."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise InputError("GGUF export knows byte-level BPE tokenizers only", HOW_TO_CONVERT_OTHERS)
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    tokens, types = _vocabulary(tokenizer, vocab_size)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    template = tokenizer.chat_template
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]

    def add(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)
        if special.chat_template is None and template:
            writer.add_chat_template(template)
        if "bos" not in special.add_special_token:
            writer.add_add_bos_token(adds_bos)  # llama.cpp adds a BOS to Llama models unless told not to

    return add


# --- writing -------------------------------------------------------------------------------------------------------
def _tensor_type(quant: str, array: np.ndarray):
    from gguf import GGMLQuantizationType as T

    if array.ndim < 2:
        return T.F32
    if quant == "q8_0" and array.shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F32 if quant == "f32" else T.F16


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}[quant]


def _add_tensor(writer, name: str, array: np.ndarray, quant: str) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    kind = _tensor_type(quant, array)
    if kind in (T.F32, T.F16):
        writer.add_tensor(name, quants.quantize(array, kind))
    else:
        writer.add_tensor(name, quants.quantize(array, kind), raw_dtype=kind)  # shape read from the bytes


def write_gguf(path: Path, headers: Iterable[Header], tensors: Iterable[tuple[str, np.ndarray]], quant: str,
               name: str, kind: str = "model") -> Path:
    """One GGUF file, written beside `path` and renamed into place, so a reader never sees half a file."""
    import gguf

    if quant not in QUANTS + ("f32",):
        raise InputError(f"unknown quantization '{quant}'", f"choose one of {', '.join(QUANTS)}")
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    try:
        writer.add_type(kind)
        writer.add_name(name)
        if kind == "model":
            writer.add_file_type(_file_type(quant))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for header in headers:
            header(writer)
        for tensor_name, array in tensors:
            _add_tensor(writer, tensor_name, array, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(partial, path)
    return path


def write_model(path: Path, config: dict, state: dict, tokenizer: Header, quant: str, name: str) -> Path:
    check_supported(config)
    return write_gguf(path, [llama_header(config), tokenizer], model_tensors(state, config), quant, name)


def write_lora(path: Path, config: dict, lora_state: dict, adapter_config: dict, name: str) -> Path:
    """A LoRA adapter for `llama-cli -m base.gguf --lora adapter.gguf` and Ollama's ADAPTER (F16 tensors)."""
    import gguf

    check_supported(config)
    alpha = check_lora_config(adapter_config)

    def adapter_keys(writer) -> None:
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    return write_gguf(path, [adapter_keys], lora_tensors(lora_state, config), "f16", name, kind="adapter")
