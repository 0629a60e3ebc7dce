from django.urls import path
from rest_framework.routers import DefaultRouter

from editing.api.views import JobViewSet, ModelViewSet, TemplateViewSet, TokenView

router = DefaultRouter()
router.register("templates", TemplateViewSet, basename="template")
router.register("jobs", JobViewSet, basename="job")
router.register("models", ModelViewSet, basename="model")

urlpatterns = [path("token/", TokenView.as_view(), name="api-token"), *router.urls]
