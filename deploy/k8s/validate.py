#!/usr/bin/env python3
"""Renders and checks the Kubernetes manifests of deploy/k8s. Run it through scripts/k8s-validate.sh,
which installs what it needs.

1. Generated files are up to date: the PrometheusRule (from deploy/prometheus/rules.yml) and the
   dashboard's copy (deploy/grafana/agentfleet-dashboard.json). `--write` regenerates them.
2. Every variant renders with `kubectl kustomize`: the base, each overlay, and the base and the
   production overlay with the HPA instead of KEDA.
3. Every rendered document is validated against a schema, strictly (an unknown field fails):
   built-in kinds with kubernetes-validate for each version in K8S_VERSIONS, the KEDA and
   Prometheus-operator kinds against the CRDs shipped in schemas/. A kind with neither fails.
4. The fleet holds together: each Deployment's terminationGracePeriodSeconds exceeds the drain
   deadline of the config file it reads (worker.shutdown_grace_ms, dispatcher.shutdown_grace_ms) by
   MARGIN_S; each worker consumes exactly the pool its label and its ScaledObject's queue say (its
   `--pools`, else AGENTFLEET_POOLS, else the config's worker.pools, as the binary reads them);
   every agent's pool has workers; ports, probes, Secrets, ConfigMaps and selectors resolve, and each
   process has its startup (long enough for the wait for RabbitMQ), liveness and readiness probes;
   every container is locked down and has requests and limits; the fleet's own containers run as
   the UID and GID of the image (the `USER` of deploy/Dockerfile).
"""

from __future__ import annotations

import argparse
import base64
import difflib
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils as kv_utils
import referencing
import yaml

K8S = Path(__file__).resolve().parent
REPO = K8S.parent.parent
RULES = REPO / "deploy/prometheus/rules.yml"
DASHBOARD = REPO / "deploy/grafana/agentfleet-dashboard.json"
DOCKERFILE = REPO / "deploy/Dockerfile"
SCHEMAS = K8S / "schemas"
KUBE_VERSIONS = os.environ.get("K8S_VERSIONS", "1.30 1.34").split()
# Seconds a pod's grace period must leave beyond the process's own drain deadline.
MARGIN_S = 5
BINARIES = {"agentfleet-worker": "worker", "agentfleet-dispatcher": "dispatcher"}
# The defaults of shared/src/config (infra.rs, mod.rs) where a file leaves a field out.
DEFAULT_GRACE_MS = 25_000
DEFAULT_PREFIX = "agentfleet"
DEFAULT_CONCURRENCY = 64
POOL_LABEL = "agentfleet.io/pool"


# ---------------------------------------------------------------------------------------------------
# Generated files


def prometheus_rule() -> str:
    """The PrometheusRule: rules.yml's `groups:` block, indented under `spec:`, comments and all."""
    text = RULES.read_text()
    start = re.search(r"^groups:\s*$", text, re.M)
    if not start:
        raise SystemExit(f"{RULES}: no top-level `groups:` line")
    body = "".join(f"  {line}" if line.strip() else line for line in text[start.start():].splitlines(True))
    head = (
        "# GENERATED from deploy/prometheus/rules.yml by `scripts/k8s-validate.sh --write`: edit that\n"
        "# file, then run the command; CI fails when the two differ.\n"
        "apiVersion: monitoring.coreos.com/v1\n"
        "kind: PrometheusRule\n"
        "metadata:\n"
        "  name: agentfleet\n"
        "  labels:\n"
        "    app.kubernetes.io/name: agentfleet\n"
        "spec:\n"
    )
    return head + body


def agent_pools(cfg: dict) -> list[str]:
    return sorted({agent.get("pool", "default") for agent in cfg.get("agents", {}).values()})


def generated() -> dict[Path, str]:
    return {
        K8S / "base/core/monitoring/prometheusrule.yaml": prometheus_rule(),
        K8S / "base/core/monitoring/agentfleet-dashboard.json": DASHBOARD.read_text(),
    }


def check_generated(write: bool) -> list[str]:
    problems = []
    for path, want in generated().items():
        have = path.read_text() if path.exists() else None
        if have == want:
            continue
        if write:
            path.write_text(want)
            print(f"wrote {path.relative_to(REPO)}")
            continue
        diff = difflib.unified_diff((have or "").splitlines(), want.splitlines(), "committed", "generated", lineterm="")
        shown = "\n".join(list(diff)[:20])
        problems.append(f"{path.relative_to(REPO)} is out of date: run scripts/k8s-validate.sh --write\n{shown}")
    return problems


# ---------------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Variant:
    """One way to render the manifests."""

    name: str
    path: str  # relative to deploy/k8s
    # The render must hold every Secret and ConfigMap it references (no Secret is created by hand).
    self_contained: bool = False
    # Put the HPA component in: "top" (a kustomization around `path`) or "production" (the switch
    # in overlays/production/scaler, in a copy of the tree).
    hpa: str = ""


VARIANTS = [
    Variant("base", "base"),
    Variant("overlays/dev", "overlays/dev", self_contained=True),
    Variant("overlays/production", "overlays/production"),
    Variant("base + components/hpa", "base", hpa="top"),
    Variant("overlays/production + components/hpa", "overlays/production", hpa="production"),
]


def render(variant: Variant, tmp: Path) -> list[dict]:
    root = K8S / variant.path
    if variant.hpa == "top":
        root = tmp / "hpa-top"
        root.mkdir()
        rel = os.path.relpath(K8S, root)
        (root / "kustomization.yaml").write_text(
            f"resources:\n  - {rel}/{variant.path}\ncomponents:\n  - {rel}/components/hpa\n"
        )
    elif variant.hpa == "production":
        copy = tmp / "hpa-production"
        shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("schemas"))
        switch = copy / "overlays/production/scaler/kustomization.yaml"
        text = switch.read_text().replace("# components:\n#   - ../../../components/hpa", "components:\n  - ../../../components/hpa")
        if text == switch.read_text():
            raise SystemExit("overlays/production/scaler/kustomization.yaml: the commented HPA switch is gone")
        switch.write_text(text)
        root = copy / variant.path
    out = subprocess.run([os.environ.get("KUBECTL", "kubectl"), "kustomize", str(root)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RenderError(out.stderr.strip())
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


class RenderError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# Schemas


def strict(node):
    """An OpenAPI schema of a CRD as the API server's strict field validation reads it: an object
    with properties takes no others (the server would prune or, strictly, refuse them)."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict(v) if k != "enum" and k != "default" else v for k, v in node.items()}
    if "properties" in node:
        out["properties"] = {k: strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def kube_definitions(version: str) -> referencing.Resource:
    defs = kv_utils.schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version)
    return referencing.Resource.from_contents(defs)


@functools.cache
def crd_validators(version: str) -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) → a validator, for every served version of every CRD in schemas/."""
    registry = kube_definitions(version) @ referencing.Registry()
    validators = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if not v.get("served"):
                continue
            schema = strict(v["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {
                "$ref": "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
            }
            schema["properties"]["apiVersion"] = {"const": f"{group}/{v['name']}"}
            schema["properties"]["kind"] = {"const": kind}
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            validators[(f"{group}/{v['name']}", kind)] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


# kubernetes-validate reads its schema files from disk on every call; once is enough.
kv_utils.schema_contents = functools.cache(kv_utils.schema_contents)


def schema_problems(doc: dict) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    problems = []
    for version in KUBE_VERSIONS:
        crd = crd_validators(version).get(key)
        if crd:
            errors = sorted(crd.iter_errors(doc), key=lambda e: list(e.path))
            problems += [f"{path_of(e)}: {e.message} (CRD schema)" for e in errors[:5]]
            break  # the CRD's schema does not depend on the Kubernetes version
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{path_of(e)}: {e.message} (Kubernetes {version})")
        except kv_utils.SchemaNotFoundError:
            return [f"no schema for {key[0]} {key[1]}: neither a Kubernetes {version} kind nor a CRD in schemas/"]
    return problems


def path_of(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(document)"


# ---------------------------------------------------------------------------------------------------
# The fleet's own consistency


@dataclass
class Fleet:
    """One render, indexed, and the problems found in it."""

    variant: Variant
    docs: list[dict]
    problems: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict | None:
        return next((d for d in self.of(kind) if d["metadata"]["name"] == name), None)

    def fail(self, doc: dict, message: str) -> None:
        self.problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {message}")


def pod_owners(fleet: Fleet) -> list[dict]:
    return fleet.of("Deployment") + fleet.of("StatefulSet")


def selects(selector: dict | None, labels: dict) -> bool:
    match = (selector or {}).get("matchLabels") or {}
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def check_fleet(fleet: Fleet) -> None:
    for doc in pod_owners(fleet):
        check_pod(fleet, doc)
        for container in doc["spec"]["template"]["spec"]["containers"]:
            role = BINARIES.get((container.get("command") or [""])[0])
            if role:
                check_image_user(fleet, doc, container)
                check_process(fleet, doc, container, role)
    check_autoscaling(fleet)
    check_pools_served(fleet)
    check_pdbs(fleet)
    check_network_policies(fleet)
    check_services(fleet)
    check_monitoring(fleet)


def check_pod(fleet: Fleet, doc: dict) -> None:
    """Locked down, bounded, and every Secret and ConfigMap it names exists (self-contained renders)."""
    pod = doc["spec"]["template"]["spec"]
    pod_sc = pod.get("securityContext") or {}
    if pod.get("automountServiceAccountToken") is not False:
        fleet.fail(doc, "automountServiceAccountToken must be false (the fleet does not call the API)")
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext") or {}
        wanted = {
            "runAsNonRoot": sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True,
            "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
            "allowPrivilegeEscalation: false": sc.get("allowPrivilegeEscalation") is False,
            "capabilities.drop [ALL]": "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
            "seccompProfile RuntimeDefault": (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
            == "RuntimeDefault",
        }
        for what, ok in wanted.items():
            if not ok:
                fleet.fail(doc, f"container {c['name']}: securityContext lacks {what}")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    fleet.fail(doc, f"container {c['name']}: no resources.{kind}.{r}")
        for env in c.get("env", []):
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                check_key(fleet, doc, "Secret", ref["name"], ref["key"], ref.get("optional", False))
    for vol in pod.get("volumes", []):
        if "secret" in vol:
            check_key(fleet, doc, "Secret", vol["secret"]["secretName"], None, vol["secret"].get("optional", False))
        if "configMap" in vol:
            check_key(fleet, doc, "ConfigMap", vol["configMap"]["name"], None, vol["configMap"].get("optional", False))


@functools.cache
def image_user() -> tuple[int, int]:
    """The UID and GID the fleet's image runs as: the one `USER uid:gid` of deploy/Dockerfile."""
    users = set(re.findall(r"^\s*USER\s+(\S+)\s*$", DOCKERFILE.read_text(), re.M))
    m = re.fullmatch(r"(\d+):(\d+)", next(iter(users))) if len(users) == 1 else None
    if not m:
        raise SystemExit(f"{DOCKERFILE.relative_to(REPO)}: expected one numeric `USER uid:gid`, found {sorted(users) or 'none'}")
    return int(m.group(1)), int(m.group(2))


def check_image_user(fleet: Fleet, doc: dict, container: dict) -> None:
    """A container of the fleet's image runs as the image's user, so that what the manifests say (and
    the files and volumes they make writable for it) is what the image expects."""
    uid, gid = image_user()
    pod_sc = doc["spec"]["template"]["spec"].get("securityContext") or {}
    sc = container.get("securityContext") or {}
    for what, want in (("runAsUser", uid), ("runAsGroup", gid)):
        have = sc.get(what, pod_sc.get(what))
        if have != want:
            fleet.fail(doc, f"container {container['name']}: {what} is {have}, the image's USER (deploy/Dockerfile) is {uid}:{gid}")
    if "fsGroup" in pod_sc and pod_sc["fsGroup"] != gid:
        fleet.fail(doc, f"fsGroup is {pod_sc['fsGroup']}, the image's group (deploy/Dockerfile) is {gid}")


def check_key(fleet: Fleet, doc: dict, kind: str, name: str, key: str | None, optional: bool) -> None:
    obj = fleet.get(kind, name)
    if obj is None:
        if kind == "ConfigMap" or (fleet.variant.self_contained and not optional):
            fleet.fail(doc, f"{kind} {name} is not in the render")
        return
    if key is not None and key not in secret_keys(obj) and not optional:
        fleet.fail(doc, f"{kind} {name} has no key {key}")


def secret_keys(obj: dict) -> set[str]:
    return set(obj.get("data") or {}) | set(obj.get("stringData") or {})


def mounted_file(fleet: Fleet, doc: dict, container: dict, path: str) -> tuple[str, dict, str] | None:
    """The volume kind ("configMap"/"secret"), its source object (if rendered) and the key that
    `path` reads in `container`, or None when no ConfigMap or Secret volume holds it."""
    volumes = {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        base = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(base) or "subPath" in mount:
            continue
        vol = volumes.get(mount["name"], {})
        for kind, name_field, obj_kind in (("configMap", "name", "ConfigMap"), ("secret", "secretName", "Secret")):
            if kind in vol:
                return kind, fleet.get(obj_kind, vol[kind][name_field]), path[len(base):]
    return None


def config_of(fleet: Fleet, doc: dict, container: dict) -> dict | None:
    """The parsed config file `container` reads (its `--config`)."""
    args = container.get("args") or []
    if "--config" not in args[:-1]:
        fleet.fail(doc, f"container {container['name']}: give the config file with --config in args")
        return None
    path = args[args.index("--config") + 1]
    found = mounted_file(fleet, doc, container, path)
    if not found or found[0] != "configMap" or found[1] is None:
        fleet.fail(doc, f"--config {path} is not in a mounted, rendered ConfigMap")
        return None
    _, cm, key = found
    if key not in (cm.get("data") or {}):
        fleet.fail(doc, f"--config {path}: ConfigMap {cm['metadata']['name']} has no key {key}")
        return None
    try:
        return tomllib.loads(cm["data"][key])
    except tomllib.TOMLDecodeError as e:
        fleet.fail(cm, f"{key} is not valid TOML: {e}")
        return None


# Container port name → the config key of the address the process serves it on, and its default.
LISTENERS = {
    "worker": {"metrics": ("metrics_listen", "0.0.0.0:9090")},
    "dispatcher": {"http": ("listen", "127.0.0.1:8080"), "ops": ("ops_listen", "127.0.0.1:9090")},
}


# What each process serves on each of those ports, for the probes (worker/src/ops.rs, the
# dispatcher's ops_router).
OPS_PATHS = {
    "worker": {"metrics": {"/healthz", "/readyz", "/metrics"}},
    "dispatcher": {"ops": {"/healthz", "/readyz", "/metrics", "/openapi.json"}},
}


def option_values(container: dict, flag: str) -> list[str] | None:
    """The values given to `flag` on the container's command line (`flag X` or `flag=X`, every
    occurrence in order), or None when it is not there."""
    argv = (container.get("command") or [])[1:] + (container.get("args") or [])
    found = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            found = (found or []) + [argv[i + 1]]
        elif arg.startswith(flag + "="):
            found = (found or []) + [arg[len(flag) + 1 :]]
    return found


UNKNOWN = object()


def env_value(fleet: Fleet, doc: dict, container: dict, name: str):
    """The value of the environment variable `name` in `container`: a string, None when unset, or
    UNKNOWN (and a problem) when the render does not say, e.g. a valueFrom or a Secret that is not in
    the render. `env` wins over `envFrom`; among `envFrom` sources the last one wins."""
    entries = [e for e in container.get("env", []) if e["name"] == name]
    if entries:
        if "valueFrom" in entries[-1]:
            fleet.fail(doc, f"container {container['name']}: {name} comes from valueFrom; give it a literal value so it can be checked")
            return UNKNOWN
        return entries[-1].get("value", "")
    for source in reversed(container.get("envFrom", [])):
        prefix = source.get("prefix", "")
        if not name.startswith(prefix):
            continue
        for field_name, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            if field_name not in source:
                continue
            obj = fleet.get(kind, source[field_name]["name"])
            if obj is None:
                if source[field_name].get("optional"):
                    continue
                fleet.fail(doc, f"container {container['name']}: envFrom {kind} {source[field_name]['name']} is not in the render, so {name} is unknown; set it in env")
                return UNKNOWN
            key = name[len(prefix) :]
            if key in (obj.get("stringData") or {}):
                return obj["stringData"][key]
            if key in (obj.get("data") or {}):
                value = obj["data"][key]
                return base64.b64decode(value).decode() if kind == "Secret" else value
    return None


# The probe each process of the fleet must have, and the path it asks for.
PROBES = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
# Both binaries wait up to 60 s for RabbitMQ at start (connect_patiently), after connecting to Redis:
# the startup probe must allow at least this many seconds before the liveness probe takes over.
STARTUP_BUDGET_S = 90


def listen_address(fleet: Fleet, doc: dict, container: dict, section: dict, key: tuple[str, str]) -> str | None:
    """What the process listens on: the config's value, unless the worker's --metrics-listen or
    AGENTFLEET_METRICS_LISTEN overrides it. None (and a problem) when the render does not say."""
    if key[0] == "metrics_listen":
        flag = option_values(container, "--metrics-listen")
        if flag is not None:
            return flag[-1]
        env = env_value(fleet, doc, container, "AGENTFLEET_METRICS_LISTEN")
        if env is UNKNOWN:
            return None
        if env is not None:
            return env
    return section.get(key[0], key[1])


def worker_pools(fleet: Fleet, doc: dict, container: dict, cfg: dict) -> list[str] | None:
    """The pools a worker consumes, settled as agentfleet-worker does (worker/src/cli.rs, clap): its
    `--pools` (comma-separated, repeatable), else AGENTFLEET_POOLS (comma-separated), else the config's
    worker.pools, else ["default"]. None, with a problem, when that cannot be told or a name is
    invalid (the binary would refuse to start)."""
    given, source = option_values(container, "--pools"), "--pools"
    if given is None:
        env = env_value(fleet, doc, container, "AGENTFLEET_POOLS")
        if env is UNKNOWN:
            return None
        given, source = (None, "") if env is None else ([env], "AGENTFLEET_POOLS")
    if given is None:
        return list(cfg.get("worker", {}).get("pools", ["default"]))
    pools = [p.strip() for value in given for p in value.split(",")]
    bad = [p for p in pools if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", p)]
    if bad:
        fleet.fail(doc, f"{source} {','.join(given)!r}: not pool names (1-64 of A-Z a-z 0-9 _ -): {bad}")
        return None
    return pools


def port_of(listen: str) -> int | None:
    m = re.fullmatch(r"(?:0\.0\.0\.0|\[::\]):(\d+)", listen or "")
    return int(m.group(1)) if m else None


def check_process(fleet: Fleet, doc: dict, container: dict, role: str) -> None:
    cfg = config_of(fleet, doc, container)
    if cfg is None:
        return
    pod = doc["spec"]["template"]["spec"]
    section = cfg.get(role, {})
    # The drain deadline (the dispatcher's serves drain_delay_ms first), and the grace period
    # around it; a preStop pause, if any, comes before SIGTERM and counts too.
    grace_s = section.get("shutdown_grace_ms", DEFAULT_GRACE_MS) / 1000
    delay_s = section.get("drain_delay_ms", 0) / 1000 if role == "dispatcher" else 0
    pre_stop = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds", 0)
    period = pod.get("terminationGracePeriodSeconds", 30)
    need = math.ceil(pre_stop + delay_s + grace_s + MARGIN_S)
    if period < need:
        parts = [f"{role}.shutdown_grace_ms {grace_s:g} s"]
        parts += [f"{role}.drain_delay_ms {delay_s:g} s"] if delay_s else []
        parts += [f"preStop {pre_stop} s"] if pre_stop else []
        fleet.fail(doc, f"terminationGracePeriodSeconds {period} must be at least {need}: {' + '.join(parts)} + {MARGIN_S} s margin")
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    for port_name, key in LISTENERS[role].items():
        listen = listen_address(fleet, doc, container, section, key)
        if listen is None:
            continue
        port = port_of(listen)
        if port is None:
            fleet.fail(doc, f"{role}.{key[0]} must listen on 0.0.0.0:<port> (a Service or Prometheus reaches it)")
        elif ports.get(port_name) != port:
            fleet.fail(doc, f"container port {port_name} is {ports.get(port_name)}, {role}.{key[0]} says {port}")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        http = (container.get(probe) or {}).get("httpGet")
        if not http:
            continue
        by_number = {number: name for name, number in ports.items()}
        port_name = http["port"] if http["port"] in ports else by_number.get(http["port"])
        if port_name not in OPS_PATHS[role]:
            fleet.fail(doc, f"{probe} targets port {http['port']}, where the {role} serves no probe endpoint")
        elif http.get("path") not in OPS_PATHS[role][port_name]:
            fleet.fail(doc, f"{probe} asks for {http.get('path')}, which port {port_name} does not serve")
    for probe, path in PROBES.items():
        http = (container.get(probe) or {}).get("httpGet") or {}
        if http.get("path") != path:
            fleet.fail(doc, f"container {container['name']}: needs a {probe} with httpGet {path}, has {http.get('path') or 'none'}")
    startup = container.get("startupProbe") or {}
    budget = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if startup and budget < STARTUP_BUDGET_S:
        fleet.fail(doc, f"container {container['name']}: the startupProbe allows {budget} s, less than {STARTUP_BUDGET_S} s (Redis, then up to 60 s for RabbitMQ)")
    if role == "worker":
        check_worker_pool(fleet, doc, worker_pools(fleet, doc, container, cfg))
    for i, token in enumerate(cfg.get("auth", {}).get("tokens", [])):
        if "sha256_file" in token:
            check_token_file(fleet, doc, container, token["sha256_file"], i)


def check_worker_pool(fleet: Fleet, doc: dict, pools: list[str] | None) -> None:
    label = doc["spec"]["template"]["metadata"]["labels"].get(POOL_LABEL)
    if pools is not None and pools != [label]:
        fleet.fail(doc, f"its pods are labelled {POOL_LABEL}={label}, its workers consume the pools {pools}")


def check_token_file(fleet: Fleet, doc: dict, container: dict, path: str, i: int) -> None:
    found = mounted_file(fleet, doc, container, path)
    if not found or found[0] != "secret":
        fleet.fail(doc, f"auth.tokens[{i}].sha256_file {path} is not in a mounted Secret")
    elif found[1] is not None and found[2] not in secret_keys(found[1]):
        fleet.fail(doc, f"auth.tokens[{i}].sha256_file {path}: Secret {found[1]['metadata']['name']} has no key {found[2]}")


def processes(fleet: Fleet, binary: str) -> list[tuple[dict, dict, dict]]:
    """(Deployment, container, its parsed config) of every Deployment running `binary` whose config
    parses."""
    out = []
    for doc in fleet.of("Deployment"):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if (c.get("command") or [""])[0] == binary:
                quiet = Fleet(fleet.variant, fleet.docs)  # check_process reports the problems
                cfg = config_of(quiet, doc, c)
                if cfg is not None:
                    out.append((doc, c, cfg))
    return out


def workers(fleet: Fleet) -> list[tuple[dict, dict, list[str] | None]]:
    """(Deployment, its config, the pools it consumes or None when they cannot be told) of every
    worker whose config parses."""
    quiet = Fleet(fleet.variant, fleet.docs)  # check_process reports the problems
    return [(doc, cfg, worker_pools(quiet, doc, container, cfg)) for doc, container, cfg in processes(fleet, "agentfleet-worker")]


def check_autoscaling(fleet: Fleet) -> None:
    """Each worker Deployment has one autoscaler or fixed replicas; a ScaledObject scales on the step
    queue of the pool its target consumes."""
    configs = {d["metadata"]["name"]: (cfg, pools) for d, cfg, pools in workers(fleet)}
    scalers: dict[str, list[str]] = {name: [] for name in configs}
    for so in fleet.of("ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        scalers.setdefault(target, []).append(f"ScaledObject/{so['metadata']['name']}")
        if target not in configs:
            fleet.fail(so, f"scales {target}, which is not a worker Deployment (with a valid config) of this render")
            continue
        cfg, pools = configs[target]
        if pools is not None:  # else check_process has said why
            check_rabbitmq_triggers(fleet, so, cfg, pools)
    for hpa in fleet.of("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        scalers.setdefault(target, []).append(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}")
        if fleet.get("Deployment", target) is None:
            fleet.fail(hpa, f"scales {target}, which is not in this render")
    for name, found in scalers.items():
        deployment = fleet.get("Deployment", name)
        if deployment is None:
            continue
        fixed = "replicas" in deployment["spec"]
        if len(found) > 1 or (found and fixed) or (not found and not fixed):
            what = ", ".join(found) or "none"
            fleet.fail(deployment, f"needs one autoscaler or fixed replicas, has replicas={fixed} and {what}")


def check_rabbitmq_triggers(fleet: Fleet, so: dict, cfg: dict, pools: list[str]) -> None:
    prefix = cfg.get("amqp", {}).get("prefix", DEFAULT_PREFIX)
    queues = {f"{prefix}.steps.{p}" for p in pools}
    triggers = [t for t in so["spec"].get("triggers", []) if t.get("type") == "rabbitmq"]
    if not triggers:
        fleet.fail(so, "has no rabbitmq trigger")
    for t in triggers:
        meta = t.get("metadata", {})
        if meta.get("queueName") not in queues:
            fleet.fail(so, f"queueName {meta.get('queueName')} is not the step queue of its workers ({sorted(queues)})")
        if meta.get("protocol") != "http" or meta.get("mode") != "QueueLength":
            fleet.fail(so, "use protocol http and mode QueueLength: over AMQP the steps in flight are not counted")
        concurrency = cfg.get("worker", {}).get("concurrency", DEFAULT_CONCURRENCY)
        if not 0 < float(meta.get("value", 0)) <= concurrency:
            fleet.fail(so, f"value {meta.get('value')} must be in (0, worker.concurrency = {concurrency}]")
        auth = (t.get("authenticationRef") or {}).get("name")
        ta = fleet.get("TriggerAuthentication", auth) if auth else None
        if ta is None:
            fleet.fail(so, f"authenticationRef {auth} is not a TriggerAuthentication of this render")
        elif not any(r.get("parameter") == "host" for r in ta["spec"].get("secretTargetRef", [])):
            fleet.fail(ta, "gives no `host` from a Secret")
        else:
            for ref in ta["spec"]["secretTargetRef"]:
                check_key(fleet, ta, "Secret", ref["name"], ref["key"], False)


def check_pools_served(fleet: Fleet) -> None:
    """Every pool the dispatcher publishes to (its agents' pools) is consumed by some worker
    Deployment: otherwise that pool's steps wait in their queue forever."""
    served = {p for _, _, pools in workers(fleet) for p in pools or []}
    for doc, _, cfg in processes(fleet, "agentfleet-dispatcher"):
        for pool in sorted(set(agent_pools(cfg)) - served):
            fleet.fail(doc, f"its agents use pool {pool}, which no worker Deployment consumes")


def check_pdbs(fleet: Fleet) -> None:
    pdbs = fleet.of("PodDisruptionBudget")
    for doc in fleet.of("Deployment"):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        mine = [p["metadata"]["name"] for p in pdbs if selects(p["spec"].get("selector"), labels)]
        if len(mine) != 1:
            fleet.fail(doc, f"needs exactly one PodDisruptionBudget selecting its pods, has {mine or 'none'}")
    for pdb in pdbs:
        if not any(selects(pdb["spec"].get("selector"), d["spec"]["template"]["metadata"]["labels"]) for d in pod_owners(fleet)):
            fleet.fail(pdb, "selects no pods of this render")


def check_network_policies(fleet: Fleet) -> None:
    """Every pod of the fleet's own processes is under a NetworkPolicy for both directions."""
    policies = fleet.of("NetworkPolicy")
    for binary in BINARIES:
        for doc, _, _ in processes(fleet, binary):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            types = {t for p in policies if selects(p["spec"].get("podSelector"), labels) for t in p["spec"].get("policyTypes", [])}
            if not {"Ingress", "Egress"} <= types:
                fleet.fail(doc, f"its pods need a NetworkPolicy for Ingress and Egress, have {sorted(types) or 'none'}")


def check_services(fleet: Fleet) -> None:
    for svc in fleet.of("Service"):
        selector = svc["spec"].get("selector") or {}
        pods = [d for d in pod_owners(fleet) if selects({"matchLabels": selector}, d["spec"]["template"]["metadata"]["labels"])]
        if not pods:
            fleet.fail(svc, "selects no pods of this render")
            continue
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for pod in pods:
                names = {p.get("name") for c in pod["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
                numbers = {p["containerPort"] for c in pod["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
                if target not in names and target not in numbers:
                    fleet.fail(svc, f"port {port.get('name')} targets {target}, which {pod['metadata']['name']} lacks")


def check_monitoring(fleet: Fleet) -> None:
    for sm in fleet.of("ServiceMonitor"):
        services = [s for s in fleet.of("Service") if selects(sm["spec"].get("selector"), s["metadata"].get("labels") or {})]
        ports = {p.get("name") for s in services for p in s["spec"].get("ports", [])}
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("port") not in ports:
                fleet.fail(sm, f"endpoint port {ep.get('port')} is on none of the Services it selects")
    for rule in fleet.of("PrometheusRule"):
        if rule["spec"].get("groups") != yaml.safe_load(RULES.read_text()).get("groups"):
            fleet.fail(rule, f"its groups differ from {RULES.relative_to(REPO)}")
    dashboards = [cm for cm in fleet.of("ConfigMap") if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") == "1"]
    if len(dashboards) != 1:
        fleet.problems.append(f"expected one ConfigMap labelled grafana_dashboard=1, found {len(dashboards)}")
    for cm in dashboards:
        if json.loads(next(iter(cm["data"].values()))) != json.loads(DASHBOARD.read_text()):
            fleet.fail(cm, f"differs from {DASHBOARD.relative_to(REPO)}")


def control_problems(docs: list[dict]) -> list[str]:
    """Broken copies of rendered documents that the schema checks must refuse. One that passes
    means the validation has stopped validating (a schema not loaded, strictness lost)."""
    import copy

    def broken(kind: str, where: str) -> dict | None:
        doc = next((copy.deepcopy(d) for d in docs if d["kind"] == kind), None)
        if doc is not None:
            node = doc
            for key in where.split("."):
                node = node[int(key)] if isinstance(node, list) else node[key]
            node["notAField"] = 1
        return doc

    controls = [
        broken("ScaledObject", "spec"),
        broken("ScaledObject", "spec.triggers.0"),
        broken("TriggerAuthentication", "spec.secretTargetRef.0"),
        broken("ServiceMonitor", "spec.endpoints.0"),
        broken("PrometheusRule", "spec.groups.0.rules.0"),
        broken("Deployment", "spec.template.spec.containers.0"),
        broken("Service", "spec"),
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "unknown-kind"}},
    ]
    missing = len([c for c in controls if c is None])
    problems = [f"negative control: the base has no document to break ({missing} missing)"] if missing else []
    for doc in filter(None, controls):
        if not schema_problems(doc):
            problems.append(f"negative control: a broken {doc['kind']} passed the schema checks")
    return problems


def fleet_control_problems(variant: Variant, docs: list[dict]) -> list[str]:
    """Broken copies of a render (production's: several pools) that the fleet checks must refuse,
    when they pass the render itself. One that passes means a check has stopped checking."""
    import copy

    def problems_of(d: list[dict]) -> set[str]:
        fleet = Fleet(variant, d)
        check_fleet(fleet)
        return set(fleet.problems)

    def worker(d: list[dict]) -> dict | None:
        """The container of a worker Deployment of a pool other than `default` (the fallback)."""
        return next(
            (
                c
                for doc in d
                if doc["kind"] == "Deployment" and doc["spec"]["template"]["metadata"]["labels"].get(POOL_LABEL) != "default"
                for c in doc["spec"]["template"]["spec"]["containers"]
                if (c.get("command") or [""])[0] == "agentfleet-worker"
            ),
            None,
        )

    def pools_env(d: list[dict]) -> dict | None:
        c = worker(d)
        return next((e for e in (c or {}).get("env", []) if e["name"] == "AGENTFLEET_POOLS"), None)

    def wrong_env(d: list[dict]) -> bool:
        env = pools_env(d)
        if env is not None:
            env["value"] = "default"
        return env is not None

    def flag_over_env(d: list[dict]) -> bool:
        c = worker(d)
        if c is not None and pools_env(d) is not None:
            c["args"] = (c.get("args") or []) + ["--pools", "default"]
        return c is not None and pools_env(d) is not None

    def env_removed(d: list[dict]) -> bool:
        c = worker(d)
        if c is not None and pools_env(d) is not None:
            c["env"] = [e for e in c["env"] if e["name"] != "AGENTFLEET_POOLS"]
            return True
        return False

    def dispatcher_pod(d: list[dict]) -> dict | None:
        return next((doc["spec"]["template"]["spec"] for doc in d if doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("dispatcher")), None)

    def wrong_pod_user(d: list[dict]) -> bool:
        pod = dispatcher_pod(d)
        if pod is not None:
            pod.setdefault("securityContext", {})["runAsUser"] = 10001
        return pod is not None

    def wrong_container_group(d: list[dict]) -> bool:
        c = worker(d)
        if c is not None:
            c.setdefault("securityContext", {})["runAsGroup"] = 10001
        return c is not None

    def no_startup_probe(d: list[dict]) -> bool:
        c = worker(d)
        return c is not None and c.pop("startupProbe", None) is not None

    def short_startup_probe(d: list[dict]) -> bool:
        c = worker(d)
        if c is not None and "startupProbe" in c:
            c["startupProbe"].update(periodSeconds=10, failureThreshold=3)
            return True
        return False

    def readiness_on_healthz(d: list[dict]) -> bool:
        c = worker(d)
        if c is not None and "readinessProbe" in c:
            c["readinessProbe"]["httpGet"]["path"] = "/healthz"
            return True
        return False

    controls = {
        "a worker without a startupProbe": no_startup_probe,
        "a worker whose startupProbe allows 30 s": short_startup_probe,
        "a worker whose readinessProbe asks for /healthz": readiness_on_healthz,
        "a dispatcher pod with the wrong runAsUser": wrong_pod_user,
        "a worker container with the wrong runAsGroup": wrong_container_group,
        "a worker with a wrong AGENTFLEET_POOLS": wrong_env,
        "a worker whose --pools overrides its AGENTFLEET_POOLS with a wrong pool": flag_over_env,
        "a worker without AGENTFLEET_POOLS (the config's pools apply)": env_removed,
    }
    clean = problems_of(docs)
    if clean:
        # A break could repeat a problem the render already has, and these are reported anyway: the
        # controls prove the checks on a render that passes them.
        return []
    problems = []
    for what, breaks in controls.items():
        broken = copy.deepcopy(docs)
        if not breaks(broken):
            problems.append(f"negative control: {variant.name} has nothing to break for {what}")
        elif not problems_of(broken):
            problems.append(f"negative control: {what} passed the fleet checks")
    return problems


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="regenerate the generated files, then check")
    args = parser.parse_args()
    known = {kv_utils.major_minor(v) for v in kv_utils.all_versions()}
    for version in KUBE_VERSIONS:
        if version not in known:
            raise SystemExit(f"kubernetes-validate {kv_utils.__version__} has no schemas of Kubernetes {version} (K8S_VERSIONS)")
    problems = check_generated(args.write)
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(VARIANTS):
            scratch = Path(tmp) / str(i)
            scratch.mkdir()
            try:
                docs = render(variant, scratch)
            except RenderError as e:
                problems.append(f"{variant.name}: kubectl kustomize failed: {e}")
                continue
            if variant.name == "base":
                problems += control_problems(docs)
            if variant.name == "overlays/production":
                problems += fleet_control_problems(variant, docs)
            fleet = Fleet(variant, docs)
            for doc in docs:
                for p in schema_problems(doc):
                    fleet.fail(doc, p)
            check_fleet(fleet)
            kinds = sorted({d["kind"] for d in docs})
            print(f"{variant.name}: {len(docs)} documents ({', '.join(kinds)}), {len(fleet.problems)} problems")
            problems += [f"{variant.name}: {p}" for p in dict.fromkeys(fleet.problems)]
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problems", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
