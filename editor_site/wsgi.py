import os

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "editor_site.settings")
application = get_wsgi_application()

# With DEBUG off and no ALLOWED_HOSTS, Django rejects every request with 400, so the server stops at start.
if not settings.DEBUG and not settings.ALLOWED_HOSTS:
    raise ImproperlyConfigured(
        "ALLOWED_HOSTS is not set. Set ALLOWED_HOSTS to the comma-separated host names the service is "
        "reached by, or set DEBUG=1 for local use."
    )
