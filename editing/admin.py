from django.contrib import admin

from editing.models import EditJob, Template


@admin.register(Template)
class TemplateAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "owner", "width", "height", "use_count", "created_at"]
    list_filter = ["owner"]
    search_fields = ["name", "content_hash"]
    readonly_fields = ["width", "height", "content_hash", "use_count", "created_at", "updated_at"]


@admin.register(EditJob)
class EditJobAdmin(admin.ModelAdmin):
    list_display = ["id", "owner", "template", "status", "progress", "mask_ratio", "bucket", "created_at"]
    list_filter = ["status", "bucket", "template"]
    search_fields = ["id", "prompt"]
    readonly_fields = [
        "status", "progress", "mask_ratio", "bucket", "queue_name", "timings", "result", "error",
        "worker", "attempts", "created_at", "started_at", "finished_at", "updated_at",
    ]
