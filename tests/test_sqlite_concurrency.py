"""Concurrent writers on the default SQLite database: template uploads from several request threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from django.db import connection, connections

from editing import services
from editing.models import Template

pytestmark = pytest.mark.skipif(connection.vendor != "sqlite", reason="checks the SQLite settings")

THREADS = 6
UPLOADS_PER_THREAD = 8


@pytest.mark.django_db(transaction=True)
def test_parallel_uploads_all_succeed_with_warmups(make_user, media_root, settings):
    settings.EDITOR_WARMUP_ON_CREATE = True
    settings.CELERY_BROKER_URL = ""
    owner = make_user("alice")
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def upload(thread: int) -> None:
        try:
            start.wait()
            for index in range(UPLOADS_PER_THREAD):
                image = np.full((32, 48, 3), (thread * 40 + index) % 256, dtype=np.uint8)
                image[0, 0] = (thread, index, 7)
                services.create_template(owner=owner, name=f"t{thread}-{index}", image=image)
        except BaseException as error:  # noqa: BLE001 - collected for the assert below
            errors.append(error)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=upload, args=(number,)) for number in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    templates = Template.objects.filter(owner=owner)
    assert templates.count() == THREADS * UPLOADS_PER_THREAD
    assert all(template.warmups.count() == 1 for template in templates)
