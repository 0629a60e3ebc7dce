"""The Celery application; configuration comes from Django settings (``CELERY_*``)."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "editor_site.settings")
# Idle OpenMP threads sleep instead of spinning, so a worker does not starve the other processes on
# a machine with few cores. The variable must be set before torch loads in the pool processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

app = Celery("editor_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])
