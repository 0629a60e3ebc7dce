"""Settings of the editing service, read from environment variables with safe defaults.

Local runs use SQLite under ``var/`` and an embedded Redis started by ``make run``; production sets
``DATABASE_URL``, ``REDIS_URL``, ``SECRET_KEY`` and ``ALLOWED_HOSTS``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from django.utils.translation import gettext_lazy as _

from editor_site.env import env_bool, env_float_list, env_int, env_str
from editing.catalog import parse_models

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("EDITOR_VAR_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("DEBUG", False)

SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY to a long random string, or set DEBUG=1 for local use."
        )
    SECRET_KEY = "insecure-local-development-key-do-not-deploy"

# Only the web server needs ALLOWED_HOSTS. With DEBUG off, editor_site.wsgi and Django's runserver stop at start
# without it. Workers and management commands such as `edit` serve no HTTP, so they run without it.
ALLOWED_HOSTS = [h for h in env_str("ALLOWED_HOSTS", "127.0.0.1,localhost" if DEBUG else "").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in env_str("CSRF_TRUSTED_ORIGINS").split(",") if o]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    # Self-hosted Swagger UI and Redoc files, so the API docs page loads nothing from a CDN.
    "drf_spectacular_sidecar",
    "editing",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.locale.LocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "editor_site.urls"
WSGI_APPLICATION = "editor_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.template.context_processors.i18n",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0, minimum=0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A fresh checkout has no var/ yet, and SQLite does not create missing folders.
    Path(DATABASES["default"]["NAME"]).parent.mkdir(parents=True, exist_ok=True)
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    # Workers and the web server write one file, so writers wait for the lock. IMMEDIATE takes it at BEGIN,
    # because SQLite fails a read-then-write transaction at once. WAL lets readers go on during a write.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 30, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )
    # Tests run a real worker process, which cannot see an in-memory database; the process id keeps
    # concurrent test runs on one checkout apart.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / f"test-db-{os.getpid()}.sqlite3")}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en"
LANGUAGES = [("en", _("English")), ("ja", _("Japanese"))]
LOCALE_PATHS = [BASE_DIR / "locale"]
USE_I18N = True
TIME_ZONE = "UTC"
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
# Uploaded templates, masks and results. They are served only through permission-checked API views,
# never from a public media URL.
MEDIA_ROOT = Path(env_str("EDITOR_MEDIA_ROOT", str(VAR_DIR / "media"))).resolve()

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"

# Production hardening applies whenever DEBUG is off.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 3600, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = not DEBUG
SECURE_HSTS_PRELOAD = not DEBUG
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

REST_FRAMEWORK = {
    # Token first, so a request without credentials gets 401 with "WWW-Authenticate: Token".
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "editing.api.errors.exception_handler",
}
# Job submissions per user, as DRF rate syntax ("120/min", "10/s"); empty turns the limit off. Reads
# and status polling are not throttled.
EDITOR_JOB_SUBMIT_RATE = env_str("EDITOR_JOB_SUBMIT_RATE", "120/min") or None
# DRF reads the number and the first letter of the period (s, m, h or d).
if EDITOR_JOB_SUBMIT_RATE and not re.fullmatch(r"[1-9][0-9]*/[smhd][a-z]*", EDITOR_JOB_SUBMIT_RATE):
    raise ImproperlyConfigured(
        f"EDITOR_JOB_SUBMIT_RATE={EDITOR_JOB_SUBMIT_RATE!r} is invalid; use a count per period such as "
        "'120/min', '10/s' or '1000/day', or leave it empty for no limit."
    )
# Throttle counters live in the default cache. The local-memory default counts per web process; set
# CACHE_REDIS_URL so that all web processes share one count.
if env_str("CACHE_REDIS_URL"):
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": env_str("CACHE_REDIS_URL")}
    }

SPECTACULAR_SETTINGS = {
    "TITLE": "Mask-aware image editing API",
    "DESCRIPTION": "Upload templates, submit masked edit jobs, poll their status and download results.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Separate request and response components, so upload fields are `format: binary` and Swagger UI offers
    # a file picker for them.
    "COMPONENT_SPLIT_REQUEST": True,
    # Jobs and warm-ups share these choice sets; one schema name each.
    "ENUM_NAME_OVERRIDES": {
        "CacheVariantEnum": "editing.models.CacheVariant",
        "CacheTierEnum": "editing.models.CacheTier",
    },
}

# --- Celery (Redis broker). The database, not Celery, is the source of truth for job state.
from editor_site.broker import resolve_redis_url  # noqa: E402

REDIS_URL = resolve_redis_url(VAR_DIR)
CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A prefork child runs its worker_process_init receivers before it takes jobs: the cache tier
# reconciliation (workers/residency.py) imports torch, reads the disk tier and queries the database.
# Celery kills a child whose receivers take longer than this (4 s by default) and starts another.
CELERY_WORKER_PROC_ALIVE_TIMEOUT = 60
CELERY_TASK_DEFAULT_QUEUE = "edit.control"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
EDITOR_JOB_HARD_TIME_LIMIT_S = env_int("EDITOR_JOB_HARD_TIME_LIMIT_S", 1800, minimum=10)
# At the soft limit the task gets SoftTimeLimitExceeded and marks its job failed; at the hard limit
# the prefork pool kills the child process. The gap gives the soft handler time to write the row.
# Celery's prefork pool (5.x) starts the hard timer only when the soft one fires, so a hard limit
# below the soft one would never fire before the soft one: hence the check below.
EDITOR_JOB_SOFT_TIME_LIMIT_S = env_int(
    "EDITOR_JOB_SOFT_TIME_LIMIT_S", EDITOR_JOB_HARD_TIME_LIMIT_S - max(5, EDITOR_JOB_HARD_TIME_LIMIT_S // 20), minimum=1
)
if EDITOR_JOB_SOFT_TIME_LIMIT_S >= EDITOR_JOB_HARD_TIME_LIMIT_S:
    raise ImproperlyConfigured(
        f"EDITOR_JOB_SOFT_TIME_LIMIT_S={EDITOR_JOB_SOFT_TIME_LIMIT_S} must be below "
        f"EDITOR_JOB_HARD_TIME_LIMIT_S={EDITOR_JOB_HARD_TIME_LIMIT_S}; lower the soft limit."
    )
CELERY_TASK_TIME_LIMIT = EDITOR_JOB_HARD_TIME_LIMIT_S
CELERY_TASK_SOFT_TIME_LIMIT = EDITOR_JOB_SOFT_TIME_LIMIT_S
# Redis redelivers unacknowledged messages after the visibility timeout, so it must exceed the
# longest job or a running job would be delivered twice.
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {"visibility_timeout": EDITOR_JOB_HARD_TIME_LIMIT_S * 2}
# A prefix on every Redis key lets several stacks (or test runs) share one Redis server.
if env_str("EDITOR_BROKER_KEY_PREFIX"):
    CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = env_str("EDITOR_BROKER_KEY_PREFIX")
CELERY_TASK_ALWAYS_EAGER = False

# --- Editing service.
# Models served, as name=family:ref entries (families: flux, sd3, sdxl, sd2; ref: "demo", a local folder or a hub
# id). The first is the default for jobs that name none. EDITOR_MODEL alone sets the ref of a single Flux model.
EDITOR_MODEL = env_str("EDITOR_MODEL", "demo")
try:
    EDITOR_MODELS = parse_models(env_str("EDITOR_MODELS", f"flux=flux:{EDITOR_MODEL}"))
except ValueError as error:
    raise ImproperlyConfigured(str(error)) from None
# Names of the models this process's worker serves (default: all); its queues are those of these models.
EDITOR_WORKER_MODELS = [name.strip() for name in env_str("EDITOR_WORKER_MODELS").split(",") if name.strip()] or [
    spec.name for spec in EDITOR_MODELS
]
_unknown_worker_models = sorted(set(EDITOR_WORKER_MODELS) - {spec.name for spec in EDITOR_MODELS})
if _unknown_worker_models:
    raise ImproperlyConfigured(
        f"EDITOR_WORKER_MODELS names {_unknown_worker_models}, which EDITOR_MODELS does not list; "
        f"use names from {[spec.name for spec in EDITOR_MODELS]}."
    )
EDITOR_MAX_UPLOAD_BYTES = env_int("EDITOR_MAX_UPLOAD_BYTES", 25 * 1024 * 1024, minimum=1024)
EDITOR_MAX_PIXELS = env_int("EDITOR_MAX_PIXELS", 4096 * 4096, minimum=64 * 64)
EDITOR_MAX_PROMPT_CHARS = env_int("EDITOR_MAX_PROMPT_CHARS", 2000, minimum=1)
EDITOR_DEFAULT_STEPS = env_int("EDITOR_DEFAULT_STEPS", 20, minimum=1)
EDITOR_MAX_STEPS = env_int("EDITOR_MAX_STEPS", 100, minimum=1)
EDITOR_DEFAULT_SEED = env_int("EDITOR_DEFAULT_SEED", 0, minimum=0)
# Fraction of latent tokens touched by the mask -> queue. A job goes to the first bucket whose
# upper edge is >= its mask ratio; the last edge must be 1.0.
EDITOR_BUCKET_EDGES = env_float_list("EDITOR_BUCKET_EDGES", "0.10,0.25,0.50,1.0")
# A latent token covers 16x16 pixels (VAE factor 8, 2x2 patch packing). The mask is dilated by this
# many tokens so that content at the edge of the mask is regenerated too.
EDITOR_MASK_DILATION_TOKENS = env_int("EDITOR_MASK_DILATION_TOKENS", 1, minimum=0)
# Activation cache: "kv" stores attention keys and values (fastest), "hidden" stores the normalized
# hidden states entering each attention layer (half the bytes; K and V are recomputed).
EDITOR_CACHE_VARIANT = env_str("EDITOR_CACHE_VARIANT", "kv")
if EDITOR_CACHE_VARIANT not in ("kv", "hidden"):
    raise ImproperlyConfigured(f"EDITOR_CACHE_VARIANT={EDITOR_CACHE_VARIANT!r} must be 'kv' or 'hidden'.")
# Off: every job runs the stock pipeline on all tokens and no warm-up is queued (a baseline for benchmarks).
EDITOR_CACHE_ENABLED = env_bool("EDITOR_CACHE_ENABLED", True)
# Step-level batching: the most requests one engine step runs, and the most tokens it packs. Above 1 a
# worker runs that many job threads (Celery's threads pool) around one engine; 1 (the default) keeps the
# prefork pool, one job per process at a time, whose time limits and broker-restart recovery the fault
# tests cover (docs/reliability.md).
EDITOR_ENGINE_MAX_BATCH = env_int("EDITOR_ENGINE_MAX_BATCH", 1, minimum=1)
EDITOR_ENGINE_TOKEN_BUDGET = env_int("EDITOR_ENGINE_TOKEN_BUDGET", 16384, minimum=1)
# "bucket": queues by mask-ratio bucket. "cost": each job goes to the live worker predicted to finish it
# first, counting its queue, its cost model and whether it holds the template's cache.
EDITOR_ROUTING = env_str("EDITOR_ROUTING", "bucket")
if EDITOR_ROUTING not in ("bucket", "cost"):
    raise ImproperlyConfigured(f"EDITOR_ROUTING={EDITOR_ROUTING!r} must be 'bucket' or 'cost'.")
# The cost policy re-reads the workers' records from Redis at most this often (seconds); 0 reads every time.
try:
    EDITOR_ROUTING_REFRESH_S = float(env_str("EDITOR_ROUTING_REFRESH_S", "0.25"))
except ValueError:
    raise ImproperlyConfigured("EDITOR_ROUTING_REFRESH_S must be a number of seconds, such as 0.25.") from None
if not 0 <= EDITOR_ROUTING_REFRESH_S <= 60:
    raise ImproperlyConfigured(f"EDITOR_ROUTING_REFRESH_S={EDITOR_ROUTING_REFRESH_S} must be between 0 and 60.")
# Bearer token that lets a Prometheus scraper read /metrics without a staff session; empty disables it.
EDITOR_METRICS_TOKEN = env_str("EDITOR_METRICS_TOKEN")
EDITOR_WARMUP_ON_CREATE = env_bool("EDITOR_WARMUP_ON_CREATE", True) and EDITOR_CACHE_ENABLED
# A running job that has written no progress for this long is taken over by the next worker that
# receives its message. It must exceed the slowest single phase (model load, one step, decode).
EDITOR_STALE_RUNNING_S = env_int("EDITOR_STALE_RUNNING_S", 600, minimum=10)
# The reconciler re-sends the message of a job or warm-up queued for longer than this without a
# message in the broker. A Redis key with this expiry limits re-sends to one per interval.
EDITOR_REQUEUE_AFTER_S = env_int("EDITOR_REQUEUE_AFTER_S", 60, minimum=1)
# A warm-up that arrives while edit jobs of its model are queued goes back to its queue for this many
# seconds, so the jobs run first, until it has waited EDITOR_WARMUP_MAX_DEFER_S since it was requested.
EDITOR_WARMUP_DEFER_S = env_int("EDITOR_WARMUP_DEFER_S", 10, minimum=1)
EDITOR_WARMUP_MAX_DEFER_S = env_int("EDITOR_WARMUP_MAX_DEFER_S", 600, minimum=0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
