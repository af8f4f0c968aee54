"""Typed errors. The library raises them; only the CLI turns them into one red line and an exit code."""
from __future__ import annotations


class CLError(Exception):
    """An error the user can act on. `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} - {self.hint}" if self.hint else self.message


class ConfigError(CLError):
    exit_code = 2


class InputError(CLError):
    """Bad user input: a file, a line, an argument."""

    exit_code = 2


class ModelNotFoundError(CLError):
    exit_code = 3


class RegistryError(CLError):
    exit_code = 4


class LockHeldError(CLError):
    exit_code = 5


class TrainingFailed(CLError):
    exit_code = 6


class NothingToDo(CLError):
    """Not a failure: the command had nothing to work on (exit 0 unless a caller decides otherwise)."""

    exit_code = 0
