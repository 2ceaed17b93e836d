"""Prints pip requirement lines for every pin of a poetry.lock.

Used by scripts/real-waldur to build the venv of a real waldur-mastermind. Skipped:
- pywin32 (Windows only; it has no wheel for Linux and nothing imports it here);
- packages whose source is git (poetry's `[package.source] type = "git"`): the only one in
  7.0.7 is django-upload-validator, which the caller installs from PyPI instead.
Run with the venv's (or any) Python >= 3.11 (tomllib).
"""

import sys
import tomllib

SKIP = {"pywin32"}


def main(path):
    with open(path, "rb") as f:
        lock = tomllib.load(f)
    for pkg in lock["package"]:
        name = pkg["name"]
        if name in SKIP:
            continue
        if pkg.get("source", {}).get("type") == "git":
            print(f"# skipped (git source): {name}", file=sys.stderr)
            continue
        print(f"{name}=={pkg['version']}")


if __name__ == "__main__":
    main(sys.argv[1])
