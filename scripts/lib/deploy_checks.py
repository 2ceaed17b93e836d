#!/usr/bin/env python3
"""Checks scripts/check-deploy runs on rendered manifests. Needs PyYAML (in .tools/venv).

  deploy_checks.py builtin-only IN OUT
      Copy IN to OUT without custom resources (kinds that kubernetes-validate has no schema
      for), saying which were skipped.
  deploy_checks.py compare DEPLOY_RENDER CHART_RENDER
      Compare `kubectl kustomize deploy/` with the chart rendered with default values: the same
      objects, RBAC rules and bindings, the whole pod spec (containers with image, args, env,
      probes, ports, resources, securityContext), Deployment strategy/selector, Service spec.
  deploy_checks.py argocd-cm CM_PATCH HEALTH_LUA
      The health check embedded in the argocd-cm patch must be health.lua, byte for byte.
"""

import sys

import yaml

# API groups of custom resources the chart may render; kubernetes-validate knows built-in kinds only.
CUSTOM_RESOURCE_GROUPS = {"monitoring.coreos.com"}

# Objects only one side has, on purpose.
ONLY_IN_DEPLOY = {
    ("Namespace", "waldur-operator"),  # the chart installs into `helm install -n NS --create-namespace`
    ("Secret", "waldur-operator-credentials"),  # the chart takes waldur.existingSecret / waldur.token
}
# The CRD is compared byte for byte with crds/ by check-deploy itself.
IGNORED_KINDS = {"CustomResourceDefinition"}


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def group(doc):
    api = doc.get("apiVersion", "")
    return api.split("/")[0] if "/" in api else ""


def builtin_only(src, dst):
    docs = load(src)
    kept = []
    for d in docs:
        if group(d) in CUSTOM_RESOURCE_GROUPS:
            print(f"  skipped {d['kind']} {d['metadata']['name']} ({d['apiVersion']}): a custom "
                  "resource, no built-in schema to validate against")
        else:
            kept.append(d)
    with open(dst, "w", encoding="utf-8") as f:
        yaml.safe_dump_all(kept, f, sort_keys=False)
    print(f"  {len(kept)} built-in objects to validate")


def key(doc):
    return (doc["kind"], doc["metadata"]["name"])


def diff(a, b, path, out):
    """Appends to out every path where a (deploy) and b (chart) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a:
                out.append(f"{path}.{k}: only in the chart: {b[k]!r}")
            elif k not in b:
                out.append(f"{path}.{k}: only in deploy/: {a[k]!r}")
            else:
                diff(a[k], b[k], f"{path}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        named = all(isinstance(x, dict) and "name" in x for x in a + b)
        if named:
            # env, ports, containers, volumes: compare by name, then the order.
            an = {x["name"]: x for x in a}
            bn = {x["name"]: x for x in b}
            diff(an, bn, path, out)
            if [x["name"] for x in a] == [x["name"] for x in b] or set(an) != set(bn):
                return
            out.append(f"{path}: order differs: deploy/ {[x['name'] for x in a]} "
                       f"chart {[x['name'] for x in b]}")
        elif len(a) != len(b):
            out.append(f"{path}: deploy/ has {len(a)} items, the chart {len(b)}: {a!r} vs {b!r}")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"{path}: deploy/ {a!r} != chart {b!r}")


def compare(deploy_path, chart_path):
    deploy = {key(d): d for d in load(deploy_path) if d["kind"] not in IGNORED_KINDS}
    chart = {key(d): d for d in load(chart_path) if d["kind"] not in IGNORED_KINDS}
    problems = []
    for k in sorted(set(deploy) - set(chart) - ONLY_IN_DEPLOY):
        problems.append(f"{k[0]}/{k[1]}: only in deploy/")
    for k in sorted(set(chart) - set(deploy)):
        problems.append(f"{k[0]}/{k[1]}: only in the chart")
    for k in sorted(ONLY_IN_DEPLOY - set(deploy)):
        problems.append(f"{k[0]}/{k[1]}: missing from deploy/")
    compared = []
    for k in sorted(set(deploy) & set(chart)):
        d, c = deploy[k], chart[k]
        name = f"{k[0]}/{k[1]}"
        out = []
        diff(d.get("apiVersion"), c.get("apiVersion"), f"{name}.apiVersion", out)
        diff(d["metadata"].get("namespace"), c["metadata"].get("namespace"),
             f"{name}.metadata.namespace", out)
        kind = k[0]
        if kind in ("ClusterRole", "Role"):
            diff(d.get("rules"), c.get("rules"), f"{name}.rules", out)
        elif kind in ("ClusterRoleBinding", "RoleBinding"):
            diff(d.get("roleRef"), c.get("roleRef"), f"{name}.roleRef", out)
            diff(d.get("subjects"), c.get("subjects"), f"{name}.subjects", out)
        elif kind == "Deployment":
            for field in ("replicas", "selector", "strategy", "revisionHistoryLimit"):
                diff(d["spec"].get(field), c["spec"].get(field), f"{name}.spec.{field}", out)
            diff(d["spec"]["template"]["spec"], c["spec"]["template"]["spec"],
                 f"{name}.spec.template.spec", out)
            # The pods must carry the selector labels (other labels may differ: helm.sh/chart...).
            sel = c["spec"]["selector"]["matchLabels"]
            labels = d["spec"]["template"]["metadata"].get("labels", {})
            for lk, lv in sel.items():
                if labels.get(lk) != lv:
                    out.append(f"{name}: pod label {lk}={lv} missing in deploy/")
        elif kind == "Service":
            diff(d.get("spec"), c.get("spec"), f"{name}.spec", out)
        elif kind == "ServiceAccount":
            diff(d.get("automountServiceAccountToken"), c.get("automountServiceAccountToken"),
                 f"{name}.automountServiceAccountToken", out)
        else:
            diff({x: y for x, y in d.items() if x != "metadata"},
                 {x: y for x, y in c.items() if x != "metadata"}, name, out)
        compared.append(name)
        problems.extend(out)
    print(f"  compared: {', '.join(compared)}")
    print(f"  only in deploy/ by design: {', '.join(f'{a}/{b}' for a, b in sorted(ONLY_IN_DEPLOY))}")
    if problems:
        print("  deploy/ differs from the chart's default render:")
        for p in problems:
            print(f"    {p}")
        return 1
    print("  deploy/ matches the chart")
    return 0


def argocd_cm(cm_path, lua_path):
    with open(cm_path, encoding="utf-8") as f:
        cm = yaml.safe_load(f)
    with open(lua_path, encoding="utf-8") as f:
        lua = f.read()
    k = "resource.customizations.health.openstack.waldur.com_ServerGroup"
    got = (cm.get("data") or {}).get(k)
    if got is None:
        print(f"  {cm_path}: no data key {k}")
        return 1
    if got != lua:
        print(f"  {cm_path}: {k} differs from {lua_path}; copy the file into the ConfigMap")
        return 1
    print(f"  {cm_path}: {k} is {lua_path}")
    return 0


def main(argv):
    if len(argv) == 4 and argv[1] == "builtin-only":
        builtin_only(argv[2], argv[3])
        return 0
    if len(argv) == 4 and argv[1] == "compare":
        return compare(argv[2], argv[3])
    if len(argv) == 4 and argv[1] == "argocd-cm":
        return argocd_cm(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
