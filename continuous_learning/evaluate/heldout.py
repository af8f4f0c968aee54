"""Held-out loss: the token-weighted loss of a snapshot's final assistant messages, masked exactly as training
masks them. torch is imported only inside the functions."""
from __future__ import annotations

import math


def assistant_only_labels(tokenizer, messages: list[dict], max_len: int = 2048) -> tuple[list[int], list[int]] | None:
    """(input_ids, labels) scoring only the final assistant message and its end-of-turn token, exactly as training
    masks it; None when the conversation has no final answer to score."""
    from ..train import encode_example

    return encode_example(tokenizer, messages, max_len)


def final_answer_logits(model, tokenizer, conversations: list[list[dict]], max_len: int = 2048):
    """(logits, target labels) of each conversation's final assistant answer, shifted for next-token loss;
    conversations without a final answer to score are skipped."""
    import torch

    for messages in conversations:
        encoded = assistant_only_labels(tokenizer, messages, max_len)
        if encoded is None:
            continue
        ids, labels = encoded
        input_ids = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids).logits[0, :-1].float()
        yield logits, torch.tensor(labels[1:], device=logits.device)


def held_out_loss(model, tokenizer, conversations: list[list[dict]], max_len: int = 2048) -> dict | None:
    """Token-weighted mean loss and perplexity over the final assistant messages."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    for logits, target in final_answer_logits(model, tokenizer, conversations, max_len):
        total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    if count == 0:
        return None
    loss = total / count
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count, "examples": len(conversations)}
