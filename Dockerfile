FROM python:3.11-slim
WORKDIR /srv/app
COPY pyproject.toml README.md ./
COPY editor_site editor_site
COPY editing editing
COPY workers workers
COPY cache cache
COPY bench bench
COPY demo demo
COPY locale locale
COPY manage.py ./
RUN pip install --no-cache-dir "torch>=2.4" -e . gunicorn
ENV PYTHONUNBUFFERED=1
EXPOSE 8000
