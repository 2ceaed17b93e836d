"""What PyPI's waldur-api-client (generated from a Waldur's OpenAPI schema) says about the
server-group API, as JSON on stdout: the operations (method, path, answered statuses), the
fields of a server group and of a create request, the sparse-field names, the states and the
policies. tests/e2e/api_client_contract.rs holds the operator and the simulator's 8.x mode to it.

Reads the installed package's source: nothing is sent anywhere.
"""

import importlib
import inspect
import json
import pathlib
import re
import sys

import waldur_api_client
from waldur_api_client.models import core_states, policy_enum
from waldur_api_client.models import open_stack_server_group as group_model
from waldur_api_client.models import open_stack_server_group_field_enum as field_enum
from waldur_api_client.models import open_stack_server_group_request as request_model

ROOT = pathlib.Path(waldur_api_client.__file__).parent


def operation(module_name):
    source = (ROOT / "api" / (module_name.replace(".", "/") + ".py")).read_text()
    method = re.search(r'"method":\s*"(\w+)"', source).group(1).upper()
    url = re.search(r'"url":\s*f?"([^"]+)"', source).group(1)
    url = re.sub(r"\{[^}]+\}", "{uuid}", url)
    statuses = sorted({int(s) for s in re.findall(r"response\.status_code == (\d+)", source)})
    return {"name": module_name.split(".")[-1], "method": method, "path": url, "statuses": statuses}


def fields(cls):
    return sorted(k for k in cls.__annotations__ if k != "additional_properties")


def main():
    ops = []
    for package in ("openstack_server_groups", "openstack_tenants"):
        for path in sorted((ROOT / "api" / package).glob("*.py")):
            if path.stem == "__init__":
                continue
            if package == "openstack_tenants" and path.stem not in (
                "openstack_tenants_create_server_group",
                "openstack_tenants_pull_server_groups",
                "openstack_tenants_retrieve",
            ):
                continue
            ops.append(operation(f"{package}.{path.stem}"))
    out = {
        "version": importlib.metadata.version("waldur-api-client"),
        "operations": ops,
        "group_fields": fields(group_model.OpenStackServerGroup),
        "request_fields": fields(request_model.OpenStackServerGroupRequest),
        "field_enum": sorted(e.value for e in field_enum.OpenStackServerGroupFieldEnum),
        "core_states": sorted(e.value for e in core_states.CoreStates),
        "policies": sorted(e.value for e in policy_enum.PolicyEnum),
    }
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    import importlib.metadata

    main()
