from rest_framework.routers import DefaultRouter

from editing.api.views import JobViewSet, ModelViewSet, TemplateViewSet

router = DefaultRouter()
router.register("templates", TemplateViewSet, basename="template")
router.register("jobs", JobViewSet, basename="job")
router.register("models", ModelViewSet, basename="model")

urlpatterns = router.urls
