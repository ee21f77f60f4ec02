"""Settings of the example project: one app (notes), sqlite in the state directory.

Under systemd, ``StateDirectory=django-example`` (``state-directory`` in
pyproject.toml) makes /var/lib/django-example, writable by the workers (also
under ``DynamicUser=``), and systemd puts its path in ``$STATE_DIRECTORY``.
Run by hand, the database goes beside this project.
"""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
# $STATE_DIRECTORY may list several directories, separated by ':'; ours is the first.
STATE_DIR = Path(os.environ.get("STATE_DIRECTORY", str(BASE_DIR)).split(":")[0])

# A real deployment reads its key from an EnvironmentFile= (clusterkit --env-file).
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")

INSTALLED_APPS = ["notes"]
MIDDLEWARE = ["notes.middleware.who_answered"]
ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": STATE_DIR / "db.sqlite3",
        # Several workers write to one file: wait for sqlite's lock instead of failing.
        "OPTIONS": {"timeout": 20},
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"notes": {"handlers": ["stderr"], "level": "INFO"}},
}
