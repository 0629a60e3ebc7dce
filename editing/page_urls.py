from django.urls import path

from editing import pages

urlpatterns = [
    path("", pages.editor, name="editor"),
    path("history/", pages.history, name="history"),
    path("jobs/<uuid:job_id>/mask.png", pages.job_mask, name="job-mask"),
]
