#!/usr/bin/env python3
"""Checks scripts/check-deploy runs on rendered manifests. Needs PyYAML (in .tools/venv).

  deploy_checks.py builtin-only IN OUT
      Copy IN to OUT without custom resources (kinds that kubernetes-validate has no schema
      for), saying which were skipped.
  deploy_checks.py compare DEPLOY_RENDER CHART_RENDER
      Compare `kubectl kustomize deploy/` with the chart rendered with default values: the same
      objects, RBAC rules, bindings and aggregation labels, the whole pod spec (containers with
      image, args, env, probes, ports, resources, securityContext), Deployment
      strategy/selector, Service spec, and the CRD but for its metadata.
  deploy_checks.py chart-features CHART_DIR CRD NAME=RENDER...
      The chart's features, on renders check-deploy makes: default (default values), full
      (ci/full-values.yaml), nocrd (crds.enabled=false), global (global.foo=1, enabled=true),
      openshift (podSecurityContext.runAsUser/runAsGroup=null), pdb (two replicas, a
      PodDisruptionBudget with defaults and unhealthyPodEvictionPolicy), noagg
      (rbac.aggregateClusterRoles=false), noprobes (liveness and startup probes off).
  deploy_checks.py argocd-cm CM_PATCH HEALTH_LUA
      The health check embedded in the argocd-cm patch must be health.lua, byte for byte.
"""

import sys

import yaml

# API groups of custom resources the chart may render; kubernetes-validate knows built-in kinds only.
CUSTOM_RESOURCE_GROUPS = {"monitoring.coreos.com"}

# Objects only one side has, on purpose. (Neither side renders the token Secret: deploy/ leaves
# it to the user, the chart is rendered with waldur.existingSecret.)
ONLY_IN_DEPLOY = {
    ("Namespace", "waldur-operator"),  # the chart installs into `helm install -n NS --create-namespace`
}
# The labels that aggregate a ClusterRole into view, edit or admin: they are its meaning.
AGGREGATE_PREFIX = "rbac.authorization.k8s.io/aggregate-to-"


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
    deploy = {key(d): d for d in load(deploy_path)}
    chart = {key(d): d for d in load(chart_path)}
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
            agg = [{k: v for k, v in (x["metadata"].get("labels") or {}).items()
                    if k.startswith(AGGREGATE_PREFIX)} for x in (d, c)]
            diff(agg[0], agg[1], f"{name}.metadata.labels(aggregation)", out)
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
            # CustomResourceDefinition (labels and the keep annotation are the chart's own), others.
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


def chart_features(chart_dir, crd_path, renders):
    import json
    import os

    r = {name: load(path) for name, path in renders.items()}
    with open(crd_path, encoding="utf-8") as f:
        crd_source = yaml.safe_load(f)
    with open(os.path.join(chart_dir, "Chart.yaml"), encoding="utf-8") as f:
        app_version = yaml.safe_load(f)["appVersion"]
    with open(os.path.join(chart_dir, "ci", "full-values.yaml"), encoding="utf-8") as f:
        common = yaml.safe_load(f)["commonLabels"]

    def objs(name, kind):
        return [d for d in r[name] if d["kind"] == kind]

    def one(name, kind, obj_name=None):
        found = [d for d in objs(name, kind) if obj_name is None or d["metadata"]["name"] == obj_name]
        return found[0] if len(found) == 1 else {}

    def dep(name):
        return one(name, "Deployment")

    def pod(name):
        return dep(name).get("spec", {}).get("template", {}).get("spec", {})

    def ctr(name):
        return (pod(name).get("containers") or [{}])[0]

    def env(name):
        return {e["name"]: e.get("value") for e in ctr(name).get("env", [])}

    def labels(d):
        return d.get("metadata", {}).get("labels") or {}

    def annotations(d):
        return d.get("metadata", {}).get("annotations") or {}

    def probe(name, kind):
        return ctr(name).get(kind) or {}

    def get(p, path):
        return (p.get("httpGet") or {}).get(path)

    agg = "rbac.authorization.k8s.io/aggregate-to-"

    def aggregate_roles(name):
        return {d["metadata"]["name"]: d for d in objs(name, "ClusterRole")
                if any(k.startswith(agg) for k in labels(d))}

    def aggregate_ok(name):
        roles = aggregate_roles(name)
        view, edit = roles.get("waldur-operator-view", {}), roles.get("waldur-operator-edit", {})
        lv = {k[len(agg):] for k, v in labels(view).items() if k.startswith(agg) and v == "true"}
        le = {k[len(agg):] for k, v in labels(edit).items() if k.startswith(agg) and v == "true"}
        read_only = all(set(rule["verbs"]) <= {"get", "list", "watch"} for rule in view.get("rules", []))
        # Users never write the status or the finalizers.
        no_status_writes = all(
            set(rule["resources"]) <= {"servergroups"} or set(rule["verbs"]) <= {"get", "list", "watch"}
            for d in (view, edit) for rule in d.get("rules", []))
        edit_verbs = {v for rule in edit.get("rules", []) if "servergroups" in rule["resources"]
                      and rule["apiGroups"] == ["openstack.waldur.com"] for v in rule["verbs"]}
        return (len(roles) == 2 and lv == {"view", "edit", "admin"} and le == {"edit", "admin"}
                and read_only and no_status_writes
                and {"create", "update", "patch", "delete", "deletecollection", "get", "list", "watch"} <= edit_verbs)

    def crd(name):
        return one(name, "CustomResourceDefinition", "servergroups.openstack.waldur.com")

    def same_crd(d):
        return {k: v for k, v in d.items() if k != "metadata"} == {k: v for k, v in crd_source.items() if k != "metadata"}

    def files(rel):
        path = os.path.join(chart_dir, "files", rel)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    rules_text, dashboard_text = files("prometheus-rules.yaml"), files("grafana-dashboard.json")
    prom = one("full", "PrometheusRule")
    dash = one("full", "ConfigMap", "waldur-operator-dashboard")
    sec_full = pod("full").get("securityContext", {})
    full_volumes = [v["name"] for v in pod("full").get("volumes", [])]
    pdb_full = one("full", "PodDisruptionBudget")
    pdb_default = one("pdb", "PodDisruptionBudget")
    sm = one("full", "ServiceMonitor")
    sm_ep = (sm.get("spec", {}).get("endpoints") or [{}])[0]
    extra_map = one("full", "ConfigMap", "waldur-operator-extra")
    extra_str = one("full", "ConfigMap", "waldur-operator-extra-string")
    unlabelled = [f"{d['kind']}/{d['metadata']['name']}" for d in r["full"]
                  if any(labels(d).get(k) != v for k, v in common.items())]
    pod_labels = dep("full").get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})

    checks = [
        # default values
        ("default: the CRD is rendered, equal to crds/ but for metadata",
         bool(crd("default")) and same_crd(crd("default"))),
        ("default: the CRD has helm.sh/resource-policy: keep and the chart's labels",
         annotations(crd("default")).get("helm.sh/resource-policy") == "keep"
         and labels(crd("default")).get("app.kubernetes.io/managed-by") == "Helm"
         and labels(crd("default")).get("app.kubernetes.io/instance") == "waldur-operator"),
        ("default: ClusterRoles waldur-operator-view (aggregate-to-view/edit/admin, read only) and "
         "waldur-operator-edit (aggregate-to-edit/admin, writes servergroups, never the status)",
         aggregate_ok("default")),
        ("default: startupProbe on /healthz (metrics port), at least a minute",
         get(probe("default", "startupProbe"), "path") == "/healthz"
         and get(probe("default", "startupProbe"), "port") == "metrics"
         and probe("default", "startupProbe").get("failureThreshold", 0)
         * probe("default", "startupProbe").get("periodSeconds", 0) >= 60),
        ("default: livenessProbe /healthz (5s, 10s, 3s, 3), readinessProbe /readyz (2s, 5s, 3s, 3)",
         get(probe("default", "livenessProbe"), "path") == "/healthz"
         and [probe("default", "livenessProbe").get(k) for k in
              ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold")] == [5, 10, 3, 3]
         and get(probe("default", "readinessProbe"), "path") == "/readyz"
         and [probe("default", "readinessProbe").get(k) for k in
              ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold")] == [2, 5, 3, 3]),
        ("default: METRICS_ADDR=[::]:8080 (dual-stack)", env("default").get("METRICS_ADDR") == "[::]:8080"),
        ("default: pod runs as 65532, non-root, RuntimeDefault seccomp",
         pod("default").get("securityContext") == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                                   "seccompProfile": {"type": "RuntimeDefault"}}),
        ("default: container read-only, no privilege escalation, ALL capabilities dropped",
         ctr("default").get("securityContext", {}).get("readOnlyRootFilesystem") is True
         and ctr("default").get("securityContext", {}).get("allowPrivilegeEscalation") is False
         and ctr("default").get("securityContext", {}).get("capabilities") == {"drop": ["ALL"]}),
        (f"default: image ghcr.io/waldur/waldur-operator:{app_version}",
         ctr("default").get("image") == f"ghcr.io/waldur/waldur-operator:{app_version}"),
        ("default: revisionHistoryLimit 5, terminationGracePeriodSeconds 30",
         dep("default").get("spec", {}).get("revisionHistoryLimit") == 5
         and pod("default").get("terminationGracePeriodSeconds") == 30),
        ("default: no PodDisruptionBudget, PrometheusRule, dashboard or extra objects",
         not {"PodDisruptionBudget", "PrometheusRule", "ConfigMap"} & {d["kind"] for d in r["default"]}),
        # ci/full-values.yaml
        ("full: PodDisruptionBudget maxUnavailable 1 (no minAvailable) selecting the pods",
         pdb_full.get("spec", {}).get("maxUnavailable") == 1 and "minAvailable" not in pdb_full.get("spec", {})
         and pdb_full.get("spec", {}).get("selector") == dep("full").get("spec", {}).get("selector")),
        ("full: extraArgs after the chart's args",
         ctr("full").get("args") == ["run", "--leader-elect", "--read-path=batched"]),
        ("full: extraVolumes after the CA volume, extraVolumeMounts mounted",
         full_volumes == ["waldur-ca", "scratch"]
         and {"name": "scratch", "mountPath": "/scratch"} in ctr("full").get("volumeMounts", [])),
        ("full: extraObjects rendered through tpl (a map and a string)",
         extra_map.get("data") == {"release": "waldur-operator"}
         and extra_map.get("metadata", {}).get("namespace") == "waldur-operator"
         and extra_str.get("data") == {"watched": "team-a"}),
        (f"full: commonLabels {common} on every object ({len(r['full'])}) and the pods"
         + (f"; missing on {unlabelled}" if unlabelled else ""),
         not unlabelled and all(pod_labels.get(k) == v for k, v in common.items())),
        ("full: podSecurityContext merges with the defaults (fsGroup added, runAsUser kept)",
         sec_full.get("fsGroup") == 65532 and sec_full.get("fsGroupChangePolicy") == "OnRootMismatch"
         and sec_full.get("runAsUser") == 65532 and sec_full.get("runAsNonRoot") is True),
        ("full: tuned probes (liveness 20s x 5, readiness timeout 5s, startup x 90)",
         probe("full", "livenessProbe").get("periodSeconds") == 20
         and probe("full", "livenessProbe").get("failureThreshold") == 5
         and probe("full", "readinessProbe").get("timeoutSeconds") == 5
         and probe("full", "startupProbe").get("failureThreshold") == 90),
        ("full: deploymentAnnotations, revisionHistoryLimit 3, terminationGracePeriodSeconds 45",
         annotations(dep("full")).get("example.com/owner") == "platform-team"
         and dep("full").get("spec", {}).get("revisionHistoryLimit") == 3
         and pod("full").get("terminationGracePeriodSeconds") == 45),
        ("full: crds.keep=false drops the keep annotation",
         bool(crd("full")) and "helm.sh/resource-policy" not in annotations(crd("full"))),
        ("full: aggregated ClusterRoles in single-namespace mode too", aggregate_ok("full")),
        ("full: ServiceMonitor honorLabels, relabelings, metricRelabelings, annotations",
         sm_ep.get("honorLabels") is True and bool(sm_ep.get("relabelings"))
         and bool(sm_ep.get("metricRelabelings"))
         and annotations(sm).get("example.com/owner") == "platform-team"),
        ("full: PrometheusRule whose spec is files/prometheus-rules.yaml, verbatim, with its labels"
         + ("" if rules_text is not None else " (files/prometheus-rules.yaml is MISSING)"),
         rules_text is not None and prom.get("spec") == yaml.safe_load(rules_text)
         and bool(prom.get("spec", {}).get("groups"))
         and labels(prom).get("release") == "kube-prometheus-stack"),
        ("full: dashboard ConfigMap (namespace monitoring, grafana_dashboard=1) holding files/grafana-dashboard.json"
         + ("" if dashboard_text is not None else " (files/grafana-dashboard.json is MISSING)"),
         dashboard_text is not None and dash.get("metadata", {}).get("namespace") == "monitoring"
         and labels(dash).get("grafana_dashboard") == "1"
         and json.loads(dash.get("data", {}).get("waldur-operator.json", "null")) == json.loads(dashboard_text)),
        # other renders
        ("crds.enabled=false: no CRD", not objs("nocrd", "CustomResourceDefinition") and bool(dep("nocrd"))),
        ("global.foo=1 and enabled=true are accepted (subchart use)", bool(dep("global"))),
        ("podSecurityContext.runAsUser/runAsGroup=null remove them (OpenShift), the rest stays",
         "runAsUser" not in pod("openshift").get("securityContext", {})
         and "runAsGroup" not in pod("openshift").get("securityContext", {})
         and pod("openshift").get("securityContext", {}).get("runAsNonRoot") is True
         and "runAsUser" not in ctr("openshift").get("securityContext", {})),
        ("podDisruptionBudget.enabled alone: minAvailable 1; unhealthyPodEvictionPolicy passed on",
         pdb_default.get("spec", {}).get("minAvailable") == 1
         and "maxUnavailable" not in pdb_default.get("spec", {})
         and pdb_default.get("spec", {}).get("unhealthyPodEvictionPolicy") == "AlwaysAllow"),
        ("rbac.aggregateClusterRoles=false: no aggregated ClusterRoles, the operator's stays",
         not aggregate_roles("noagg") and bool(one("noagg", "ClusterRole", "waldur-operator"))),
        ("livenessProbe/startupProbe.enabled=false: those probes are gone, readiness stays",
         "livenessProbe" not in ctr("noprobes") and "startupProbe" not in ctr("noprobes")
         and "readinessProbe" in ctr("noprobes")),
    ]
    bad = 0
    for name, good in checks:
        print(f"  {'ok' if good else 'FAIL'}: {name}")
        bad += not good
    return 1 if bad else 0


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
    if len(argv) >= 5 and argv[1] == "chart-features" and all("=" in a for a in argv[4:]):
        return chart_features(argv[2], argv[3], dict(a.split("=", 1) for a in argv[4:]))
    if len(argv) == 4 and argv[1] == "argocd-cm":
        return argocd_cm(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
