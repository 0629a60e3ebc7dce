"""Receivers that delete the stored files of a deleted template or job once the deletion has committed.

Receivers of `post_delete` run for every row that a cascade removes, so deleting a template (API, admin or
shell) removes its image and the masks and results of its jobs.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models.fields.files import FieldFile
from django.db.models.signals import post_delete
from django.dispatch import receiver

from editing.models import EditJob, Template

logger = logging.getLogger(__name__)


def delete_after_commit(*files: FieldFile) -> None:
    """Delete the stored files of a deleted row after the transaction commits; a rollback keeps them."""
    for field_file in files:
        if not field_file:
            continue
        storage, name = field_file.storage, field_file.name

        def delete(storage=storage, name=name) -> None:
            try:
                storage.delete(name)
            except OSError as error:
                logger.warning("could not delete stored file %s of a deleted row: %s", name, error)

        transaction.on_commit(delete)


@receiver(post_delete, sender=Template, dispatch_uid="editing.template_files")
def delete_template_files(sender, instance: Template, **kwargs) -> None:
    delete_after_commit(instance.image)


@receiver(post_delete, sender=EditJob, dispatch_uid="editing.job_files")
def delete_job_files(sender, instance: EditJob, **kwargs) -> None:
    delete_after_commit(instance.mask, instance.result)
