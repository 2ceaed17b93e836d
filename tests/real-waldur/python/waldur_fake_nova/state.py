"""The fake Nova's state: one JSON file shared by the web server, the Celery worker and the
harness, read and written under an exclusive lock (fcntl.flock on PATH + ".lock").

No Django here: `python -m waldur_fake_nova.state` works with any Python 3 (see main()).

Layout of the file:
    {
      "groups": {ID: {"id", "name", "policies": [..], "members": [], "metadata": {},
                      "project_id": TENANT_BACKEND_ID, "user_id"}},
      "fail":   {OPERATION: {"count": N, "code": 500}},   # OPERATION: create|get|delete|list
      "calls":  [{"op", "tenant", "arg", "outcome", "at"}]  # every server_groups call, in order
    }
"""

import contextlib
import fcntl
import json
import os
import sys
import time

OPERATIONS = ("create", "get", "delete", "list")
MAX_CALLS = 10000


def state_path():
    path = os.environ.get("REAL_WALDUR_FAKE_NOVA_STATE")
    if path:
        return path
    return os.path.join(os.environ["REAL_WALDUR_STATE"], "fake-nova.json")


def empty():
    return {"groups": {}, "fail": {}, "calls": []}


@contextlib.contextmanager
def locked(path=None, write=True):
    """Yields the state; with write=True, whatever the block leaves in it is saved."""
    path = path or state_path()
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            try:
                with open(path) as f:
                    state = json.load(f)
            except FileNotFoundError:
                state = empty()
            for key, value in empty().items():
                state.setdefault(key, value)
            yield state
            if write:
                state["calls"] = state["calls"][-MAX_CALLS:]
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(state, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def set_failure(operation, count, code=500, path=None):
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, not {operation!r}")
    with locked(path) as state:
        if count > 0:
            state["fail"][operation] = {"count": int(count), "code": int(code)}
        else:
            state["fail"].pop(operation, None)
        return dict(state["fail"])


def take_failure(state, operation):
    """The code to fail this call with (and one fewer left to fail), or None."""
    entry = state["fail"].get(operation)
    if not entry or entry.get("count", 0) <= 0:
        return None
    entry["count"] -= 1
    if entry["count"] <= 0:
        del state["fail"][operation]
    return entry.get("code", 500)


def record(state, op, tenant, arg, outcome):
    state["calls"].append(
        {"op": op, "tenant": tenant, "arg": arg, "outcome": outcome, "at": time.time()}
    )


def reset(path=None):
    with locked(path) as state:
        state.clear()
        state.update(empty())


def main(argv):
    usage = (
        "usage: python -m waldur_fake_nova.state "
        "[show | reset | fail OPERATION COUNT [CODE]]  (state file: $REAL_WALDUR_FAKE_NOVA_STATE)"
    )
    if not argv or argv[0] == "show":
        with locked(write=False) as state:
            json.dump(state, sys.stdout, indent=1, sort_keys=True)
            print()
    elif argv[0] == "reset":
        reset()
    elif argv[0] == "fail" and len(argv) in (3, 4):
        code = int(argv[3]) if len(argv) == 4 else 500
        print(json.dumps(set_failure(argv[1], int(argv[2]), code)))
    else:
        print(usage, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
