"""Create the demo user and load the demo photos shipped in demo/photos as its templates."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand

from editing import imaging, services
from editing.models import Template

DEMO_PHOTOS = ("coffee.png", "astronaut.png", "chelsea.png", "rocket.jpg", "brick.png")


class Command(BaseCommand):
    help = "Create the 'demo' user (password 'demo' when DEBUG is on) and load the demo photos as its templates."

    def handle(self, *args, **options) -> None:
        user_model = get_user_model()
        user, created = user_model.objects.get_or_create(username="demo")
        if created:
            if settings.DEBUG:
                # A known password is only acceptable for local runs.
                user.set_password("demo")
                user.is_staff = True
                user.is_superuser = True
            else:
                user.set_unusable_password()
            user.save()
        photo_dir = Path(settings.BASE_DIR) / "demo" / "photos"
        loaded = 0
        for file_name in DEMO_PHOTOS:
            pixels = imaging.read_template(
                (photo_dir / file_name).read_bytes(),
                max_pixels=settings.EDITOR_MAX_PIXELS,
                max_bytes=settings.EDITOR_MAX_UPLOAD_BYTES,
            )
            if Template.objects.filter(owner=user, content_hash=services.content_hash(pixels)).exists():
                continue
            services.create_template(owner=user, name=Path(file_name).stem, image=pixels)
            loaded += 1
        self.stdout.write(f"Demo templates: {loaded} loaded, {len(DEMO_PHOTOS) - loaded} already present.")
