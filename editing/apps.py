from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class EditingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "editing"
    verbose_name = _("Editing")

    def ready(self) -> None:
        # Connects the receivers that delete stored files with their rows.
        from editing import signals  # noqa: F401
