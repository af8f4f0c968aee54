"""`cl adapters export`: GGUF for llama.cpp / Ollama and a merged Hugging Face folder, checked by llama.cpp itself
(llama-cpp-python) against PyTorch + PEFT: on the tiny model (greedy token ids) and once on the bundled SmolLM2."""
from __future__ import annotations

import os

import numpy as np
import orjson
import pytest
from test_train import FACTS, add_snapshot, fast, qa
from typer.testing import CliRunner

from continuous_learning import cli, registry
from continuous_learning.core.errors import InputError, RegistryError
from continuous_learning.core.settings import load_settings
from continuous_learning.export import gguf_files
from continuous_learning.export.modelfile import CHATML_STOPS, Decoding, modelfile, ollama_name

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
FACT_QUESTION, FACT_ANSWER = FACTS[0]
OTHER_QUESTION = "What is the capital of France?"
ANSWER_TOKENS = 12
LORA_B_STD = 0.03  # big enough that the bundled model answers differently, small enough to stay deterministic


def llama_cpp():
    """llama-cpp-python is a dev dependency (`make setup` builds it); CI must have it, a bare checkout may not."""
    if os.environ.get("CI"):
        import llama_cpp as module

        return module
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup builds it)")


def invoke(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def conversation(question: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": question}]


# --- greedy answers on both sides ----------------------------------------------------------------------------------
def prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(conversation(question), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def torch_greedy(model, tokenizer, question: str, tokens: int = ANSWER_TOKENS) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids(tokenizer, question)])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = out[0, ids.shape[-1]:].tolist()
    return answer[:answer.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in answer else answer


def open_gguf(path, lora=None):
    """One thread for prompts too: llama.cpp's default (every core) spins and crawls when the cores are busy."""
    return llama_cpp().Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=1,
                             n_threads_batch=1, verbose=False, seed=0)


def llama_greedy(llm, tokenizer, question: str, tokens: int = ANSWER_TOKENS) -> list[int]:
    """llama.cpp's greedy continuation, after checking it tokenizes the chat prompt as the Hugging Face side does."""
    text = tokenizer.apply_chat_template(conversation(question), add_generation_prompt=True, tokenize=False)
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == prompt_ids(tokenizer, question)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token == llm.token_eos() or len(out) == tokens:
            break
        out.append(token)
    return out


# --- a trained tiny adapter, exported once for the module ----------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, model_cache):
    """A tiny adapter trained on one fact, promoted, then `cl adapters export champion` (every format, F16 and Q8_0)."""
    home = tmp_path_factory.mktemp("export_ws")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"CL_HOME": str(home), "CL_BASE_MODEL": str(tiny_model_dir),
                            "CL_MODEL_CACHE": str(model_cache), "CL_USER_HASH_SALT": "test-salt",
                            "CL_TRAIN_REHEARSAL_EXAMPLES": "0"}.items():
            patch.setenv(name, value)
        from continuous_learning.train import run_training

        settings = load_settings()
        add_snapshot(settings, [qa(FACT_QUESTION, FACT_ANSWER)])
        entry = run_training(fast(settings, max_steps=30, learning_rate=1e-2, max_seq_len=96))
        assert invoke("promote", entry["version"]).exit_code == 0
        result = invoke("adapters", "export", "champion")
        assert result.exit_code == 0, result.output
        folder = home / "exports" / entry["version"]
        yield {"settings": settings, "entry": entry, "folder": folder, "output": result.output,
               "manifest": orjson.loads((folder / "export.json").read_bytes())}


def exported_file(exported, kind: str, quant: str | None = None):
    from pathlib import Path

    return next(Path(f["path"]) for f in exported["manifest"]["files"]
                if f["kind"] == kind and (quant is None or f["quant"] == quant))


@pytest.fixture(scope="module")
def peft_model(exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, entry = exported["settings"], exported["entry"]
    base_path = os.environ.get("CL_BASE_MODEL") or settings.model.base_model
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    return PeftModel.from_pretrained(base, str(settings.home / entry["path"])).eval(), tokenizer


def test_export_writes_every_format_with_a_modelfile_and_the_commands(exported):
    folder, output = exported["folder"], exported["output"]
    kinds = sorted(f["kind"] for f in exported["manifest"]["files"])
    assert kinds == ["base-gguf", "hf-merged", "lora-gguf", "merged-gguf", "merged-gguf", "modelfile", "modelfile"]
    modelfile_text = (folder / "Modelfile").read_text()
    assert f"FROM ./{exported_file(exported, 'base-gguf').name}" in modelfile_text
    assert f"ADAPTER ./{exported_file(exported, 'lora-gguf').name}" in modelfile_text
    assert "<|im_start|>" in modelfile_text and 'SYSTEM """You are a helpful assistant."""' in modelfile_text
    assert all(f'PARAMETER stop "{stop}"' in modelfile_text for stop in CHATML_STOPS)
    merged = (folder / "Modelfile.merged").read_text()
    assert f"FROM ./{exported_file(exported, 'merged-gguf', 'f16').name}" in merged and "ADAPTER" not in merged
    assert "ollama create" in output and "llama-server -m" in output and "llama-cli -m" in output and "--lora" in output
    hf = exported_file(exported, "hf-merged")
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists() and (hf / "tokenizer.json").exists()
    with pytest.raises(StopIteration):
        next(folder.glob("*.partial"))


def test_llama_cpp_answers_the_fact_like_peft_with_the_lora_and_merged(exported, peft_model):
    model, tokenizer = peft_model
    expected = torch_greedy(model, tokenizer, FACT_QUESTION)
    assert "Kestrel" in tokenizer.decode(expected) or "QX" in tokenizer.decode(expected)  # it learned something
    with_lora = open_gguf(exported_file(exported, "base-gguf"), exported_file(exported, "lora-gguf"))
    merged = open_gguf(exported_file(exported, "merged-gguf", "f16"))
    assert llama_greedy(with_lora, tokenizer, FACT_QUESTION) == expected
    assert llama_greedy(merged, tokenizer, FACT_QUESTION) == expected
    base = open_gguf(exported_file(exported, "base-gguf"))
    assert llama_greedy(base, tokenizer, FACT_QUESTION) != expected  # so it is the adapter that answers
    q8 = llama_greedy(open_gguf(exported_file(exported, "merged-gguf", "q8_0")), tokenizer, FACT_QUESTION)
    assert q8[:4] == expected[:4]  # Q8_0 may drift later on a random model: the README says which to use


def test_base_gguf_answers_like_the_base_in_pytorch(exported, peft_model):
    model, tokenizer = peft_model
    with model.disable_adapter():
        expected = torch_greedy(model, tokenizer, OTHER_QUESTION)
    base = open_gguf(exported_file(exported, "base-gguf"))
    assert llama_greedy(base, tokenizer, OTHER_QUESTION) == expected


def test_merged_hf_folder_loads_as_a_plain_model_and_answers_like_peft(exported, peft_model):
    from transformers import AutoModelForCausalLM

    model, tokenizer = peft_model
    plain = AutoModelForCausalLM.from_pretrained(str(exported_file(exported, "hf-merged"))).eval()
    assert torch_greedy(plain, tokenizer, FACT_QUESTION) == torch_greedy(model, tokenizer, FACT_QUESTION)


# --- refusals: one line, an exit code, no traceback ----------------------------------------------------------------
def set_status(settings, version: str, status: str) -> None:
    registry.update(settings, lambda d: d["adapters"][version].update(status=status) or d, "test")


def test_failed_tainted_unknown_and_changed_adapters_are_refused(exported, tmp_path):
    settings, version = exported["settings"], exported["entry"]["version"]
    try:
        for status in ("tainted", "failed"):
            set_status(settings, version, status)
            result = invoke("adapters", "export", version, "--out", str(tmp_path / status))
            assert result.exit_code == RegistryError.exit_code and f"is {status}" in result.output
            assert "Traceback" not in result.output and not (tmp_path / status).exists()
    finally:
        set_status(settings, version, "champion")
    unknown = invoke("adapters", "export", "9.9.9")
    assert unknown.exit_code == RegistryError.exit_code and "no adapter version '9.9.9'" in unknown.output
    weights = settings.home / exported["entry"]["path"] / "adapter_model.safetensors"
    saved = weights.read_bytes()
    try:
        weights.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))
        changed = invoke("adapters", "export", version, "--out", str(tmp_path / "changed"))
        assert changed.exit_code == RegistryError.exit_code and "does not match its recorded sha256" in changed.output
    finally:
        weights.write_bytes(saved)


def test_bad_format_and_unwritable_folder_are_one_line(exported, tmp_path):
    version = exported["entry"]["version"]
    bad = invoke("adapters", "export", version, "--format", "onnx")
    assert bad.exit_code == InputError.exit_code and "unknown export format onnx" in bad.output
    quant = invoke("adapters", "export", version, "--quant", "q4_0")
    assert quant.exit_code == InputError.exit_code and "unknown quantization q4_0" in quant.output
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    unwritable = invoke("adapters", "export", version, "--out", str(blocker / "sub"))
    assert unwritable.exit_code == InputError.exit_code and "cannot write the export" in unwritable.output
    assert "Traceback" not in unwritable.output


def test_base_exports_without_an_adapter(exported, tmp_path):
    result = invoke("adapters", "export", "base", "--format", "gguf-merged", "--out", str(tmp_path / "base"))
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "base").iterdir())
    name = exported["entry"]["base_model"]["name"]
    assert files == ["Modelfile", "export.json", f"{name}-f16.gguf", f"{name}-q8_0.gguf"]  # both types by default
    assert "ADAPTER" not in (tmp_path / "base" / "Modelfile").read_text()


# --- pure pieces ---------------------------------------------------------------------------------------------------
def test_rope_permutation_is_what_transformers_undoes_when_it_reads_gguf():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)
    undo = LlamaTensorProcessor(config={})._reverse_permute_weights
    assert np.array_equal(undo(gguf_files.permute_for_rope(weights, 3), 3, 3), weights)
    assert not np.array_equal(gguf_files.permute_for_rope(weights, 3), weights)


def test_tokenizer_built_from_hugging_face_matches_llama_cpps_own_conversion(smollm_tokenizer_dir):
    """The bundled GGUF's tokenizer was written by llama.cpp's converter: ours, from the HF folder, must agree."""
    import gguf

    from continuous_learning.chat.models import bundled_gguf

    def keys(header) -> dict:
        writer = gguf.GGUFWriter(None, "llama")
        header(writer)
        return {key: item.value for key, item in writer.kv_data[0].items()}

    ours = keys(gguf_files.tokenizer_from_hf(smollm_tokenizer_dir, 49152))
    theirs = keys(gguf_files.tokenizer_from_gguf(bundled_gguf()))
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "padding_token_id", "model",
                "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == theirs[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == theirs["tokenizer.chat_template"]
    # transformers rebuilds the GGUF tokenizer without SmolLM2's digit splitting, so this copy says gpt-2
    assert ours["tokenizer.ggml.pre"] == "gpt-2" and theirs["tokenizer.ggml.pre"] == "smollm"
    assert theirs["general.license"] == "apache-2.0"  # descriptive keys travel with the tokenizer


def test_unsupported_models_and_adapters_are_refused_with_the_way_out():
    with pytest.raises(InputError, match="not GPT2LMHeadModel") as info:
        gguf_files.check_supported({"architectures": ["GPT2LMHeadModel"]})
    assert "hf-merged" in info.value.hint
    with pytest.raises(InputError, match="DoRA"):
        gguf_files.check_lora_config({"r": 8, "lora_alpha": 16, "use_dora": True})
    assert gguf_files.check_lora_config({"r": 16, "lora_alpha": 32}) == 32
    assert gguf_files.check_lora_config({"r": 16, "lora_alpha": 32, "use_rslora": True}) == 32 * 4  # alpha/sqrt(r)
    assert gguf_files.pre_tokenizer_name({"type": "ByteLevel"}) == "gpt-2"
    with pytest.raises(InputError, match="pre-tokenizer"):
        gguf_files.pre_tokenizer_name({"type": "Metaspace"})


def test_modelfile_and_ollama_names():
    decoding = Decoding("Be brief.", 0.0, 1.1, 64)
    text = modelfile("base.gguf", "lora.gguf", decoding, chatml=True)
    assert text.splitlines()[:2] == ["FROM ./base.gguf", "ADAPTER ./lora.gguf"]
    assert 'SYSTEM """Be brief."""' in text and "PARAMETER repeat_penalty 1.1" in text
    assert "TEMPLATE" not in modelfile("m.gguf", None, decoding, chatml=False).split("#")[0]
    assert ollama_name("SmolLM2-135M-Instruct", "1.0.0") == "smollm2-135m-instruct-cl:1.0.0"


# --- the real bundled model ----------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_smollm2_lora_and_merged_gguf_answer_like_peft(real_workspace, tmp_path):
    """An adapter made with PEFT directly (non-zero B, seconds), exported; llama.cpp's F16 base + LoRA and the merged
    F16 file give PyTorch+PEFT's greedy answer, and the base GGUF keeps every weight of the bundled file."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from continuous_learning.chat.models import bundled_gguf, resolve_base
    from continuous_learning.export.exporter import Source, Writer, write_all

    settings = load_settings()
    base = resolve_base(settings)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base.path).eval(),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, LORA_B_STD)
    model.save_pretrained(str(tmp_path / "adapter"))
    (tmp_path / "out").mkdir()
    writer = Writer(settings, base, Source("9.9.9", "9.9.9", tmp_path / "adapter"), tmp_path / "out", lambda _m: None)
    write_all(writer, ("gguf-lora", "gguf-merged"), ("f16",))
    files = writer.result
    question = "What is the capital of France?"
    expected = torch_greedy(model.eval(), tokenizer, question)
    with_lora = llama_greedy(open_gguf(files.file("base-gguf"), files.file("lora-gguf")), tokenizer, question)
    merged = llama_greedy(open_gguf(files.file("merged-gguf", "f16")), tokenizer, question)
    print(f"\nPEFT: {tokenizer.decode(expected)!r}\nLoRA GGUF: {tokenizer.decode(with_lora)!r}\n"
          f"merged GGUF: {tokenizer.decode(merged)!r}")
    assert with_lora == expected and merged == expected
    with model.disable_adapter():
        base_expected = torch_greedy(model, tokenizer, question, tokens=7)
    assert "Paris" in tokenizer.decode(base_expected) and expected[:7] != base_expected  # the adapter matters
    assert llama_greedy(open_gguf(files.file("base-gguf")), tokenizer, question, 7) == base_expected
    assert same_weights(files.file("base-gguf"), bundled_gguf())


def same_weights(ours, theirs, checked=("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                         "blk.29.ffn_down.weight", "output_norm.weight")) -> bool:
    """`ours` has the tensors of `theirs` (names, shapes), the `checked` ones with the same values in llama.cpp's
    layout up to F16 rounding (q/k permuted back as llama.cpp's converter did)."""
    from gguf import GGUFReader, quants

    mine, original = ({t.name: t for t in GGUFReader(str(path)).tensors} for path in (ours, theirs))
    assert {n: list(t.shape) for n, t in mine.items()} == {n: list(t.shape) for n, t in original.items()}
    for name in checked:
        values = [quants.dequantize(t.data, t.tensor_type).reshape(t.shape[::-1]) for t in (mine[name], original[name])]
        np.testing.assert_allclose(values[0], values[1], rtol=1e-3, atol=1e-4, err_msg=name)
    return True
