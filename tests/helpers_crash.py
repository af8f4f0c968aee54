"""Subprocess workers for tests/test_reliability.py (launched with sys.executable, often killed with SIGKILL).

    helpers_crash.py stress PATH WRITER COUNT   append COUNT records of varying size, each tagged (writer, seq)
    helpers_crash.py ack PATH                   append forever; print each id AFTER append_jsonl returned
    helpers_crash.py registry                   registry.update forever (CL_HOME), printing each version
    helpers_crash.py curate                     print "start", run_curate(full=True) once, print the snapshot id
    helpers_crash.py hold NAME                  take workspace_lock(NAME), print "held", sleep
    helpers_crash.py flip V1 V2 ...             promote / roll back among the versions forever, printing each champion
    helpers_crash.py forget USER                print "start", forget USER, print "done"
    helpers_crash.py train                      print "start", train on the newest snapshot, print the version
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from continuous_learning.storage import store  # noqa: E402


def size_for(seq: int) -> int:
    """Mostly small lines; every 10th over 4 KB (beyond PIPE_BUF), every 50th about 100 KB."""
    if seq % 50 == 7:
        return 100_000 + seq
    if seq % 10 == 3:
        return 4_500 + 37 * seq % 3_000
    return 20 + seq % 200


def stress(path: str, writer: str, count: str) -> None:
    for seq in range(int(count)):
        pad = chr(ord("a") + int(writer) % 26) * size_for(seq)
        store.append_jsonl(Path(path), [{"writer": int(writer), "seq": seq, "pad": pad}])


def ack(path: str) -> None:
    rng = random.Random()
    n = 0
    while True:
        ident = f"{rng.getrandbits(64):016x}-{n}"
        size = rng.choice((10, 300, 5_000, 5_000, 120_000))
        store.append_jsonl(Path(path), [{"id": ident, "pad": "x" * size}])
        print(ident, flush=True)  # acknowledged only once the append has returned
        n += 1


def registry_loop() -> None:
    from continuous_learning import registry
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    while True:
        made = {}

        def change(doc: dict, made: dict = made) -> dict:
            version = f"1.{len(doc['adapters']) + 1}.0"
            made["version"] = version
            return registry.register_adapter(doc, {"version": version, "path": f"adapters/{version}",
                                                   "status": "candidate",
                                                   "note": "fake entry " + "n" * 2_000})

        registry.update(settings, change, "test_fake_adapter")
        print(made["version"], flush=True)


def curate() -> None:
    from continuous_learning.core.settings import load_settings
    from continuous_learning.curate import run_curate

    settings = load_settings()
    print("start", flush=True)
    manifest = run_curate(settings, full=True, include_unrated=True)  # full: the same work every run
    print(manifest["id"], flush=True)


def hold(name: str) -> None:
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    with store.workspace_lock(settings.lock_dir, name):
        print("held", flush=True)
        time.sleep(60)


def flip(*versions: str) -> None:
    from continuous_learning import registry
    from continuous_learning.core.settings import load_settings
    from continuous_learning.registry import promote_version, rollback_champion

    settings = load_settings()
    rng = random.Random()
    while True:
        champion = registry.load(settings)["champion"]
        if rng.random() < 0.3 and champion is not None:
            moved = rollback_champion(settings, reason="crash test")
        else:
            moved = promote_version(settings, rng.choice([v for v in versions if v != champion]), "crash test",
                                    forced=True)
        print(moved["to"], flush=True)


def forget(user: str) -> None:
    from continuous_learning.capture.gdpr import forget_user
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    print("start", flush=True)
    forget_user(settings, user)
    print("done", flush=True)


def train() -> None:
    from continuous_learning.core.settings import load_settings
    from continuous_learning.train import run_training

    settings = load_settings()
    print("start", flush=True)
    entry = run_training(settings)
    print(entry["version"], flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"stress": stress, "ack": ack, "registry": registry_loop, "curate": curate, "hold": hold, "flip": flip,
     "forget": forget, "train": train}[mode](*args)
