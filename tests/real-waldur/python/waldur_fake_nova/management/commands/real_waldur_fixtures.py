"""Loads the real-Waldur test tier's fixtures into an empty (migrated) database and prints
them as JSON: users with fixed API tokens, one customer, one project, an OpenStack service
setting, and three tenants (two OK, one ERRED) whose backend ids the fake Nova knows.

    waldur real_waldur_fixtures            (run by `scripts/real-waldur up`)

Tokens and UUIDs are fixed (derived from names), so a failing test's output can be compared
across runs. Tokens never expire (token_lifetime None).
"""

import hashlib
import json
import uuid

from django.core.management.base import BaseCommand
from django.db import transaction
from rest_framework.authtoken.models import Token

from waldur_core.core.models import User
from waldur_core.permissions.fixtures import CustomerRole, ProjectRole
from waldur_core.structure.models import Customer, Project, ServiceSettings
from waldur_openstack.models import Tenant

NAMESPACE = uuid.UUID("6c0d5f2e-7a53-4b8e-9a39-3f6f1c1c0a11")

# role -> (username, is_staff)
USERS = {
    "staff": ("rw-staff", True),
    "project_admin": ("rw-project-admin", False),
    "owner": ("rw-owner", False),
    "member": ("rw-member", False),
    "norole": ("rw-norole", False),
}
TENANTS = {
    # key -> (name, backend id, state)
    "ok1": ("rw-tenant-ok1", "fake-tenant-ok1", Tenant.States.OK),
    "ok2": ("rw-tenant-ok2", "fake-tenant-ok2", Tenant.States.OK),
    "erred": ("rw-tenant-erred", "fake-tenant-erred", Tenant.States.ERRED),
}


def fixed_uuid(name):
    return uuid.uuid5(NAMESPACE, name)


def fixed_token(role):
    return hashlib.sha1(f"real-waldur-token-{role}".encode()).hexdigest()  # noqa: S324


class Command(BaseCommand):
    help = "Loads the real-Waldur test tier's fixtures and prints them as JSON."

    @transaction.atomic
    def handle(self, *args, **options):
        users, tokens = {}, {}
        for role, (username, is_staff) in USERS.items():
            user = User.objects.create_user(
                username=username,
                password=None,
                email=f"{username}@example.invalid",
                is_staff=is_staff,
                uuid=fixed_uuid(username),
            )
            # Set after creation: a post_save handler gives new users the default lifetime.
            User.objects.filter(pk=user.pk).update(token_lifetime=None)
            users[role] = user
            # Waldur makes a random token for a new user: replace it by the fixed one.
            Token.objects.filter(user=user).delete()
            tokens[role] = Token.objects.create(user=user, key=fixed_token(role)).key

        customer = Customer.objects.create(
            name="rw-customer", abbreviation="rwc", uuid=fixed_uuid("rw-customer")
        )
        project = Project.objects.create(
            customer=customer, name="rw-project", uuid=fixed_uuid("rw-project")
        )
        customer.add_user(users["owner"], CustomerRole.OWNER)
        project.add_user(users["project_admin"], ProjectRole.ADMIN)
        project.add_user(users["member"], ProjectRole.MEMBER)

        settings = ServiceSettings.objects.create(
            name="rw-openstack",
            type="OpenStack",
            customer=customer,
            shared=False,
            state=ServiceSettings.States.OK,
            backend_url="http://fake-keystone.invalid:5000/v3",
            username="admin",
            password="unused",  # noqa: S106
            domain="default",
            options={"tenant_name": "admin", "external_network_id": "fake-ext-net"},
            uuid=fixed_uuid("rw-openstack"),
        )

        tenants = {}
        for key, (name, backend_id, state) in TENANTS.items():
            tenant = Tenant.objects.create(
                name=name,
                service_settings=settings,
                project=project,
                backend_id=backend_id,
                state=state,
                user_username=f"{name}-user",
                user_password="unused",  # noqa: S106
                uuid=fixed_uuid(name),
            )
            if state == Tenant.States.ERRED:
                tenant.error_message = "Made ERRED by the real-Waldur fixtures."
                tenant.save(update_fields=["error_message"])
            tenants[key] = {"uuid": tenant.uuid.hex, "backend_id": backend_id, "name": name}

        self.stdout.write(
            json.dumps(
                {
                    "tokens": tokens,
                    "users": {r: {"username": u.username, "uuid": u.uuid.hex} for r, u in users.items()},
                    "customer": {"uuid": customer.uuid.hex, "name": customer.name},
                    "project": {"uuid": project.uuid.hex, "name": project.name},
                    "service_settings": {"uuid": settings.uuid.hex, "name": settings.name},
                    "tenants": tenants,
                },
                indent=1,
            )
        )
