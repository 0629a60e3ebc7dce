from rest_framework.routers import DefaultRouter

from editing.api.views import JobViewSet, TemplateViewSet

router = DefaultRouter()
router.register("templates", TemplateViewSet, basename="template")
router.register("jobs", JobViewSet, basename="job")

urlpatterns = router.urls
