#!/usr/bin/python3
"""Checks deploy/ against the server contract of docs/design.md sections 5-7 and against itself.

Every YAML file must parse (yaml.safe_load_all) and the dashboard JSON too. Then: the gRPC port
is 50051 and the metrics port 9464 at /metrics everywhere; Kubernetes probes are grpc probes
(grpc.health.v1 Check) on the gRPC port; only `kvserve serve` flags that exist are passed;
the grace periods outlast the drain; and the pieces point at each other (Service -> pods,
ServiceMonitor -> Service port, HPA -> Deployment and adapter rule, Grafana -> Prometheus,
PrometheusRule == deploy/prometheus/alerts.yml).
"""
import argparse
import json
import pathlib
import re
import sys

import yaml

GRPC_PORT = 50051
METRICS_PORT = 9464
METRICS_PATH = "/metrics"
# The `kvserve serve` flags deploy/ may pass (docs/design.md section 7, where --drain-timeout-s
# defaults to 30 s); a flag the server does not know makes it exit at start-up.
SERVE_FLAGS = {"--model", "--device", "--kv", "--kv-group", "--kv-value-group", "--kv-residual",
               "--host", "--port", "--metrics-port", "--drain-timeout-s"}
DEFAULT_DRAIN_S = 30
# grpc.health.v1 service names the server answers: only "" (the whole server, what a probe without
# `service` asks). gRPC's default health service registers no per-service names, so a probe for
# kvserve.v1.Generation gets NOT_FOUND and never passes (docs/design.md section 5).
HEALTH_SERVICES = {""}
# The Prometheus job name: prometheus.yml's job, and the Service name the ServiceMonitor turns
# into the job label. The alert rules select up{job="kvserve"}.
JOB = "kvserve"

errors = []


def check(condition, message):
    if not condition:
        errors.append(message)
    return condition


def load_yaml(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def flag_values(args):
    """Maps each --flag of an argument list to its value (None for a bare flag)."""
    values, i = {}, 0
    while i < len(args):
        arg = str(args[i])
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                value = str(args[i + 1])
                i += 1
            values[name] = value if eq or value else None
        i += 1
    return values


def check_serve_args(where, args):
    flags = flag_values(args)
    unknown = set(flags) - SERVE_FLAGS
    check(not unknown, f"{where}: unknown kvserve serve flags {sorted(unknown)}")
    check(flags.get("--port", str(GRPC_PORT)) == str(GRPC_PORT), f"{where}: --port is not {GRPC_PORT}")
    check(flags.get("--metrics-port", str(METRICS_PORT)) == str(METRICS_PORT),
          f"{where}: --metrics-port is not {METRICS_PORT}")
    check(str(flags.get("--model", "")).startswith("/models/"), f"{where}: --model is not under /models")
    return int(flags.get("--drain-timeout-s") or DEFAULT_DRAIN_S)


def seconds(duration):
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(duration))
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def compose_volume(spec):
    """(source, target) of a short-syntax volume; the source may hold ${VAR:-default}."""
    spec = re.sub(r":(ro|rw)$", "", str(spec))
    return tuple(spec.rsplit(":", 1))


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_compose(deploy, prometheus_config, grafana_provider):
    compose = load_yaml(deploy / "docker-compose.yml")[0]
    services = compose.get("services", {})
    for name in ("kvserve", "prometheus", "grafana"):
        check(name in services, f"docker-compose.yml: no {name} service")
    kvserve = services.get("kvserve", {})
    drain = check_serve_args("docker-compose.yml kvserve command", kvserve.get("command", []))
    published = {str(p).rsplit(":", 1)[-1] for p in kvserve.get("ports", [])}
    check({str(GRPC_PORT), str(METRICS_PORT)} <= published,
          f"docker-compose.yml: kvserve must publish {GRPC_PORT} and {METRICS_PORT}, publishes {sorted(published)}")
    devices = kvserve.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    check(any("gpu" in d.get("capabilities", []) for d in devices), "docker-compose.yml: kvserve reserves no GPU")
    check(any(compose_volume(v)[1].startswith("/models") for v in kvserve.get("volumes", [])),
          "docker-compose.yml: no model volume under /models")
    check(seconds(kvserve.get("stop_grace_period", "10s")) > drain,
          f"docker-compose.yml: stop_grace_period must outlast the {drain} s drain")

    # Prometheus scrapes the compose service by name, on the metrics port and path.
    targets = [t for job in prometheus_config.get("scrape_configs", []) if job.get("job_name") == JOB
               for sc in job.get("static_configs", []) for t in sc.get("targets", [])]
    check(f"kvserve:{METRICS_PORT}" in targets, f"prometheus.yml: job {JOB} does not scrape kvserve:{METRICS_PORT}")
    mounts = {t: s for s, t in map(compose_volume, services.get("prometheus", {}).get("volumes", []))}
    check(mounts.get("/etc/prometheus") == "./prometheus", "docker-compose.yml: prometheus must mount ./prometheus")
    mounts = {t: s for s, t in map(compose_volume, services.get("grafana", {}).get("volumes", []))}
    check(mounts.get("/etc/grafana/provisioning") == "./grafana/provisioning",
          "docker-compose.yml: grafana must mount ./grafana/provisioning")
    check(mounts.get(grafana_provider["options"]["path"]) == "./grafana/dashboards",
          "docker-compose.yml: grafana must mount ./grafana/dashboards where the dashboard provider reads")


def check_prometheus(deploy):
    config = load_yaml(deploy / "prometheus" / "prometheus.yml")[0]
    jobs = {job["job_name"]: job for job in config.get("scrape_configs", [])}
    if check(JOB in jobs, f"prometheus.yml: no job {JOB}"):
        check(jobs[JOB].get("metrics_path", "/metrics") == METRICS_PATH, f"prometheus.yml: path is not {METRICS_PATH}")
    for rule_file in config.get("rule_files", []):
        check((deploy / "prometheus" / rule_file).is_file(), f"prometheus.yml: rule file {rule_file} missing")
    return config


def check_grafana(deploy):
    grafana = deploy / "grafana"
    datasources = load_yaml(grafana / "provisioning" / "datasources" / "prometheus.yml")[0]["datasources"]
    check(any(d.get("url") == "http://prometheus:9090" for d in datasources),
          "grafana datasource does not point at the compose prometheus service")
    provider = load_yaml(grafana / "provisioning" / "dashboards" / "kvserve.yml")[0]["providers"][0]
    dashboards = sorted((grafana / "dashboards").glob("*.json"))
    check(dashboards, "deploy/grafana/dashboards holds no dashboard")
    uids = {d.get("uid") for d in datasources}
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
        default = variables.get("datasource", {}).get("current", {}).get("value")
        check(default in uids, f"{path.name}: default datasource {default!r} is not a provisioned uid")
        ids = [p["id"] for p in dashboard["panels"]]
        check(len(ids) == len(set(ids)), f"{path.name}: panel ids repeat")
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            targets = panel.get("targets", [])
            check(targets and all(t.get("expr") for t in targets), f"{path.name}: panel {panel['title']!r} has no query")
    return provider


def check_k8s(deploy, alerts):
    k8s = deploy / "k8s"
    kustomization = load_yaml(k8s / "kustomization.yaml")[0]
    objects = {}
    for name in kustomization["resources"]:
        for doc in load_yaml(k8s / name):
            check(doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"),
                  f"k8s/{name}: object without apiVersion, kind or metadata.name")
            objects[doc["kind"]] = doc
    listed = set(kustomization["resources"]) | {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    for path in k8s.glob("*.yaml"):
        check(path.name in listed, f"k8s/{path.name} is not in kustomization.yaml")
    for kind in ("Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                 "PrometheusRule"):
        if not check(kind in objects, f"deploy/k8s has no {kind}"):
            return

    deployment = objects["Deployment"]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    check(selects(deployment["spec"]["selector"]["matchLabels"], pod_labels), "Deployment selector misses its pods")
    container = pod["spec"]["containers"][0]
    drain = check_serve_args("Deployment args", container.get("args", []))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT},
          f"Deployment: container ports must be grpc={GRPC_PORT}, metrics={METRICS_PORT}, are {ports}")
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name, {})
        if check("grpc" in probe, f"Deployment: {probe_name} is not a grpc (grpc.health.v1) probe"):
            check(probe["grpc"].get("port") == GRPC_PORT, f"Deployment: {probe_name} is not on port {GRPC_PORT}")
            check(probe["grpc"].get("service", "") in HEALTH_SERVICES,
                  f"Deployment: {probe_name} asks for a health service the server does not register")
    limits = container["resources"]["limits"]
    check(str(limits.get("nvidia.com/gpu")) == "1", "Deployment: limits must hold nvidia.com/gpu: 1")
    security = pod["spec"].get("securityContext", {})
    check(security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0,
          "Deployment: the pod must run as a non-root uid")
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    check("/models" in mounts, "Deployment: no model volume at /models")

    # SIGTERM comes after preStop; the drain then runs; the kubelet kills at the grace period.
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    check(grace >= pre_stop_s + drain + 5,
          f"Deployment: terminationGracePeriodSeconds {grace} < preStop {pre_stop_s} + drain {drain} + 5 s margin")
    liveness = container["livenessProbe"]
    check(liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) > grace,
          "Deployment: liveness would kill a draining pod (health is NOT_SERVING while it drains)")

    service = objects["Service"]
    check(service["spec"].get("clusterIP") == "None", "Service must be headless for client-side gRPC balancing")
    check(selects(service["spec"]["selector"], pod_labels), "Service selector misses the pods")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    for name, number in (("grpc", GRPC_PORT), ("metrics", METRICS_PORT)):
        port = service_ports.get(name, {})
        check(port.get("port") == number and port.get("targetPort") in (name, number),
              f"Service: port {name} must be {number} to the container's {name} port")
    check(service["metadata"]["name"] == JOB, f"Service must be named {JOB} (the Prometheus job label)")

    monitor = objects["ServiceMonitor"]
    check(selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"].get("labels", {})),
          "ServiceMonitor selector misses the Service")
    for endpoint in monitor["spec"]["endpoints"]:
        check(endpoint.get("port") == "metrics", "ServiceMonitor must scrape the Service's metrics port")
        check(endpoint.get("path", "/metrics") == METRICS_PATH, f"ServiceMonitor path is not {METRICS_PATH}")

    check(selects(objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], pod_labels),
          "PodDisruptionBudget selector misses the pods")

    hpa = objects["HorizontalPodAutoscaler"]
    target = hpa["spec"]["scaleTargetRef"]
    check(target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"],
          "HPA does not scale the kvserve Deployment")
    adapter = load_yaml(k8s / "prometheus-adapter-values.yaml")[0]
    served = {rule["name"]["as"] for rule in adapter["rules"]["custom"]}
    for metric in hpa["spec"]["metrics"]:
        name = metric[metric["type"][0].lower() + metric["type"][1:]]["metric"]["name"]
        check(name in served, f"HPA metric {name} is not served by the Prometheus Adapter rules")

    check(objects["PrometheusRule"]["spec"] == alerts,
          "k8s/prometheusrule.yaml differs from prometheus/alerts.yml: regenerate it (command in its header)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, type=pathlib.Path, help="the repository root")
    deploy = parser.parse_args().root / "deploy"

    for path in sorted(deploy.rglob("*")):
        try:
            if path.suffix in (".yml", ".yaml"):
                load_yaml(path)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (yaml.YAMLError, json.JSONDecodeError) as error:
            errors.append(f"{path}: does not parse: {error}")
    if errors:
        print("\n".join(f"error: {e}" for e in errors), file=sys.stderr)
        return 1

    prometheus_config = check_prometheus(deploy)
    provider = check_grafana(deploy)
    check_compose(deploy, prometheus_config, provider)
    check_k8s(deploy, load_yaml(deploy / "prometheus" / "alerts.yml")[0])

    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"deploy manifests: {len(errors)} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
