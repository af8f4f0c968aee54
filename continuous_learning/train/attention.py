"""Attention for training on the CPU: fp32, one causal block per packed example.

Measured on SmolLM2-135M (a packed row of ~170 tokens: one example and two rehearsal anchors, one thread), torch's
CPU attention forward + backward took 8.9 ms per layer in bf16 with the block-diagonal mask, 5.5 ms in fp32 with
the mask and 2.7 ms in fp32 run once per example with `is_causal` (no mask to build or read): a fifth of a training
step went to attention before. The answer is the same as the mask's: a token sees only the earlier tokens of its own
example. GPUs keep transformers' own attention (their bf16 kernels are fast). torch is imported inside functions."""
from __future__ import annotations

NAME = "cl_cpu_training"


def segments_of(rows: list[list[int]], length: int) -> list[list[tuple[int, int]]]:
    """(start, length) of each example in each packed row of `length` positions; the pad tail is one more block
    (its outputs feed no loss and no real token attends to it)."""
    blocks = []
    for lengths in rows:
        starts, at = [], 0
        for n in lengths:
            starts.append((at, n))
            at += n
        if at < length:
            starts.append((at, length - at))
        blocks.append(starts)
    return blocks


def cpu_training_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, segments=None, **kwargs):
    """transformers' attention interface: (output (batch, seq, heads, dim), None). With `segments` (from
    `segments_of`) each example attends causally within itself, ignoring `attention_mask`; without, transformers'
    sdpa attention on the mask. Either way in fp32, outside autocast, cast back to the caller's dtype."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(device_type=query.device.type, enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        if segments is None:
            out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, **kwargs)
            return out.to(dtype), None
        groups = query.shape[1] // key.shape[1]
        if groups > 1:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        rows = []
        for r, blocks in enumerate(segments):
            parts = [torch.nn.functional.scaled_dot_product_attention(
                query[r : r + 1, :, s : s + n], key[r : r + 1, :, s : s + n], value[r : r + 1, :, s : s + n],
                is_causal=True, scale=scaling, dropout_p=dropout) for s, n in blocks]
            rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous().to(dtype), None


def use_cpu_training_attention(model) -> None:
    """Make `model` (a transformers model, before PEFT wraps it) attend through `cpu_training_attention`."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, cpu_training_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches still get their 4D mask made the sdpa way
    model.set_attn_implementation(NAME)
