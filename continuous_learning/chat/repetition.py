"""Repetition control for chat answers: the penalties on next-token scores and the line checks that stop an answer
running into blank or repeated lines, plus the measures bench uses to count tokens wasted on such lines. Pure
functions apart from `penalize_repetition`, which works on torch tensors (imported inside it)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.settings import ChatConfig


@dataclass(frozen=True)
class RepetitionControl:
    """Keeps a chat answer from babbling. `penalty` is llama.cpp's repeat_penalty over the last `window` tokens
    (prompt included, as llama.cpp and Ollama count them, so an exported model answers alike with the same value);
    `frequency` and `presence` are OpenAI's additive penalties over the answer; an answer stops once it ends in
    `max_blank_lines` blank lines, or in the same line (or group of lines) `max_repeated_lines` times in a row.
    The default instance changes nothing; the chat and the service build theirs from [chat] (`from_settings`).
    Evaluation decodes on its own (evaluate.greedy_batch), so eval answers never see this."""

    penalty: float = 1.0
    window: int = 64
    frequency: float = 0.0
    presence: float = 0.0
    max_blank_lines: int = 0
    max_repeated_lines: int = 0

    @classmethod
    def from_settings(cls, chat: ChatConfig) -> RepetitionControl:
        return cls(penalty=chat.repetition_penalty, window=chat.repetition_window, frequency=chat.frequency_penalty,
                   presence=chat.presence_penalty, max_blank_lines=chat.max_blank_lines,
                   max_repeated_lines=chat.max_repeated_lines)

    def overridden(self, penalty: float | None = None, frequency: float | None = None,
                   presence: float | None = None) -> RepetitionControl:
        """This control with a request's own values where it gave them."""
        given = {"penalty": penalty, "frequency": frequency, "presence": presence}
        return replace(self, **{k: v for k, v in given.items() if v is not None})

    @property
    def changes_scores(self) -> bool:
        return (self.penalty != 1.0 and self.window > 0) or bool(self.frequency) or bool(self.presence)

    @property
    def watches_lines(self) -> bool:
        return self.max_blank_lines > 0 or self.max_repeated_lines > 1


def penalize_repetition(scores, input_ids, prompt_length: int, control: RepetitionControl):
    """Next-token scores after the penalties of `control` (torch tensors, one row per sequence)."""
    import torch

    if control.penalty != 1.0 and control.window > 0:
        recent = input_ids[:, -control.window:]
        seen = scores.gather(1, recent)
        seen = torch.where(seen > 0, seen / control.penalty, seen * control.penalty)
        scores = scores.scatter(1, recent, seen)
    answer = input_ids[:, prompt_length:]
    if (control.frequency or control.presence) and answer.shape[-1]:
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        scores = scores - control.frequency * counts - control.presence * (counts > 0).to(scores.dtype)
    return scores


STRUCTURAL_LINE_CHARS = 8  # shorter lines ("}", "];", "else:", "</div>") repeat in any well-formed answer
PARTIAL_COPY_CHARS = 40  # about 10 tokens: an unfinished line copying an earlier one this far counts as repeated


def _is_structural(line: str) -> bool:
    """Code fences and short closing lines come back in every answer with code: structure, not babble."""
    text = line.strip()
    return text.startswith("```") or len(text) < STRUCTURAL_LINE_CHARS


def wasted_lines(lines: list[str]) -> list[bool]:
    """Per line: a blank line after another blank one, or a line the answer already wrote (structure excepted)."""
    marks, earlier, previous_blank = [], set(), False
    for line in lines:
        blank = not line.strip()
        marks.append((blank and previous_blank) or (not blank and not _is_structural(line)
                                                    and line.rstrip() in earlier))
        if not blank:
            earlier.add(line.rstrip())
        previous_blank = blank
    return marks


def line_loop(text: str, max_blank_lines: int, max_repeated_lines: int) -> bool:
    """Whether `text` ends in `max_blank_lines` blank lines in a row, or in `max_repeated_lines` lines in a row that
    each repeat an earlier line of the answer (blank lines, fences and short closing lines between them neither count
    nor break the run, so a paragraph coming round again is caught whatever its length); the line being written
    counts once it has copied an earlier line for PARTIAL_COPY_CHARS characters."""
    *lines, current = text.split("\n")
    if max_blank_lines > 0 and len(lines) >= max_blank_lines and not "".join(lines[-max_blank_lines:]).strip():
        return True
    if max_repeated_lines < 1:
        return False
    run = 0
    for line, wasted in zip(lines, wasted_lines(lines)):
        if line.strip() and not _is_structural(line):
            run = run + 1 if wasted else 0
    return run + _copies_earlier_line(current, lines) >= max_repeated_lines


def _copies_earlier_line(current: str, lines: list[str]) -> bool:
    """A line still being written that has copied an earlier line for PARTIAL_COPY_CHARS characters: a long line
    coming round again is caught before it is finished."""
    start = current.rstrip()
    return len(start.strip()) >= PARTIAL_COPY_CHARS and any(line.startswith(start) for line in lines)


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text each generated token added (a token inside a multi-byte character adds nothing until it ends)."""
    pieces, before = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        pieces.append(text[len(before):] if text.startswith(before) else "")
        before = text if text.startswith(before) else before
    return pieces


def looping_tokens(pieces: list[str]) -> float:
    """Tokens an answer spent on `wasted_lines` (blank runs, lines already written); a token that ends one line and
    starts the next counts by the share of its characters in wasted lines (a line owns its newline)."""
    lines = "".join(pieces).split("\n")
    wasted_chars, position = set(), 0
    for line, wasted in zip(lines, wasted_lines(lines)):
        if wasted:
            wasted_chars.update(range(position, position + len(line) + 1))
        position += len(line) + 1
    total, start = 0.0, 0
    for piece in pieces:
        if piece:
            total += sum(1 for i in range(start, start + len(piece)) if i in wasted_chars) / len(piece)
        start += len(piece)
    return total

