"""`cl schedule`: run `cl cycle` on the cadence of settings.cycle through the user's crontab or systemd timers.

Three jobs per workspace: daily curation (+ drift, A/B and health checks), weekly training (+ eval + gate),
monthly full evaluation. Our crontab lines sit between marker comments naming the workspace, so the user's
other lines (and other workspaces' blocks) are kept; systemd units are named after a hash of the workspace.
Rendering is pure; reading and writing the crontab or unit files happens at the bottom.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CLError, ConfigError
from ..core.settings import CycleConfig, Settings
from ..storage import keys
from ..storage.store import ensure_dir

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))
DAY_NAMES = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


@dataclass(frozen=True)
class Job:
    name: str
    cron: str
    steps: str

    def describe(self) -> str:
        return f"{self.name}: '{self.cron}' -> cl cycle --only {self.steps}"


def jobs(config: CycleConfig) -> list[Job]:
    return [
        Job("daily", config.curate_cron, "curate,drift,ab,health"),
        Job("weekly", config.train_cron, "train"),
        Job("monthly", config.eval_cron, "eval"),
    ]


# --- cron expressions ------------------------------------------------------------------------------------
def _field_values(text: str, name: str, low: int, high: int) -> list[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if base == "*":
                start, end = low, high
            elif "-" in base:
                start, end = (int(x) for x in base.split("-", 1))
            else:
                start = end = int(base)
                if step_text:
                    end = high
        except ValueError:
            raise ConfigError(f"cron {name} field '{text}' is not understood", "use numbers, '*', ranges a-b, lists "
                                                                               "a,b and steps */n") from None
        if step < 1 or not low <= start <= end <= high:
            raise ConfigError(f"cron {name} field '{text}' is out of range {low}-{high}", "fix the cron expression in "
                                                                                          "[cycle]")
        values.update(range(start, end + 1, step))
    return sorted(values)


def parse_cron(expression: str) -> list[list[int]]:
    """Five cron fields expanded to their values (day of week 7 folded onto 0 = Sunday)."""
    parts = expression.split()
    if len(parts) != 5:
        raise ConfigError(f"cron expression '{expression}' needs 5 fields (minute hour day month weekday), has "
                          f"{len(parts)}",
                          "e.g. '0 3 * * *' for every day at 03:00")
    fields = [_field_values(p, name, low, high) for p, (name, low, high) in zip(parts, FIELDS)]
    fields[4] = sorted({d % 7 for d in fields[4]})
    return fields


def cron_to_oncalendar(expression: str) -> str:
    """A cron expression as a systemd OnCalendar value with the same firing times."""
    minutes, hours, days, months, weekdays = parse_cron(expression)
    day_any, weekday_any = expression.split()[2] == "*", expression.split()[4] == "*"
    if not day_any and not weekday_any:  # cron fires when EITHER matches; systemd would require both
        raise ConfigError(f"cron expression '{expression}' restricts both day of month and day of week",
                          "systemd timers cannot express cron's 'either' rule: restrict only one of them")

    def join(values: list[int], full: range) -> str:
        return "*" if values == list(full) else ",".join(f"{v:02d}" for v in values)

    date = f"*-{join(months, range(1, 13))}-{join(days, range(1, 32))}"
    clock = f"{join(hours, range(24))}:{join(minutes, range(60))}:00"
    prefix = "" if weekday_any else ",".join(DAY_NAMES[d] for d in weekdays) + " "
    return f"{prefix}{date} {clock}"


# --- what the jobs run -----------------------------------------------------------------------------------
def cl_command(home: Path) -> list[str]:
    """The absolute `cl` next to this Python (or `python -m continuous_learning.cli`), pinned to the workspace."""
    script = Path(sys.executable).parent / "cl"
    runnable = script.is_file() and os.access(script, os.X_OK)
    prefix = [str(script)] if runnable else [sys.executable, "-m", "continuous_learning.cli"]
    return [*prefix, "--home", str(home)]


def cron_log(home: Path) -> Path:
    return home / "logs" / "cycle_cron.log"


def markers(home: Path) -> tuple[str, str]:
    return f"# >>> cl schedule {home} >>>", f"# <<< cl schedule {home} <<<"


# --- the secrets the jobs need --------------------------------------------------------------------------
def secrets_dir(home: Path) -> Path:
    """Where `cl schedule install` keeps this workspace's key and salt for its jobs: outside the workspace (a copy
    of the workspace never carries its key), owner-only."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "cl" / "secrets" / unit_prefix(home)


def job_secrets(settings: Settings, env: dict | None = None) -> dict[str, str]:
    """Environment for the jobs: *_FILE variables naming 0600 files that hold the key and the salt this shell
    uses (written now when they come from the environment). Never a secret itself: those stay off every command
    line and out of the crontab."""
    env = dict(keys.secret_env(env))
    out: dict[str, str] = {}
    key_file = _secret_file(env, keys.KEY_ENV, keys.KEY_FILE_ENV, secrets_dir(settings.home) / "encryption_key")
    if key_file:
        out[keys.KEY_FILE_ENV] = key_file
    elif keys.recorded_fingerprints(settings.salt_file.parent).get("encryption_key"):
        raise CLError("this workspace's texts are encrypted, but CL_ENCRYPTION_KEY is not set here: the scheduled "
                      "jobs could not read them", "set CL_ENCRYPTION_KEY (or CL_ENCRYPTION_KEY_FILE) and install again")
    salt_file = _secret_file(env, keys.SALT_ENV, keys.SALT_FILE_ENV, secrets_dir(settings.home) / "user_hash_salt")
    if salt_file:
        out[keys.SALT_FILE_ENV] = salt_file
    keys.load_salt(settings.salt_file, env, record=False)  # the salt and key must be the workspace's own
    return out


def _secret_file(env: dict, variable: str, file_variable: str, target: Path) -> str | None:
    if (env.get(variable) or "").strip():
        return str(keys.write_secret_file(target, env[variable].strip()))
    if env.get(file_variable):
        path = Path(env[file_variable]).expanduser().resolve()
        keys.read_secret_file(path, file_variable)  # readable, owner-only
        return str(path)
    return None


def remove_job_secrets(home: Path) -> None:
    folder = secrets_dir(home)
    for name in ("encryption_key", "user_hash_salt"):
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def render_cron_block(home: Path, command: list[str], config: CycleConfig, env: dict[str, str] | None = None) -> str:
    """Our crontab lines for one workspace, between its markers (`env`: variables set for each job)."""
    begin, end = markers(home)
    lines = [begin, "# written by 'cl schedule install'; remove with 'cl schedule remove'"]
    assignments = "".join(f"{name}={shlex.quote(value)} " for name, value in sorted((env or {}).items()))
    for job in jobs(config):
        parse_cron(job.cron)
        run = shlex.join([*command, "cycle", "--only", job.steps]) + f" >> {shlex.quote(str(cron_log(home)))} 2>&1"
        lines.append(f"{job.cron} {(assignments + run).replace('%', chr(92) + '%')}")  # cron: a bare % is a newline
    lines.append(end)
    return "\n".join(lines) + "\n"


def strip_block(crontab: str, home: Path) -> tuple[str, bool]:
    """The crontab without this workspace's block, and whether there was one."""
    begin, end = markers(home)
    kept, inside, found = [], False, False
    for line in crontab.splitlines():
        if line.strip() == begin:
            inside = found = True
        elif inside and line.strip() == end:
            inside = False
        elif not inside:
            kept.append(line)
    text = "\n".join(kept)
    return (text + "\n" if text else ""), found


def find_block(crontab: str, home: Path) -> str | None:
    begin, end = markers(home)
    lines = crontab.splitlines()
    if begin not in (line.strip() for line in lines):
        return None
    start = next(i for i, line in enumerate(lines) if line.strip() == begin)
    stop = next((i for i in range(start, len(lines)) if lines[i].strip() == end), len(lines) - 1)
    return "\n".join(lines[start:stop + 1]) + "\n"


def merge_crontab(crontab: str, block: str, home: Path) -> str:
    """The user's crontab with this workspace's block replaced (or appended); every other line kept."""
    rest, _ = strip_block(crontab, home)
    return rest + block


def unit_prefix(home: Path) -> str:
    return f"cl-cycle-{hashlib.sha256(str(home).encode()).hexdigest()[:8]}"


def _systemd_quote(arg: str) -> str:
    arg = arg.replace("%", "%%")
    if arg and not any(c.isspace() or c in "\"'\\;$" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_units(home: Path, command: list[str], config: CycleConfig,
                 env: dict[str, str] | None = None) -> dict[str, str]:
    """File name -> content of one .service and one .timer per job (`env`: variables set for each job)."""
    units = {}
    environment = "".join(f"Environment={_systemd_quote(f'{k}={v}')}\n" for k, v in sorted((env or {}).items()))
    for job in jobs(config):
        name = f"{unit_prefix(home)}-{job.name}"
        exec_start = " ".join(_systemd_quote(a) for a in [*command, "cycle", "--only", job.steps])
        units[f"{name}.service"] = (
            f"[Unit]\nDescription=cl cycle ({job.name}: {job.steps}) for {home}\n\n"
            f"[Service]\nType=oneshot\n{environment}ExecStart={exec_start}\n"
        )
        units[f"{name}.timer"] = (
            f"[Unit]\nDescription=cl cycle ({job.name}) for {home}, cron '{job.cron}'\n\n"
            f"[Timer]\nOnCalendar={cron_to_oncalendar(job.cron)}\nPersistent=true\nUnit={name}.service\n\n"
            "[Install]\nWantedBy=timers.target\n"
        )
    return units


# --- crontab ---------------------------------------------------------------------------------------------
def _crontab_exe() -> str:
    exe = shutil.which("crontab")
    if exe is None:
        raise CLError("the 'crontab' command is not installed", "install cron, or use systemd timers with --systemd")
    return exe


def read_crontab() -> str:
    done = subprocess.run([_crontab_exe(), "-l"], capture_output=True, text=True)
    if done.returncode == 0:
        return done.stdout
    if "no crontab" in (done.stderr + done.stdout).lower():
        return ""
    raise CLError(f"'crontab -l' failed: {done.stderr.strip() or done.returncode}", "check that cron works for your "
                                                                                    "user")


def write_crontab(text: str) -> None:
    done = subprocess.run([_crontab_exe(), "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise CLError(f"'crontab -' refused the new crontab: {done.stderr.strip() or done.returncode}", "nothing was "
                                                                                                        "changed")


def install_cron(settings: Settings) -> str:
    """Install (or replace) this workspace's block; returns the block."""
    block = render_cron_block(settings.home, cl_command(settings.home), settings.cycle, job_secrets(settings))
    ensure_dir(cron_log(settings.home).parent)  # the redirect fails (and the job never runs) without it
    write_crontab(merge_crontab(read_crontab(), block, settings.home))
    return block


def remove_cron(settings: Settings) -> bool:
    current = read_crontab()
    rest, found = strip_block(current, settings.home)
    if found:
        write_crontab(rest)
    if not installed_units(settings.home):  # the timers may still need them
        remove_job_secrets(settings.home)
    return found


# --- systemd user timers ---------------------------------------------------------------------------------
def unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def _systemctl(*args: str) -> str | None:
    """Run `systemctl --user ...`; a warning when it is missing or fails (units on disk still count)."""
    exe = shutil.which("systemctl")
    if exe is None:
        return "systemctl not found: run 'systemctl --user daemon-reload' and enable the timers where systemd runs"
    done = subprocess.run([exe, "--user", *args], capture_output=True, text=True)
    if done.returncode != 0:
        return f"'systemctl --user {' '.join(args)}' failed: {done.stderr.strip() or done.returncode}"
    return None


def installed_units(home: Path) -> list[Path]:
    folder = unit_dir()
    return sorted(folder.glob(f"{unit_prefix(home)}-*")) if folder.is_dir() else []


def install_systemd(settings: Settings) -> tuple[list[Path], list[str]]:
    """Write the units, reload systemd and enable the timers. Returns (files, warnings)."""
    folder = unit_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    units = render_units(settings.home, cl_command(settings.home), settings.cycle, job_secrets(settings))
    for name, text in units.items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    timers = [p.name for p in written if p.suffix == ".timer"]
    warnings = [w for w in (_systemctl("daemon-reload"), _systemctl("enable", "--now", *timers)) if w]
    return written, warnings


def remove_systemd(settings: Settings) -> tuple[list[Path], list[str]]:
    units = installed_units(settings.home)
    timers = [p.name for p in units if p.suffix == ".timer"]
    warnings = [w for w in [_systemctl("disable", "--now", *timers) if timers else None] if w]
    for path in units:
        path.unlink()
    if not _cron_block_installed(settings.home):  # the crontab may still need them
        remove_job_secrets(settings.home)
    if units:
        warnings += [w for w in [_systemctl("daemon-reload")] if w]
    return units, warnings


def _cron_block_installed(home: Path) -> bool:
    try:
        return find_block(read_crontab(), home) is not None
    except CLError:
        return False


def show(settings: Settings) -> dict:
    """What is installed for this workspace: the crontab block and the unit files (with their OnCalendar)."""
    try:
        block = find_block(read_crontab(), settings.home)
        cron_error = None
    except CLError as exc:
        block, cron_error = None, exc.message
    units = {p.name: p.read_text(encoding="utf-8") for p in installed_units(settings.home)}
    return {"home": str(settings.home), "crontab": block, "crontab_error": cron_error, "systemd_units": units,
            "jobs": [j.describe() for j in jobs(settings.cycle)]}
