"""Serve the Django project with waitress, on the socket systemd passed.

systemd runs this file in every worker (``exec`` in pyproject.toml). Before
serving, each worker applies the migrations under a file lock in the state
directory: when several workers start at once, one migrates and the others
wait, then find nothing left to do. No ExecStartPre= (nothing runs as root).
Run directly (``python serve.py``) it binds port 3003 itself.
"""

from __future__ import annotations

import fcntl
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

import django  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

from clusterkit.serve import serve_wsgi  # noqa: E402


def migrate() -> None:
    """``manage.py migrate``, one worker at a time (the lock is released at close)."""
    with open(settings.STATE_DIR / "migrate.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        call_command("migrate", interactive=False, verbosity=0)


def main() -> None:
    django.setup()
    migrate()
    from project.wsgi import application

    print(f"django-example: database {settings.DATABASES['default']['NAME']} ready", flush=True)
    serve_wsgi(application, 3003)


if __name__ == "__main__":
    main()
