"""Evaluation: keyword scoring (pure, `scoring`), the questions asked (`questions`: eval files, the everyday set,
questions derived from a snapshot), batched greedy generation (`generation`), held-out loss (`heldout`), preference
log-likelihoods (`likelihoods`), the per-version runner with result reuse (`versions`), the promotion gate (pure,
`gate`) and the eval command that ties them together (`run`). Stands on registry, chat and train (imported inside
functions); torch is imported only inside the functions that need it."""
from .gate import Decision, GateRules, gate, mcnemar_gain, non_inferiority_p, paired_outcomes, sign_flip_gain
from .generation import (
    OTHER_SYSTEM_PROMPTS,
    answer_in_batches,
    by_length,
    common_prefix,
    greedy_batch,
    question_conversations,
    target_system_prompts,
)
from .heldout import answer_examples, assistant_only_labels, held_out_loss
from .likelihoods import answer_logliks, preference_answers, preference_likelihoods
from .questions import (
    EXAMPLE_LINE,
    GENERAL_FILE,
    LINE_FORMAT,
    MATCH_MODES,
    MAX_DERIVED,
    PLACEHOLDER,
    TargetSet,
    answer_keyword,
    check_eval_ready,
    default_eval_file,
    derive_items,
    file_info,
    general_file,
    items_sha256,
    load_eval_file,
    parse_eval_item,
    parse_eval_lines,
    target_set,
)
from .run import evaluate_and_gate, gate_rules, plan
from .scoring import EvalItem, contains_keyword, normalise, score_answer, score_items
from .snapshots import load_messages_file, snapshot_eval_path
from .versions import SCORER, Progress, earlier_part, evaluate_versions, result_context

__all__ = [
    "Decision", "GateRules", "gate", "mcnemar_gain", "non_inferiority_p", "paired_outcomes", "sign_flip_gain",
    "OTHER_SYSTEM_PROMPTS", "answer_in_batches", "by_length", "common_prefix", "greedy_batch",
    "question_conversations", "target_system_prompts",
    "answer_examples", "assistant_only_labels", "held_out_loss",
    "answer_logliks", "preference_answers", "preference_likelihoods",
    "EXAMPLE_LINE", "GENERAL_FILE", "LINE_FORMAT", "MATCH_MODES", "MAX_DERIVED", "PLACEHOLDER", "TargetSet",
    "answer_keyword", "check_eval_ready", "default_eval_file", "derive_items", "file_info", "general_file",
    "items_sha256", "load_eval_file", "parse_eval_item", "parse_eval_lines", "target_set",
    "evaluate_and_gate", "gate_rules", "plan",
    "EvalItem", "contains_keyword", "normalise", "score_answer", "score_items",
    "load_messages_file", "snapshot_eval_path",
    "SCORER", "Progress", "earlier_part", "evaluate_versions", "result_context",
]
