#!/usr/bin/env python3
"""Validates the Kubernetes manifests offline. Run by ops/k8s-validate.sh, which provides the
pinned packages: `kubernetes-validate` (the Kubernetes JSON schemas, bundled) and
`cloudcoil.models.keda` (models generated from KEDA's CRDs).

    ops/k8s-validate.py [DIR]        DIR defaults to ops/kubernetes

Every file kustomization.yaml lists, and no other, is checked:
  - a built-in kind against the strict schema of each Kubernetes version in KUBERNETES (an
    unknown kind or apiVersion is an error, where kubernetes-validate alone only warns);
  - a keda.sh kind against KEDA's model, with any field the model does not know an error;
  - what no schema knows but the product needs: the worker's grace period outlasts
    worker.shutdown_grace, probes hit /healthz and /readyz on the port the process listens
    on, every APPEVENTS__ variable names a setting of config/default.toml, the autoscaler
    scales the worker on amqp.queue with keys the rabbitmq scaler reads, selectors match.
Prints one line per resource and per problem; exits 1 on any problem.
"""

import re
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

ROOT = Path(__file__).resolve().parent.parent
# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
KUBERNETES = ["1.30.0", "1.37.0"]
KEDA_MODELS = {
    "ScaledObject": keda.ScaledObject,
    "TriggerAuthentication": keda.TriggerAuthentication,
}
# Trigger metadata is a free map in KEDA's CRD: these are the keys the rabbitmq scaler reads.
RABBITMQ_TRIGGER_KEYS = {
    "host", "hostFromEnv", "protocol", "mode", "value", "activationValue", "queueName",
    "vhostName", "useRegex", "pageSize", "operation", "timeout", "excludeUnacknowledged",
    "unsafeSsl", "usernameFromEnv", "passwordFromEnv",
}
# Variables the product reads besides APPEVENTS__SECTION__KEY (src/config.rs).
PLAIN_VARIABLES = {"DATABASE_URL", "AMQP_URL", "APPEVENTS_ENVIRONMENT", "APPEVENTS_CONFIG_DIR",
                   "RUST_LOG"}


class Report:
    def __init__(self):
        self.failed = False

    def ok(self, where, what):
        print(f"ok    {where}: {what}")

    def fail(self, where, what):
        self.failed = True
        print(f"FAIL  {where}: {what}")


def seconds(duration):
    """A humantime duration as config/default.toml writes them: "250ms", "25s", "2m", "1h"."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration.strip())
    if not match:
        raise ValueError(f"unreadable duration {duration!r}")
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    return int(match.group(1)) * factor


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def load(directory, report):
    """The documents of every file kustomization.yaml lists, as (file name, document)."""
    kustomization_file = directory / "kustomization.yaml"
    try:
        kustomization = yaml.safe_load(kustomization_file.read_text())
    except (OSError, yaml.YAMLError) as err:
        report.fail("kustomization.yaml", str(err))
        return []
    listed = kustomization.get("resources", [])
    for name in sorted(p.name for p in directory.glob("*.yaml")):
        if name != "kustomization.yaml" and name not in listed:
            report.fail(name, "not listed in kustomization.yaml: kubectl apply -k would skip it")
    documents = []
    for name in listed:
        try:
            loaded = list(yaml.safe_load_all((directory / name).read_text()))
        except (OSError, yaml.YAMLError) as err:
            report.fail(name, str(err).replace("\n", " "))
            continue
        documents += [(name, doc) for doc in loaded if doc is not None]
    return documents


def dropped(source, kept, path=""):
    """Keys of `source` that the model did not keep: pydantic ignores unknown fields."""
    if isinstance(source, dict) and isinstance(kept, dict):
        for key, value in source.items():
            if key not in kept:
                yield f"{path}.{key}".lstrip(".")
            else:
                yield from dropped(value, kept[key], f"{path}.{key}")
    elif isinstance(source, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(source, kept)):
            yield from dropped(a, b, f"{path}[{i}]")


def check_schema(where, doc, report):
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        report.fail(where, "not a Kubernetes object (no apiVersion or kind)")
        return False
    if doc["apiVersion"].startswith("keda.sh/"):
        model = KEDA_MODELS.get(doc["kind"])
        if model is None or doc["apiVersion"] != "keda.sh/v1alpha1":
            report.fail(where, f"no KEDA model for {doc['apiVersion']} {doc['kind']}")
            return False
        try:
            parsed = model.model_validate(doc)
        except pydantic.ValidationError as err:
            for e in err.errors():
                report.fail(where, f"{'.'.join(map(str, e['loc']))}: {e['msg']}")
            return False
        kept = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
        unknown = list(dropped(doc, kept))
        for field in unknown:
            report.fail(where, f"unknown field {field}")
        return not unknown
    good = True
    for version in KUBERNETES:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            report.fail(where, f"unknown kind {doc['apiVersion']} {doc['kind']} "
                               f"in Kubernetes {version}")
            return False
        except kubernetes_validate.ValidationError as err:
            path = ".".join(map(str, err.path)) or "(top)"
            report.fail(where, f"Kubernetes {version}: {path}: {err.message}")
            good = False
    return good


def containers(doc):
    """The containers of a Deployment's or a Job's pod template."""
    return doc["spec"]["template"]["spec"].get("containers", [])


def check_env(where, container, settings, report):
    for variable in container.get("env", []):
        name = variable["name"]
        if name in PLAIN_VARIABLES:
            continue
        parts = name.split("__")
        if parts[0] != "APPEVENTS" or len(parts) < 3:
            report.fail(where, f"env {name}: not a variable the product reads")
            continue
        section, key = parts[1].lower(), parts[2].lower()
        table = settings.get(section)
        if not isinstance(table, dict) or key not in table:
            report.fail(where, f"env {name}: no setting {section}.{key} in config/default.toml")
        elif len(parts) > 3 and not isinstance(table[key], dict):
            report.fail(where, f"env {name}: {section}.{key} is not a table")


def check_probes(where, container, port, report):
    """Liveness on /healthz and readiness on /readyz, on the port the process listens on."""
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet")
        if get is None:
            report.fail(where, f"{probe}: missing (want GET {path})")
            continue
        target = ports.get(get["port"], get["port"])
        if get.get("path") != path or target != port:
            report.fail(where, f"{probe}: GET {get.get('path')} on {target}, want {path} on {port}")


def pod_labels(doc):
    return doc["spec"]["template"]["metadata"].get("labels", {})


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_product(documents, settings, report):
    by_kind = {}
    for where, doc in documents:
        by_kind.setdefault(doc["kind"], []).append((where, doc))
    deployments = {d["metadata"]["name"]: (w, d) for w, d in by_kind.get("Deployment", [])}
    grace = seconds(settings["worker"]["shutdown_grace"])
    workers = []
    for where, doc in deployments.values():
        where = f"{where}: Deployment/{doc['metadata']['name']}"
        for container in containers(doc):
            args = container.get("args", [])
            check_env(where, container, settings, report)
            if args[:1] == ["worker"]:
                workers.append(doc)
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                own = env.get("APPEVENTS__WORKER__SHUTDOWN_GRACE")
                wanted = seconds(own) if own else grace
                period = doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
                if period <= wanted:
                    report.fail(where, f"terminationGracePeriodSeconds {period} must exceed "
                                       f"worker.shutdown_grace ({wanted:g}s)")
                ops_listen = env.get("APPEVENTS__WORKER__OPS_LISTEN") or settings["worker"]["ops_listen"]
                if port_of(ops_listen) == 0:
                    report.fail(where, "worker.ops_listen picks a free port: set "
                                       "APPEVENTS__WORKER__OPS_LISTEN to a fixed one for the probes")
                check_probes(where, container, port_of(ops_listen), report)
            elif args[:1] == ["serve"]:
                check_probes(where, container, port_of(settings["server"]["listen"]), report)
    for where, doc in by_kind.get("Job", []):
        for container in containers(doc):
            check_env(f"{where}: Job/{doc['metadata']['name']}", container, settings, report)
    if not workers:
        report.fail("kustomization.yaml", "no Deployment runs `appevents worker`")
    for where, doc in by_kind.get("PodDisruptionBudget", []):
        selector = doc["spec"].get("selector", {}).get("matchLabels", {})
        if not any(selects(selector, pod_labels(w)) for w in workers):
            report.fail(f"{where}: PodDisruptionBudget/{doc['metadata']['name']}",
                        "its selector matches no worker pod")
    for where, doc in by_kind.get("Service", []):
        selector = doc["spec"].get("selector", {})
        matched = [d for _, d in deployments.values() if selects(selector, pod_labels(d))]
        where = f"{where}: Service/{doc['metadata']['name']}"
        if not matched:
            report.fail(where, "its selector matches no Deployment's pods")
            continue
        names = {p.get("name") for d in matched for c in containers(d) for p in c.get("ports", [])}
        for port in doc["spec"].get("ports", []):
            if isinstance(port.get("targetPort"), str) and port["targetPort"] not in names:
                report.fail(where, f"targetPort {port['targetPort']} names no container port")
    auths = {d["metadata"]["name"] for _, d in by_kind.get("TriggerAuthentication", [])}
    scaled = by_kind.get("ScaledObject", [])
    if not scaled:
        report.fail("kustomization.yaml", "no ScaledObject scales the workers")
    for where, doc in scaled:
        where = f"{where}: ScaledObject/{doc['metadata']['name']}"
        target = deployments.get(doc["spec"]["scaleTargetRef"]["name"], (None, None))[1]
        if target is None or target not in workers:
            report.fail(where, "scaleTargetRef names no worker Deployment")
        for trigger in doc["spec"].get("triggers", []):
            metadata = trigger.get("metadata", {})
            if trigger.get("type") != "rabbitmq":
                report.fail(where, f"trigger type {trigger.get('type')}, want rabbitmq")
                continue
            for key in sorted(set(metadata) - RABBITMQ_TRIGGER_KEYS):
                report.fail(where, f"rabbitmq trigger: unknown metadata key {key}")
            if metadata.get("queueName") != settings["amqp"]["queue"]:
                report.fail(where, f"rabbitmq trigger: queueName {metadata.get('queueName')}, "
                                   f"want amqp.queue {settings['amqp']['queue']}")
            auth = trigger.get("authenticationRef", {}).get("name")
            if auth is not None and auth not in auths:
                report.fail(where, f"authenticationRef {auth} names no TriggerAuthentication")


def main():
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "ops" / "kubernetes"
    settings = tomllib.loads((ROOT / "config" / "default.toml").read_text())
    report = Report()
    documents = load(directory, report)
    valid = []
    for name, doc in documents:
        kind = doc.get("kind", "?") if isinstance(doc, dict) else "?"
        resource = doc.get("metadata", {}).get("name", "?") if isinstance(doc, dict) else "?"
        where = f"{name}: {kind}/{resource}"
        if check_schema(where, doc, report):
            schema = "KEDA model" if kind in KEDA_MODELS else "Kubernetes " + ", ".join(
                v.rsplit(".", 1)[0] for v in KUBERNETES)
            report.ok(where, f"valid ({schema})")
            valid.append((name, doc))
    if len(valid) == len(documents):
        check_product(valid, settings, report)
    if report.failed:
        print("Kubernetes manifests: FAILED")
        sys.exit(1)
    print(f"Kubernetes manifests: {len(documents)} resources valid")


if __name__ == "__main__":
    main()
