"""Receivers that delete the stored files and cache entries of a deleted template or job once the deletion
has committed.

Receivers of `pre_delete` and `post_delete` run for every row that a cascade removes, so deleting a
template (API, admin or shell) removes its image, the masks and results of its jobs, and the workers'
cache entries that no other template's warm-up vouches for.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.db.models.fields.files import FieldFile
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver

from editing import warmups
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


@receiver(pre_delete, sender=Template, dispatch_uid="editing.template_cache_entries")
def release_template_cache_entries(sender, instance: Template, **kwargs) -> None:
    """Send the workers the template's cache keys that no warm-up vouches for once the deletion commits."""
    # Read before the cascade deletes the warm-ups that recorded the keys.
    keys = warmups.cache_keys_of(instance)
    if keys:
        transaction.on_commit(lambda: warmups.release_unvouched_entries(keys))


@receiver(post_delete, sender=EditJob, dispatch_uid="editing.job_files")
def delete_job_files(sender, instance: EditJob, **kwargs) -> None:
    delete_after_commit(instance.mask, instance.result)
