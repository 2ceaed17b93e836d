from django.urls import include, path

from . import views

urlpatterns = [
    path("fake-nova/", include(views.urlpatterns)),
    path("", include("waldur_core.server.urls")),
]
