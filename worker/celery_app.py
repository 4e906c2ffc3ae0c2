"""The application instance for ``celery -A worker.celery_app``.

This is the process entry point, so reading the environment here (once) is deliberate.
"""

from __future__ import annotations

from tasks.settings import Settings
from worker.app import create_app

app = create_app(Settings.from_env())
