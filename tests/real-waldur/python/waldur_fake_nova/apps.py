from django.apps import AppConfig


class FakeNovaConfig(AppConfig):
    name = "waldur_fake_nova"
    verbose_name = "Fake Nova (real-Waldur test tier only)"

    def ready(self):
        from . import fake

        fake.install()
