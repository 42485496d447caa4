"""docker-compose.yml is valid for Debian's docker-compose (1.29) and keeps the promises the README makes."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compose(*args, env=None):
    return subprocess.run([shutil.which("docker-compose"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.compose
def test_compose_file_is_valid_and_durable(tmp_path):
    env = dict(os.environ, ISL_API_KEYS="radiology:" + "0" * 64, ATLAS_DIR=str(tmp_path))
    assert compose("config", "-q", env=env).returncode == 0
    config = compose("config", env=env).stdout
    assert "--appendonly" in config and "noeviction" in config
    assert "driver: nvidia" in config and "capabilities:" in config
    for service in ("redis:", "postgres:", "api:", "worker:", "flower:", "dicom-listener:"):
        assert f"  {service}" in config
    assert "ISL_DATABASE_URL: postgresql+psycopg://isl:isl@postgres:5432/isl" in config
    assert "postgres-data:/var/lib/postgresql/data" in config


@pytest.mark.compose
def test_compose_refuses_to_start_without_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ISL_API_KEYS"} | {"ATLAS_DIR": str(tmp_path)}
    out = compose("config", "-q", env=env)
    assert out.returncode != 0 and "ISL_API_KEYS" in out.stderr


def test_readme_points_to_the_settings_reference():
    """Every setting is listed in docs/settings.md, made from the settings classes (tests/worker/test_reference.py
    holds it to them); the README sends its reader there."""
    assert "[docs/settings.md](docs/settings.md)" in (ROOT / "README.md").read_text()
