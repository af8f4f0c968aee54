"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and a throwaway workspace."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole run, so the bundled GGUF is converted at most once: not at all when the
    machine's cache already holds its conversion (`make setup` makes it), which is then copied in."""
    if os.environ.get("CL_TEST_MODEL_CACHE"):
        return Path(os.environ["CL_TEST_MODEL_CACHE"])
    if os.environ.get("PYTEST_XDIST_WORKER"):  # workers share one cache (its writes are locked or atomic)
        cache = tmp_path_factory.getbasetemp().parent / "model_cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("model_cache")
    _copy_machine_conversion(cache)
    return cache


def _copy_machine_conversion(cache: Path) -> None:
    """The bundled model's conversion from the machine's model cache, when it was made from this very GGUF file
    (its fingerprint says so), copied into `cache` under the lock the conversion itself takes (a copy: a test may
    change its files)."""
    import shutil

    import orjson

    from continuous_learning.chat.resolve import BUNDLED_NAME, bundled_gguf
    from continuous_learning.core.settings import load_settings
    from continuous_learning.registry import file_sha256
    from continuous_learning.storage.store import workspace_lock

    source = load_settings(home=cache).model_cache / BUNDLED_NAME
    target = cache / BUNDLED_NAME
    marker = source / "cl_fingerprint.json"
    if not marker.is_file() or orjson.loads(marker.read_bytes()).get("sha256") != file_sha256(bundled_gguf()):
        return
    with workspace_lock(cache, f"convert-{BUNDLED_NAME}", wait=600):
        if (target / "cl_fingerprint.json").exists():
            return
        partial = cache / f".{BUNDLED_NAME}.{os.getpid()}.partial"
        shutil.copytree(source, partial)
        os.replace(partial, target)



@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from continuous_learning.chat.models import bundled_gguf

    gguf = bundled_gguf()
    folder = tmp_path_factory.mktemp("smollm_tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Llama (seconds on CPU) that speaks through the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(smollm_tokenizer_dir))
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture
def workspace(tmp_path, monkeypatch, tiny_model_dir, model_cache) -> Path:
    """An empty workspace wired to the tiny model; CL_HOME points the whole tool at it."""
    home = tmp_path / "ws"
    home.mkdir()
    monkeypatch.setenv("CL_HOME", str(home))
    monkeypatch.setenv("CL_BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("CL_MODEL_CACHE", str(model_cache))
    monkeypatch.setenv("CL_USER_HASH_SALT", "test-salt")
    monkeypatch.setenv("CL_CHAT_MAX_NEW_TOKENS", "8")  # the tiny model babbles: keep answers short
    monkeypatch.setenv("CL_TRAIN_REHEARSAL_EXAMPLES", "0")  # tests count examples exactly; rehearsal has its own test
    return home


@pytest.fixture
def settings(workspace):
    from continuous_learning.core.settings import load_settings

    return load_settings()


@pytest.fixture
def real_workspace(workspace, monkeypatch) -> Path:
    """The same workspace, but on the real bundled SmolLM2-135M-Instruct."""
    from continuous_learning.core.settings import BUNDLED_MODEL

    monkeypatch.setenv("CL_BASE_MODEL", BUNDLED_MODEL)
    monkeypatch.delenv("CL_TRAIN_REHEARSAL_EXAMPLES")  # the real model trains as users' runs do
    return workspace


# --- the learning tests (test_learning*.py) on the real bundled model --------------------------------------------
@pytest.fixture(scope="module")
def real_home(tmp_path_factory, model_cache):
    """The environment a new user has: the bundled model, no cl.toml, no flags. Yields (folder for this module's
    workspaces, the monkeypatch that sets CL_HOME)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("CL_BASE_MODEL", "CL_TRAIN_REHEARSAL_EXAMPLES", "CL_CHAT_MAX_NEW_TOKENS"):
            patch.delenv(name, raising=False)
        patch.setenv("CL_MODEL_CACHE", str(model_cache))
        patch.setenv("CL_USER_HASH_SALT", "learning-tests")
        yield tmp_path_factory.mktemp("learning"), patch


@pytest.fixture(scope="module")
def first_round(real_home, tmp_path_factory):
    """The first round (learning_round.shared_first_round), trained once for all workers: read it, never change
    it; `copy_of_first_round` gives a copy to change."""
    from learning_round import shared_first_round

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one folder for every worker of this run
        root = tmp_path_factory.getbasetemp().parent / "learning_shared"
        root.mkdir(exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("learning_shared")
    return shared_first_round(root, real_home[1])


# The learning tests (the longest chain: three real trainings) start first, while the other worker runs the rest of
# the suite; `make test` keeps this order (--no-loadscope-reorder: xdist would otherwise sort files by test count).
LEARNING_ORDER = {"test_learning.py": 0}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LEARNING_ORDER.get(item.path.name, 1))
