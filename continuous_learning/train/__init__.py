"""Training: the QLoRA recipe that fine-tunes a PEFT LoRA adapter on a curated snapshot and registers it as a
candidate (`recipe`: `Trainer` with setup / train / save / register / cleanup, and `run_training`), and the parts
it composes:

- `config`: the step budget and the learning-rate schedule of the [train] settings (which validate themselves, in core);
- `run_folder`: the partial run folder, its FAILED marker, checkpoints, resume and run.json;
- `warm_start`: which adapter a run starts from;
- `data`, `encode`, `rehearsal`, `preference`: what a run learns from (snapshot records, label masking, the base
  model's everyday answers, the "no" answers and their KTO / DPO losses);
- `model_build`: the base (bitsandbytes 4-bit or full precision) with its PEFT LoRA, optimizer and schedule;
- `plan`, `collate`, `step`: the step plan, the tensors of a forward pass, one optimizer step;
- `losses`, `references`: SFT, KL rehearsal and preference terms, measured against the frozen base;
- `metrics`: the metrics rows, ETA, summary, loss curve and lineage;
- `launcher`, `command`: several processes (torchrun and the environment protocol) and
  `python -m continuous_learning.train`.

Stands on core, storage, registry and chat. torch, transformers, peft and bitsandbytes are imported inside
functions only, so importing this package stays cheap.
"""
from ..core.settings import REHEARSAL_MODES, target_modules
from .collate import Batch, KlTargets, SequenceTargets, collate_packed, collate_padded, loss_positions, micro_batches
from .command import TRAIN_FLAGS, _parse_args, main
from .config import (
    EPOCHS_FLAG_CEILING,
    MAX_GRAD_NORM,
    lr_multiplier,
    step_overrides,
    step_size,
    total_steps,
    validate_train_config,
    warmup_steps,
)
from .encode import (
    END_OF_TURN_TOKENS,
    IGNORE_INDEX,
    PLACEHOLDER,
    SYSTEM_PROMPT_VARIANTS,
    encode_example,
    end_of_turn_ids,
    label_count,
    load_examples,
    placeholder_tokens,
    system_prompts,
    tokenize_examples,
    with_system_prompt,
)
from .launcher import (
    LOCK_HELD_ENV,
    PROGRESS_ENV,
    PROGRESS_PREFIX,
    RESULT_ENV,
    SETTINGS_ENV,
    Progress,
    launch_command,
    launch_processes,
    settings_env,
    settings_from_env,
)
from .losses import topk_kl
from .metrics import final_window, library_versions
from .model_build import accepts_logits_to_keep as _accepts_logits_to_keep
from .model_build import bnb_4bit_layers as _bnb_4bit_layers
from .model_build import keep_bnb_training_layout as _keep_bnb_training_layout
from .model_build import unpack_bnb_cpu_weights as _unpack_bnb_cpu_weights
from .plan import MEGA_BATCH, example_order, group_by_length, pack_rows, shard
from .recipe import Trainer, run_training
from .references import REFERENCE_TOP_K
from .run_folder import (
    ADAPTER_FILES,
    CHECKPOINT_DIR,
    FAILED_FILE,
    PARTIAL_SUFFIX,
    RESUME_HINT,
    RUN_FILE,
    TRAINER_STATE,
    free_version,
)

__all__ = [
    "ADAPTER_FILES", "CHECKPOINT_DIR", "END_OF_TURN_TOKENS", "EPOCHS_FLAG_CEILING", "FAILED_FILE", "IGNORE_INDEX",
    "LOCK_HELD_ENV", "MAX_GRAD_NORM", "MEGA_BATCH", "PARTIAL_SUFFIX", "PLACEHOLDER", "PROGRESS_ENV", "PROGRESS_PREFIX",
    "REFERENCE_TOP_K", "REHEARSAL_MODES", "RESULT_ENV", "RESUME_HINT", "RUN_FILE", "SETTINGS_ENV",
    "SYSTEM_PROMPT_VARIANTS", "TRAINER_STATE", "TRAIN_FLAGS", "Batch", "KlTargets", "Progress", "SequenceTargets",
    "Trainer", "_accepts_logits_to_keep", "_bnb_4bit_layers", "_keep_bnb_training_layout", "_parse_args",
    "_unpack_bnb_cpu_weights", "collate_packed", "collate_padded", "encode_example", "end_of_turn_ids",
    "example_order", "final_window", "free_version", "group_by_length", "label_count", "launch_command",
    "launch_processes", "library_versions", "load_examples", "loss_positions", "lr_multiplier", "main",
    "micro_batches", "pack_rows", "placeholder_tokens", "run_training", "settings_env", "settings_from_env", "shard",
    "step_overrides", "step_size", "system_prompts", "target_modules", "tokenize_examples", "topk_kl",
    "total_steps", "validate_train_config", "warmup_steps", "with_system_prompt",
]
