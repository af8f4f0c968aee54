"""The chat loop: stream an answer, ask for a rating, record the turn. I/O goes through small callables so
tests (and piped stdin) drive it line by line."""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console

from .. import registry
from ..capture.fields import check_feedback
from ..capture.ingest import Recorder, Turn, default_user_id, record_generation
from ..core.errors import CLError, InputError
from ..core.records import Feedback, Interaction, new_id, utc_now
from ..core.settings import Settings
from ..monitor import ab
from .models import ChatModel, GenerationStats, RepetitionControl

RATING_PROMPT = "Helpful? [y/n/1-5/c=correct, Enter=skip] "
HELP = """Commands:
  /help          this help
  /reset         forget the conversation so far (keeps the system prompt)
  /system TEXT   set a new system prompt and start over
  /adapter       which adapter answers
  /private       never train on the last turn
  /quit          leave (Ctrl-D works too)
After each answer: y or n, a score 1-5, c to type the answer it should have given, Enter to skip.
A comment may follow the rating on the same line: '2 too vague'."""


@dataclass
class Rating:
    feedback: Feedback = field(default_factory=Feedback)
    skipped: bool = True


def parse_rating(line: str) -> Rating | None:
    """'y', 'n', '1'-'5', 'c' (correction follows), '' (skip), each optionally followed by a comment. None = invalid."""
    head, _, comment = line.strip().partition(" ")
    head = head.lower()
    comment = comment.strip() or None
    if head == "":
        return Rating()
    if head in {"y", "yes"}:
        return Rating(Feedback(helpful=True, comment=comment), skipped=False)
    if head in {"n", "no"}:
        return Rating(Feedback(helpful=False, comment=comment), skipped=False)
    if head in {"1", "2", "3", "4", "5"}:
        score = int(head)
        return Rating(Feedback(score=score, helpful=score >= 4 if score != 3 else None, comment=comment), skipped=False)
    if head in {"c", "correct"}:
        return Rating(Feedback(helpful=False, correction="", comment=comment), skipped=False)
    return None


class ChatSession:
    """One conversation with the champion (or base) model, recording every turn through the Recorder."""

    def __init__(self, settings: Settings, read: Callable[[str], str], console: Console,
                 chat_model: ChatModel | None = None, recorder: Recorder | None = None, user_id: str | None = None):
        self.settings = settings
        self.read = read
        self.console = console
        self.chat_model = chat_model
        self.recorder = recorder or Recorder(settings)
        self.user_id = user_id or default_user_id()
        self.session_id = new_id()
        self.started_at = utc_now()
        self.ab_arm: str | None = None  # the A/B arm this session is in, if a test routes it
        self.system_prompt = settings.chat.system_prompt
        self.history: list[dict] = []
        self.last_interaction: Interaction | None = None

    # --- set-up ---
    def start(self) -> None:
        if self.recorder.salt_created:
            self.console.print(f"[yellow]Created a random user-id salt in {self.settings.salt_file} "
                               "(set CL_USER_HASH_SALT to share one across machines).[/yellow]")
        if self.chat_model is None:
            # the prompt shows while the model (then the sanitizer) loads; the first answer waits if need be
            self.chat_model = ChatModel.load_in_background(self.settings, then=(lambda: self.recorder.sanitizer.load(),
                                                                                ))
        self.refresh_champion()
        serving = "an A/B test is running" if self.ab_arm else self.chat_model.active or "none (base)"
        self.console.print(f"[bold]cl chat[/bold] - {self.chat_model.base.name}, adapter: {serving}. "
                           "Type /help for commands, /quit to leave.")

    def refresh_champion(self) -> None:
        """Serve the registry's champion (or, for a session in an A/B test's candidate arm, the candidate);
        a promotion, rollback or test started elsewhere takes effect on the next turn."""
        try:
            doc = registry.load(self.settings)
            test = ab.running_test(self.settings)
        except CLError as exc:
            self.console.print(f"[yellow]registry unreadable, keeping the current adapter: {exc}[/yellow]")
            return
        champion = doc.get("champion")
        self.ab_arm = ab.session_arm(test, self.session_id, self.started_at) if ab.can_serve(test, doc) else None
        if self.ab_arm == ab.CANDIDATE and self._serve(doc, test["candidate"]):
            return
        if self.ab_arm == ab.CANDIDATE:  # the candidate cannot be loaded: answer with the champion, outside the test
            self.ab_arm = None
        if champion == self.chat_model.active:
            return
        if self._serve(doc, champion) and self.ab_arm is None:  # A/B sessions are not told which arm answers
            self.console.print(f"[dim](now answering with "
                               f"{'adapter ' + champion if champion else 'the base model'})[/dim]")

    def _serve(self, doc: dict, version: str | None) -> bool:
        if version == self.chat_model.active:
            return True
        try:
            self.chat_model.serve_adapter(self.settings, doc, version)  # checks the files' sha256 first
        except CLError as exc:
            self.console.print(f"[yellow]cannot load adapter {version}, staying on {self.chat_model.active or 'base'}: "
                               f"{exc}[/yellow]")
            return False
        return True

    # --- the loop ---
    def run(self) -> None:
        self.start()
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-D or /quit to leave)[/dim]")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    break
                continue
            if not self.turn(line):
                break
        self.console.print("bye")

    def command(self, line: str) -> bool:
        """Handle a slash command; False means quit."""
        name, _, arg = line.partition(" ")
        if name in {"/quit", "/exit", "/q"}:
            return False
        if name == "/help":
            self.console.print(HELP, markup=False)
        elif name == "/reset":
            self.history = []
            self.console.print("[dim](conversation cleared)[/dim]")
        elif name == "/system":
            if not arg.strip():
                self.console.print(f"system prompt: {self.system_prompt}", markup=False)
            else:
                self.system_prompt, self.history = arg.strip(), []
                self.console.print("[dim](system prompt set; conversation cleared)[/dim]")
        elif name == "/adapter":
            arm = f"; A/B test arm: {self.ab_arm}" if self.ab_arm else ""
            self.console.print(f"adapter: {self.chat_model.active or 'none (base model)'}; base: "
                               f"{self.chat_model.base.name}{arm}", markup=False)
        elif name == "/private":
            self.mark_private()
        else:
            self.console.print(f"unknown command {name}; /help lists them", markup=False)
        return True

    def mark_private(self) -> None:
        if self.last_interaction is None:
            self.console.print("no turn to mark yet")
            return
        self.recorder.record_feedback(self.last_interaction, Feedback(private=True), self.user_id)
        self.console.print("[dim](last turn marked private: it will never be trained on)[/dim]")

    def turn(self, question: str) -> bool:
        """Answer, ask for a rating, record. False means the user quit at the rating prompt."""
        self.refresh_champion()
        messages = [{"role": "system", "content": self.system_prompt}, *self.history,
                    {"role": "user", "content": question}]
        cfg = self.settings.chat
        context = self.chat_model.fit_context(messages, cfg.max_new_tokens, cfg.context_tokens)
        answer, stats = self.stream_answer(context)
        rating, keep_going = self.ask_rating()
        final_answer = rating.feedback.correction or answer
        self.history += [{"role": "user", "content": question}, {"role": "assistant", "content": final_answer}]
        turn = Turn(
            messages=[*context, {"role": "assistant", "content": answer}],
            session_id=self.session_id, user_id=self.user_id, feedback=rating.feedback,
            model=self.chat_model.base.name, adapter_version=self.chat_model.active,
            prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
            latency_ms=round(stats.latency_ms, 1), truncated=stats.truncated, source="chat", ab_arm=self.ab_arm,
        )
        self.last_interaction = self.recorder.record_turns([turn])[0]
        record_generation(self.settings, self.last_interaction.id, stats, self.chat_model.base.name,
                          self.chat_model.active)
        return keep_going

    def stream_answer(self, messages: list[dict]) -> tuple[str, GenerationStats]:
        stats, stop = GenerationStats(), threading.Event()
        pieces: list[str] = []
        cfg = self.settings.chat
        stream = self.chat_model.stream(messages, cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop, stats,
                                        repetition=RepetitionControl.from_settings(cfg))
        self.console.print("bot> ", end="", style="bold cyan")
        try:
            for piece in stream:
                pieces.append(piece)
                self.console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the program
            stop.set()
            pieces.extend(stream)
            self.console.print(" [dim](stopped)[/dim]", end="")
        self.console.print()
        return "".join(pieces).strip(), stats

    def ask_rating(self) -> tuple[Rating, bool]:
        for _ in range(3):
            try:
                line = self.read(RATING_PROMPT)
            except (EOFError, KeyboardInterrupt):
                return Rating(), False
            rating = parse_rating(line)
            if rating is None:
                self.console.print("please answer y, n, 1-5, c or press Enter", markup=False)
                continue
            if rating.feedback.correction == "":
                rating.feedback.correction = self.ask_correction()
                if not rating.feedback.correction:
                    rating = Rating(Feedback(helpful=False, comment=rating.feedback.comment), skipped=False)
            if not rating.skipped and self.settings.chat.ask_comment and rating.feedback.comment is None:
                rating.feedback.comment = self._read_optional("comment (Enter to skip)> ")
            try:
                check_feedback(rating.feedback, self.settings.privacy)
            except InputError as exc:
                self.console.print(f"{exc.message}: please rate again", markup=False)
                continue
            return rating, True
        return Rating(), True

    def ask_correction(self) -> str | None:
        return self._read_optional("the answer it should have given> ")

    def _read_optional(self, prompt: str) -> str | None:
        try:
            return self.read(prompt).strip() or None
        except (EOFError, KeyboardInterrupt):
            return None


def console_reader(console: Console) -> Callable[[str], str]:
    """input() with the prompt shown; works for a TTY and for piped stdin (prompt echoed, line read in order)."""
    import sys

    def read(prompt: str) -> str:
        if sys.stdin.isatty():
            return console.input(prompt)
        console.print(prompt, end="", markup=False)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        console.print(line.rstrip("\n"), markup=False, highlight=False)
        return line.rstrip("\n")

    return read


def run(settings: Settings, user_id: str | None = None, console: Console | None = None,
        read: Callable[[str], str] | None = None, chat_model: ChatModel | None = None) -> None:
    console = console or Console(highlight=False)
    ChatSession(settings, read or console_reader(console), console, chat_model=chat_model, user_id=user_id).run()
