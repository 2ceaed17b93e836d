"""Django settings of the real-Waldur test tier (scripts/real-waldur sets the environment).

Waldur's own base settings, with: PostgreSQL on loopback (the harness's own server and port),
Django's database cache instead of Redis, Celery over kombu's filesystem broker with a
file result backend (the worker and the web server share REAL_WALDUR_STATE), and the fake
Nova app (waldur_fake_nova) installed. Test-only: never use it for anything else.
"""

import os

from waldur_core.server.base_settings import *  # noqa: F403

STATE = os.environ["REAL_WALDUR_STATE"]

SECRET_KEY = "real-waldur-test-tier-only"  # noqa: S105 (test only)
DEBUG = False
ALLOWED_HOSTS = ["*"]
MEDIA_ROOT = os.path.join(STATE, "media") + "/"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": "127.0.0.1",
        "PORT": os.environ.get("REAL_WALDUR_DB_PORT", "5432"),
        "NAME": os.environ.get("REAL_WALDUR_DB_NAME", "waldur"),
        "USER": os.environ.get("REAL_WALDUR_DB_USER", "waldur"),
        "PASSWORD": "",
    }
}

# `waldur createcachetable` makes this table (before `waldur migrate`).
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": "real_waldur_cache",
    }
}

_broker = os.path.join(STATE, "broker")
for _d in ("queue", "processed", "control"):
    os.makedirs(os.path.join(_broker, _d), exist_ok=True)
os.makedirs(os.path.join(STATE, "results"), exist_ok=True)

CELERY_BROKER_URL = "filesystem://"
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Producers and consumers use one folder: a message written "out" is read "in".
    "data_folder_in": os.path.join(_broker, "queue"),
    "data_folder_out": os.path.join(_broker, "queue"),
    "processed_folder": os.path.join(_broker, "processed"),
    "store_processed": False,
    "control_folder": os.path.join(_broker, "control"),
}
CELERY_RESULT_BACKEND = "file://" + os.path.join(STATE, "results")
# No monitor listens to events; the filesystem broker's fanout is not worth the traffic.
CELERY_SEND_EVENTS = False
CELERY_TASK_ALWAYS_EAGER = False

INSTALLED_APPS += ("waldur_fake_nova",)  # noqa: F405

# The fake Nova's control endpoints sit beside Waldur's own routes.
ROOT_URLCONF = "waldur_fake_nova.urls"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
