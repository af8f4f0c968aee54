"""One frozen settings object: workspace paths and every knob.

Precedence: CLI flags > environment (`CL_<SECTION>_<FIELD>`, plus the short names below) > `cl.toml` in the
workspace > defaults. Unknown keys and wrong types are rejected with a message that names them, and every section
checks its own ranges when it is built (`__post_init__`), so consumers never re-check a knob.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .config_sections import (
    BUNDLED_MODEL,
    DEFAULT_KNOWLEDGE_PATTERNS,
    OBJECTIVES,
    RANGE_HINT,
    REHEARSAL_MODES,
    SECTIONS,
    TRAIN_HINT,
    ABConfig,
    ChatConfig,
    CurateConfig,
    CycleConfig,
    DriftConfig,
    EvalConfig,
    HealthConfig,
    KnowledgeConfig,
    ModelConfig,
    PrivacyConfig,
    ServeConfig,
    TrainConfig,
    target_modules,
)
from .errors import ConfigError

# What the package ships beside its code: the everyday eval sets, rehearsal prompts, and the bundled model's answers
# and distributions on the defaults (so a new workspace does not compute them first).
SHIPPED_DATA = Path(__file__).parents[1] / "data"

__all__ = [
    "ABConfig", "BUNDLED_MODEL", "ChatConfig", "CurateConfig", "CycleConfig", "DEFAULT_KNOWLEDGE_PATTERNS",
    "DriftConfig", "ENV_ALIASES", "EvalConfig", "HealthConfig", "KnowledgeConfig", "ModelConfig", "OBJECTIVES",
    "PrivacyConfig", "RANGE_HINT", "REHEARSAL_MODES", "SECTIONS", "ServeConfig", "Settings", "TRAIN_HINT",
    "TrainConfig", "describe", "load_settings", "target_modules",
]

# Short environment names that users expect, mapped to section.field.
ENV_ALIASES = {"CL_BASE_MODEL": ("model", "base_model"), "CL_MODEL_CACHE": ("model", "cache_dir")}


@dataclass(frozen=True)
class Settings:
    home: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    ab: ABConfig = field(default_factory=ABConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    cycle: CycleConfig = field(default_factory=CycleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    debug: bool = False

    # --- workspace layout -------------------------------------------------------------------------
    @property
    def raw_log(self) -> Path:
        return self.home / "data" / "ingestion" / "raw_interactions.jsonl"

    @property
    def curated_dir(self) -> Path:
        return self.home / "data" / "curated"

    @property
    def knowledge_file(self) -> Path:
        return self.home / "knowledge" / "knowledge.json"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def learning_events(self) -> Path:
        return self.logs_dir / "learning_events.jsonl"

    @property
    def generation_metrics(self) -> Path:
        return self.logs_dir / "generation_metrics.jsonl"

    @property
    def feedback_metrics(self) -> Path:
        return self.logs_dir / "feedback_metrics.json"

    @property
    def eval_dir(self) -> Path:
        return self.home / "eval"

    @property
    def adapters_dir(self) -> Path:
        return self.home / "adapters"

    @property
    def registry_file(self) -> Path:
        return self.adapters_dir / "registry.json"

    @property
    def salt_file(self) -> Path:
        return self.home / ".cl" / "user_hash_salt"

    @property
    def lock_dir(self) -> Path:
        return self.home / ".cl" / "locks"

    @property
    def model_cache(self) -> Path:
        """Converted base models and what is derived from them alone (rehearsal answers and reference, the base's
        answers to the shipped everyday set): nothing from users, so one cache serves every workspace."""
        if self.model.cache_dir:
            return Path(self.model.cache_dir).expanduser()
        root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(root).expanduser() / "cl"

    def resolve_in_home(self, relative: str | Path) -> Path:
        """A path named in the configuration, confined to the workspace (`../` or outside paths are refused).

        Files given explicitly on the command line (`--eval-file`, `cl ingest FILE`) are inputs and may live
        anywhere."""
        path = Path(relative).expanduser()
        resolved = (path if path.is_absolute() else self.home / path).resolve()
        if not resolved.is_relative_to(self.home.resolve()):
            raise ConfigError(
                f"configured path '{relative}' points outside the workspace {self.home}",
                "use a path inside the workspace, or pass the file on the command line (e.g. --eval-file)",
            )
        return resolved

    def as_dict(self) -> dict:
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["home"] = str(self.home)
        return out


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check or convert one value to the declared type; strings from the environment are parsed."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
            return value.lower() in {"1", "true", "yes", "on"}
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
    raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}", "fix the value in cl.toml or the environment")


def _section_overrides(section: str, values: dict, origin: str) -> dict:
    cls = SECTIONS[section]
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"{origin}: unknown setting '{section}.{key}'",
                f"known settings in [{section}]: {', '.join(sorted(known))}",
            )
        out[key] = _coerce(value, hints[key], f"{origin}: {section}.{key}")
    return out


def _read_toml(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})", "fix or delete the file") from None
    for section, values in doc.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section [{section}]", f"known sections: {', '.join(SECTIONS)}")
    return doc


def _env_overrides(env: dict[str, str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for name, (section, key) in ENV_ALIASES.items():
        if env.get(name):
            out.setdefault(section, {})[key] = env[name]
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            name = f"CL_{section}_{f.name}".upper()
            if name in env:
                out.setdefault(section, {})[f.name] = env[name]
    return out


def load_settings(
    home: str | Path | None = None,
    overrides: dict[str, dict] | None = None,
    env: dict[str, str] | None = None,
    debug: bool = False,
) -> Settings:
    """Build the settings once: flags (`overrides`, by section) > env > cl.toml > defaults."""
    env = dict(os.environ) if env is None else env
    root = Path(home or env.get("CL_HOME") or ".").expanduser().resolve()
    layers = [
        (_read_toml(root / "cl.toml"), str(root / "cl.toml")),
        (_env_overrides(env), "environment"),
        ({k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in (overrides or {}).items()}, "option"),
    ]
    merged: dict[str, dict] = {name: {} for name in SECTIONS}
    for values_by_section, origin in layers:
        for section, values in values_by_section.items():
            merged[section].update(_section_overrides(section, values, origin))
    # Built once from all layers, so a range check sees the final values (not a half-applied mix of layers).
    sections = {name: cls(**merged[name]) for name, cls in SECTIONS.items()}
    return Settings(home=root, debug=debug, **sections)


def describe(settings: Settings) -> list[tuple[str, str, str]]:
    """(key, value, help) rows for `cl config`."""
    rows = [("home", str(settings.home), "Workspace root (--home / CL_HOME)")]
    for section, cls in SECTIONS.items():
        current = getattr(settings, section)
        for f in fields(cls):
            rows.append((f"{section}.{f.name}", repr(getattr(current, f.name)), f.metadata.get("help", "")))
    return rows
