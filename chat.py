"""Chat with the local model and rate its answers: `python chat.py [--home DIR] [--user NAME]`.

A thin entry: everything lives in continuous_learning (see `cl chat --help`)."""
import sys

from continuous_learning.cli import main

ROOT_OPTIONS = {"--home": 1, "--base-model": 1, "--debug": 0}


def split_args(argv: list[str]) -> list[str]:
    """Root options (workspace, model, debug) go before the command, the rest after it."""
    root, rest, i = [], [], 0
    while i < len(argv):
        takes = ROOT_OPTIONS.get(argv[i].split("=")[0])
        if takes is None:
            rest.append(argv[i])
            i += 1
        else:
            n = 1 if "=" in argv[i] else 1 + takes
            root += argv[i : i + n]
            i += n
    return [*root, "chat", *rest]


if __name__ == "__main__":
    main(split_args(sys.argv[1:]))
