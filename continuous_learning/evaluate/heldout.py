"""Held-out loss and answer log-likelihoods of a loaded model, measured by the training losses themselves
(`train.losses`), batched, on the final assistant messages masked exactly as training masks them. torch is
imported only inside the functions."""
from __future__ import annotations

BATCH_SIZE = 8


def assistant_only_labels(tokenizer, messages: list[dict], max_len: int = 2048) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) scoring only the final assistant message and its end-of-turn token, exactly as training
    masks it; None when the conversation has no final answer to score."""
    from ..train import encode_example

    return encode_example(tokenizer, messages, max_len)


def answer_examples(tokenizer, conversations: list[list[dict]], max_len: int = 2048) -> list[dict]:
    """The conversations as training examples (ids and labels); those without a final answer to score are left out."""
    out = []
    for messages in conversations:
        encoded = assistant_only_labels(tokenizer, messages, max_len)
        if encoded is not None:
            out.append({"input_ids": encoded[0], "labels": encoded[1], "weight": 1.0})
    return out


def measuring_forward(model):
    """How a loaded (chat) model is called for a measurement: its device, no autocast, logits only where needed."""
    from ..train.losses import Forward
    from ..train.model_build import accepts_logits_to_keep

    return Forward(model.device, autocast=False, logits_to_keep=accepts_logits_to_keep(model))


def _measured(model, measure):
    """`measure()` on a model that is not being trained, left in eval mode afterwards: the training losses keep
    bitsandbytes' 4-bit layers in their training layout, which a model that only answers does not need."""
    try:
        return measure()
    finally:
        if not model.training:
            model.eval()


def held_out_loss(model, tokenizer, conversations: list[list[dict]], max_len: int = 2048) -> dict | None:
    """Token-weighted mean loss and perplexity over the final assistant messages (None: nothing to score)."""
    from ..train import losses
    from ..train.encode import pad_token_id

    examples = answer_examples(tokenizer, conversations, max_len)
    if not examples:
        return None
    measured = _measured(model, lambda: losses.held_out_loss(measuring_forward(model), model, examples, BATCH_SIZE,
                                                             pad_token_id(tokenizer)))
    if not measured["tokens"]:
        return None
    return {"eval_loss": measured["loss"], "perplexity": measured["perplexity"], "tokens": measured["tokens"],
            "examples": len(conversations)}


def answer_logliks(model, tokenizer, conversations: list[list[dict]], max_len: int = 2048) -> list[float]:
    """Mean per-token log-likelihood (nats) of each conversation's final assistant answer."""
    from ..train import losses
    from ..train.encode import pad_token_id

    examples = answer_examples(tokenizer, conversations, max_len)
    return _measured(model, lambda: losses.answer_logliks(measuring_forward(model), model, examples,
                                                          pad_token_id(tokenizer), BATCH_SIZE))
