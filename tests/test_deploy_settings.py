"""Production settings: DEBUG off requires SECRET_KEY, and ALLOWED_HOSTS for the web server; `check --deploy` is clean."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PRINT_SETTINGS = (
    "import django; django.setup(); from django.conf import settings as s; "
    "print(s.DEBUG, s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, s.SECURE_SSL_REDIRECT, "
    "s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.CELERY_TASK_SOFT_TIME_LIMIT, "
    "s.CELERY_TASK_TIME_LIMIT)"
)


def production_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DEBUG", "SECRET_KEY", "ALLOWED_HOSTS")}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "editor_site.settings",
            "SECRET_KEY": secrets.token_urlsafe(64),
            "ALLOWED_HOSTS": "editor.example.com",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
            "EDITOR_VAR_DIR": str(tmp_path / "var"),
            "REDIS_URL": "redis://127.0.0.1:6379/15",
        }
    )
    env.update(overrides)
    return {key: value for key, value in env.items() if value != ""}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_check_deploy_is_clean(tmp_path):
    result = run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], production_env(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_production_defaults_are_hardened(tmp_path):
    result = run([sys.executable, "-c", PRINT_SETTINGS], production_env(tmp_path, EDITOR_JOB_HARD_TIME_LIMIT_S="600"))

    assert result.returncode == 0, result.stderr
    debug, session_secure, csrf_secure, ssl_redirect, hsts, subdomains, soft, hard = result.stdout.split()
    assert debug == "False"
    assert session_secure == "True"
    assert csrf_secure == "True"
    assert ssl_redirect == "True"
    assert int(hsts) >= 3600
    assert subdomains == "True"
    assert int(soft) < int(hard) == 600


def test_missing_secret_key_stops_startup(tmp_path):
    result = run([sys.executable, "manage.py", "check"], production_env(tmp_path, SECRET_KEY=""))

    assert result.returncode == 1
    assert "Configuration error: SECRET_KEY is not set" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_allowed_hosts_stops_web_server(tmp_path):
    # gunicorn imports editor_site.wsgi to start serving.
    result = run([sys.executable, "-c", "import editor_site.wsgi"], production_env(tmp_path, ALLOWED_HOSTS=""))

    assert result.returncode != 0
    assert "ALLOWED_HOSTS is not set" in result.stderr


def test_missing_allowed_hosts_fails_deploy_check(tmp_path):
    env = production_env(tmp_path, ALLOWED_HOSTS="")
    result = run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], env)

    assert result.returncode != 0
    assert "ALLOWED_HOSTS must not be empty" in result.stdout + result.stderr


def test_commands_run_without_allowed_hosts(tmp_path):
    # Workers and commands such as `edit` serve no HTTP, so only the web server needs ALLOWED_HOSTS.
    result = run([sys.executable, "manage.py", "check"], production_env(tmp_path, ALLOWED_HOSTS=""))

    assert result.returncode == 0, result.stdout + result.stderr


def test_soft_limit_above_hard_limit_stops_startup(tmp_path):
    env = production_env(tmp_path, EDITOR_JOB_HARD_TIME_LIMIT_S="60", EDITOR_JOB_SOFT_TIME_LIMIT_S="90")

    result = run([sys.executable, "manage.py", "check"], env)

    assert result.returncode != 0
    assert "EDITOR_JOB_SOFT_TIME_LIMIT_S=90 must be below" in result.stderr


def test_invalid_submit_rate_stops_startup(tmp_path):
    result = run([sys.executable, "manage.py", "check"], production_env(tmp_path, EDITOR_JOB_SUBMIT_RATE="lots"))

    assert result.returncode != 0
    assert "EDITOR_JOB_SUBMIT_RATE='lots' is invalid" in result.stderr


def test_invalid_model_settings_stop_startup(tmp_path):
    cases = {
        "EDITOR_MODELS": ("fill=unet:demo", "names family 'unet'"),
        "EDITOR_WORKER_MODELS": ("other", "EDITOR_WORKER_MODELS names ['other']"),
        "EDITOR_ROUTING": ("fastest", "EDITOR_ROUTING='fastest' must be 'bucket' or 'cost'"),
        "EDITOR_ROUTING_REFRESH_S": ("soon", "EDITOR_ROUTING_REFRESH_S must be a number of seconds"),
    }
    for name, (value, message) in cases.items():
        result = run([sys.executable, "manage.py", "check"], production_env(tmp_path, **{name: value}))

        assert result.returncode != 0, name
        assert message in result.stderr, result.stderr[-500:]
