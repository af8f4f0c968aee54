"""The package is a house of floors: a module may import its own floor and the floors below, never one above.

Parsed from the source (every import, also those inside functions), so nothing is imported to check it."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "continuous_learning"

# Lowest floor first.
FLOORS = [
    {"core"},
    {"storage"},
    {"registry"},
    {"monitor"},  # A/B state is read by capture (forget stops a tainted test) and chat (which arm serves)
    {"capture"},
    {"chat"},
    {"curate", "train", "evaluate", "export"},
    {"loop"},
    {"serve"},
    {"cli"},
    {"pipeline", "demo", "drift"},  # shims that keep old entry points working; nothing inside imports them
]
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}


def top_part(module: str) -> str:
    """'continuous_learning.capture.privacy' -> 'capture'."""
    return module.split(".")[1]


def module_of(path: Path) -> str:
    parts = ["continuous_learning", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import of this package in the file, resolved from relative form."""
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t.startswith("continuous_learning.")]
    return found


def test_every_module_has_a_floor():
    homeless = sorted({top_part(module_of(p)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                       or p.parent != PACKAGE} - set(FLOOR_OF))
    assert homeless == [], f"place these in FLOORS (tests/test_layers.py): {homeless}"


def test_no_import_runs_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        here = top_part(module_of(path))
        for line, target in imported_modules(path):
            there = top_part(target)
            if FLOOR_OF.get(there, -1) > FLOOR_OF[here]:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {target}")
    assert upward == [], "imports that run upward:\n" + "\n".join(upward)


def test_every_subpackage_says_what_it_owns():
    missing = [p.parent.name for p in PACKAGE.glob("*/__init__.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_the_old_entry_points_still_work():
    from continuous_learning.monitor.drift import check_drift

    assert importlib.import_module("continuous_learning.drift").check_drift is check_drift
    for module in ("continuous_learning.pipeline", "continuous_learning.demo", "continuous_learning.cli"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (module, out.stderr[-500:])


def test_cl_help_imports_no_heavy_library():
    code = ("import sys; from continuous_learning.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'presidio_analyzer', 'spacy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
