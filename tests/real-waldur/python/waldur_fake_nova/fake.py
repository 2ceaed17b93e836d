"""A fake Nova at the novaclient boundary, installed by this app's ready().

Waldur's OpenStack backend calls `get_tenant_session(tenant)` and then
`get_nova_client(session)` (both names looked up in `waldur_openstack.backend` at call time).
Here the session only carries the tenant's backend id, and the Nova client has only a
`server_groups` manager (create, get, delete, list) whose groups live in the state file of
`state.py`, shared by the web server and the Celery worker. Everything above (executors,
tasks, state machine, serializers) is Waldur's own code. Any other client (Neutron, Cinder,
Keystone, Glance) is untouched: those calls would try to reach a real OpenStack and fail.

Like Nova (before microversion 2.64): a policy other than the four answers BadRequest (400);
a group of another tenant, or none, answers NotFound (404). A failure asked for through
`state.set_failure` answers ClientException with its code (500 unless said otherwise).
"""

import logging
import uuid

from novaclient import exceptions as nova_exceptions
from novaclient.v2.server_groups import ServerGroup

from . import state as fake_state

logger = logging.getLogger(__name__)

POLICIES = ("affinity", "anti-affinity", "soft-affinity", "soft-anti-affinity")


class FakeSession:
    def __init__(self, tenant_backend_id):
        self.tenant_backend_id = tenant_backend_id

    def __repr__(self):
        return f"FakeSession(tenant={self.tenant_backend_id!r})"


def _error(code, message):
    if code == 400:
        return nova_exceptions.BadRequest(400, message)
    if code == 404:
        return nova_exceptions.NotFound(404, message)
    if code == 409:
        return nova_exceptions.Conflict(409, message)
    return nova_exceptions.ClientException(code, message)


class FakeServerGroupsManager:
    """What novaclient.v2.server_groups.ServerGroupsManager offers Waldur, on the state file."""

    def __init__(self, tenant):
        self.tenant = tenant

    def _resource(self, info):
        return ServerGroup(self, dict(info), loaded=True)

    def _call(self, op, arg, action):
        with fake_state.locked() as state:
            code = fake_state.take_failure(state, op)
            if code is not None:
                fake_state.record(state, op, self.tenant, arg, f"injected {code}")
                logger.info("fake nova: %s %r fails with %s (injected)", op, arg, code)
                error = _error(code, f"Injected failure of server_groups.{op} (fake Nova)")
            else:
                try:
                    result = action(state)
                except nova_exceptions.ClientException as e:
                    fake_state.record(state, op, self.tenant, arg, f"error {e.code}")
                    error = e
                else:
                    fake_state.record(state, op, self.tenant, arg, "ok")
                    return result
        raise error

    def _own(self, state, group_id):
        group = state["groups"].get(str(group_id))
        if group is None or group.get("project_id") != self.tenant:
            raise nova_exceptions.NotFound(
                404, f"Server group {group_id} could not be found."
            )
        return group

    def create(self, name, policies, rules=None):
        policy_list = policies if isinstance(policies, list | tuple) else [policies]

        def action(state):
            if len(policy_list) != 1 or policy_list[0] not in POLICIES:
                raise nova_exceptions.BadRequest(
                    400,
                    f"Invalid input for field/attribute policies. Value: {policy_list}.",
                )
            group = {
                "id": str(uuid.uuid4()),
                "name": name,
                "policies": list(policy_list),
                "members": [],
                "metadata": {},
                "project_id": self.tenant,
                "user_id": "fake-nova-user",
            }
            state["groups"][group["id"]] = group
            return self._resource(group)

        return self._call("create", {"name": name, "policies": policy_list}, action)

    def get(self, id):
        group_id = getattr(id, "id", id)
        return self._call("get", group_id, lambda state: self._resource(self._own(state, group_id)))

    def delete(self, id):
        group_id = getattr(id, "id", id)

        def action(state):
            self._own(state, group_id)
            del state["groups"][str(group_id)]

        return self._call("delete", group_id, action)

    def list(self, all_projects=False, limit=None, offset=None):
        def action(state):
            groups = [
                g
                for g in state["groups"].values()
                if all_projects or g.get("project_id") == self.tenant
            ]
            return [self._resource(g) for g in groups]

        return self._call("list", None, action)


class FakeNovaClient:
    def __init__(self, session):
        tenant = getattr(session, "tenant_backend_id", None)
        if tenant is None:
            raise nova_exceptions.ClientException(
                500, "fake Nova: only tenant sessions (get_tenant_session) are faked"
            )
        self.server_groups = FakeServerGroupsManager(tenant)


def get_tenant_session(tenant):
    return FakeSession(tenant.backend_id)


def get_nova_client(session):
    return FakeNovaClient(session)


def install():
    from waldur_openstack import backend

    backend.get_tenant_session = get_tenant_session
    backend.get_nova_client = get_nova_client
    logger.info("fake nova installed (state file %s)", fake_state.state_path())
