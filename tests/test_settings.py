"""Settings validate themselves, own their list defaults, and secrets come from one place."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from continuous_learning import cli
from continuous_learning.core.errors import ConfigError
from continuous_learning.core.settings import SECTIONS, PrivacyConfig, ServeConfig, load_settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_builds_with_its_defaults():
    for cls in SECTIONS.values():
        cls()


def test_list_defaults_are_never_shared():
    first, second = PrivacyConfig(), PrivacyConfig()
    assert first.entities == second.entities and first.entities is not second.entities
    first.entities.append("MUTATED")
    assert "MUTATED" not in PrivacyConfig().entities
    assert ServeConfig().allowed_hosts is not ServeConfig().allowed_hosts


@pytest.mark.parametrize("env, message", [
    ({"CL_SERVE_QUEUE_SIZE": "0"}, "serve.queue_size must be at least 1, got 0"),
    ({"CL_AB_TRAFFIC": "1.5"}, "ab.traffic must be between 0 and 1 (exclusive), got 1.5"),
    ({"CL_DRIFT_PSI_WARN": "0.3"}, "drift.psi_alert must be >= drift.psi_warn (0.3), got 0.25"),
    ({"CL_PRIVACY_FLAG_THRESHOLD": "0.9"}, "privacy.flag_threshold must be in [0, privacy.score_threshold (0.35)]"),
    ({"CL_CHAT_TOP_P": "0"}, "chat.top_p must be in (0, 1], got 0.0"),
])
def test_out_of_range_values_are_refused_when_settings_are_built(tmp_path, env, message):
    with pytest.raises(ConfigError, match="must be") as caught:
        load_settings(home=tmp_path, env=env)
    assert message in caught.value.message and "cl.toml" in caught.value.hint


def test_layers_are_checked_together_not_one_by_one(tmp_path):
    (tmp_path / "cl.toml").write_text("[drift]\npsi_warn = 0.3\n")  # above the default alert threshold alone...
    settings = load_settings(home=tmp_path, env={"CL_DRIFT_PSI_ALERT": "0.5"})  # ...fine with the env's alert
    assert (settings.drift.psi_warn, settings.drift.psi_alert) == (0.3, 0.5)


def test_replace_checks_too(tmp_path):
    settings = load_settings(home=tmp_path, env={})
    with pytest.raises(ConfigError, match="serve.max_tokens"):
        dataclasses.replace(settings.serve, max_tokens=0)


def test_cli_reports_a_bad_setting_in_one_line(tmp_path):
    (tmp_path / "cl.toml").write_text("[health]\ndegradation_factor = 2.0\n")
    result = CliRunner().invoke(cli.app, ["--home", str(tmp_path), "status"])
    assert result.exit_code == 2
    assert "health.degradation_factor must be in (0, 1], got 2.0" in result.output
    assert "Traceback" not in result.output


def test_train_section_refuses_bad_values_when_built_naming_every_one(tmp_path):
    (tmp_path / "cl.toml").write_text('[train]\nlora_r = 0\nobjective = "orpo"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(home=tmp_path, env={"CL_TRAIN_LEARNING_RATE": "-1"})
    assert caught.value.message == ("train.lora_r must be >= 1 (got 0); train.learning_rate must be a positive number "
                                    "(got -1.0); train.objective must be one of auto, sft, kto, dpo (got 'orpo')")
    assert caught.value.hint == "change the flag, the [train] section of cl.toml or the CL_TRAIN_* variable"
    with pytest.raises(ConfigError, match="train.target_modules is empty"):
        dataclasses.replace(load_settings(home=tmp_path / "x", env={}).train, target_modules=" , ")


def test_cli_reports_a_bad_train_flag_in_one_line(tmp_path):
    result = CliRunner().invoke(cli.app, ["--home", str(tmp_path), "train", "--lr", "-1"])
    assert result.exit_code == ConfigError.exit_code
    assert "train.learning_rate must be a positive number (got -1.0)" in result.output
    assert "Traceback" not in result.output


def test_importing_the_model_runtime_leaves_the_environment_alone():
    code = ("import os; before = dict(os.environ); import continuous_learning.chat.models as m\n"
            "assert dict(os.environ) == before, 'import changed os.environ'\n"
            "os.environ.pop('HF_HUB_OFFLINE', None); m.offline_hub(); print(os.environ['HF_HUB_OFFLINE'])")
    env = {k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.strip() == "1"


SECRET_NAMES = {"CL_USER_HASH_SALT", "CL_USER_HASH_SALT_FILE", "CL_ENCRYPTION_KEY", "CL_ENCRYPTION_KEY_FILE",
                "CL_ADMIN_TOKEN"}


def test_secret_variables_are_named_in_one_module_only():
    named_in = set()
    for path in (ROOT / "continuous_learning").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in SECRET_NAMES:
                named_in.add(path.relative_to(ROOT).as_posix())
    assert named_in == {"continuous_learning/storage/keys.py"}
