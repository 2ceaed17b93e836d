"""Test-only HTTP control of the fake Nova, under /fake-nova/ (no authentication: this app
is only ever installed by the real-Waldur test tier's settings).

    GET    /fake-nova/state/                  the whole state (groups, pending failures, calls)
    POST   /fake-nova/fail/                   {"operation": "create", "count": 2, "code": 500}
                                              the next `count` calls of that operation fail;
                                              count 0 clears it
    POST   /fake-nova/reset/                  no groups, no failures, no calls
    POST   /fake-nova/groups/                 {"tenant": BACKEND_ID, "name": .., "policy": ..}
                                              a group made in Nova behind Waldur's back
    DELETE /fake-nova/groups/<id>/            a group removed in Nova behind Waldur's back
    POST   /fake-nova/tenants/<backend_id>/recover/
                                              what Waldur's periodic background pull does to
                                              an Erred tenant when it succeeds (no beat runs
                                              here, and a staff tenant `pull` needs the parts
                                              of OpenStack that are not faked): Erred -> OK,
                                              error_message cleared

The same file can be changed without the web server: `scripts/real-waldur nova-fail`, or
`python -m waldur_fake_nova.state`.
"""

import json
import uuid

from django.http import HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from . import state as fake_state
from .fake import POLICIES


def _body(request):
    try:
        return json.loads(request.body or b"{}"), None
    except ValueError as e:
        return None, JsonResponse({"detail": f"bad JSON: {e}"}, status=400)


def show(request):
    with fake_state.locked(write=False) as state:
        return JsonResponse(state)


@csrf_exempt
def fail(request):
    if request.method != "POST":
        return JsonResponse({"detail": "POST only"}, status=405)
    body, error = _body(request)
    if error:
        return error
    try:
        pending = fake_state.set_failure(
            body.get("operation"), int(body.get("count", 1)), int(body.get("code", 500))
        )
    except (TypeError, ValueError) as e:
        return JsonResponse({"detail": str(e)}, status=400)
    return JsonResponse({"fail": pending})


@csrf_exempt
def reset(request):
    if request.method != "POST":
        return JsonResponse({"detail": "POST only"}, status=405)
    fake_state.reset()
    return JsonResponse({"status": "reset"})


@csrf_exempt
def groups(request):
    if request.method != "POST":
        return JsonResponse({"detail": "POST only"}, status=405)
    body, error = _body(request)
    if error:
        return error
    policy = body.get("policy", "affinity")
    if not body.get("tenant") or policy not in POLICIES:
        return JsonResponse(
            {"detail": f"need tenant (backend id) and a policy of {POLICIES}"}, status=400
        )
    group = {
        "id": body.get("id") or str(uuid.uuid4()),
        "name": body.get("name", ""),
        "policies": [policy],
        "members": list(body.get("members", [])),
        "metadata": {},
        "project_id": body["tenant"],
        "user_id": "fake-nova-user",
    }
    with fake_state.locked() as state:
        state["groups"][group["id"]] = group
    return JsonResponse(group, status=201)


@csrf_exempt
def group(request, group_id):
    if request.method != "DELETE":
        return JsonResponse({"detail": "DELETE only"}, status=405)
    with fake_state.locked() as state:
        if state["groups"].pop(group_id, None) is None:
            return JsonResponse({"detail": "no such group"}, status=404)
    return HttpResponse(status=204)


@csrf_exempt
def recover_tenant(request, backend_id):
    # Waldur's code, imported here: this module's other views work without Django apps ready.
    from waldur_openstack.models import Tenant

    if request.method != "POST":
        return JsonResponse({"detail": "POST only"}, status=405)
    tenant = Tenant.objects.filter(backend_id=backend_id).first()
    if tenant is None:
        return JsonResponse({"detail": "no tenant with that backend id"}, status=404)
    # As waldur_core.structure.tasks.BackgroundPullTask.on_pull_success.
    if tenant.state == Tenant.States.ERRED:
        tenant.recover()
        tenant.error_message = ""
        tenant.save(update_fields=["state", "error_message"])
    return JsonResponse({"uuid": tenant.uuid.hex, "state": tenant.get_state_display()})


@csrf_exempt
def instances(request):
    """An Instance row linked to a server group, as a VM created in Waldur would leave (this
    fake makes no VMs): Waldur lists it in the group's `instances`."""
    from waldur_openstack.models import Instance, ServerGroup

    if request.method != "POST":
        return JsonResponse({"detail": "POST only"}, status=405)
    body, error = _body(request)
    if error:
        return error
    group = ServerGroup.objects.filter(uuid=body.get("group_uuid", "")).first()
    if group is None:
        return JsonResponse({"detail": "no such server group"}, status=404)
    instance = Instance.objects.create(
        name=body.get("name", "vm"),
        backend_id=body.get("backend_id") or str(uuid.uuid4()),
        tenant=group.tenant,
        service_settings=group.service_settings,
        project=group.project,
        server_group=group,
        state=Instance.States.OK,
    )
    return JsonResponse(
        {"uuid": instance.uuid.hex, "name": instance.name, "backend_id": instance.backend_id},
        status=201,
    )


urlpatterns = [
    path("state/", show),
    path("fail/", fail),
    path("reset/", reset),
    path("groups/", groups),
    path("groups/<str:group_id>/", group),
    path("tenants/<str:backend_id>/recover/", recover_tenant),
    path("instances/", instances),
]
