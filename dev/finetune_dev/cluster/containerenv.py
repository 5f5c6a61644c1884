"""A container's environment as a kubelet builds it: envFrom, then env (values, fieldRef,
resourceFieldRef, configMapKeyRef, secretKeyRef) with $(VAR) expansion, over a base environment.

`pod` is the pod as the API server has it, with status.podIP and status.hostIP already filled in.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping

from kubernetes.utils import parse_quantity

# Looks up a ConfigMap or Secret by (namespace, name); None if it does not exist.
ObjectLookup = Callable[[str, str], "dict | None"]


class ContainerConfigError(Exception):
    """The container cannot start yet (a missing ConfigMap, Secret or key); reported as
    CreateContainerConfigError, and retried like a kubelet does."""


def container_env(
    pod: dict,
    container: dict,
    base: Mapping[str, str],
    config_map: ObjectLookup,
    secret: ObjectLookup,
    node_allocatable: Mapping[str, str],
) -> dict[str, str]:
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for key, value in _env_from_values(namespace, source, config_map, secret).items():
            env[prefix + key] = value
    for variable in container.get("env") or []:
        name = variable["name"]
        if "valueFrom" in variable:
            value = _value_from(pod, container, variable["valueFrom"], config_map, secret, node_allocatable)
            if value is None:  # an optional reference that is missing: the variable is left out
                continue
            env[name] = value
        else:
            env[name] = expand(variable.get("value", ""), env)
    return env


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, `$$` is a literal `$`, and
    references to undefined variables are left as they are."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([^)]*)\)", replace, text)


def field_value(pod: dict, field_path: str) -> str:
    """The value of a downward-API fieldRef such as metadata.labels['app'] or status.podIP."""
    metadata, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", field_path)
    if keyed:
        return (metadata.get(keyed.group(1)) or {}).get(keyed.group(2), "")
    if field_path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(field_path.split(".")[1]) or {}
        return "\n".join(f'{key}="{value}"' for key, value in sorted(values.items()))
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.podIPs": ",".join(entry["ip"] for entry in status.get("podIPs") or []),
    }
    if field_path not in simple:
        raise ContainerConfigError(f"unsupported fieldRef fieldPath {field_path!r}")
    return simple[field_path] or ""


def resource_value(pod: dict, container_name: str, resource_ref: dict, node_allocatable: Mapping[str, str]) -> str:
    """A resourceFieldRef's value: the container's limit (or request), else the node's allocatable,
    divided by the divisor and rounded up, as the downward API does."""
    name = resource_ref.get("containerName") or container_name
    container = next((c for c in pod["spec"]["containers"] if c["name"] == name), None)
    if container is None:
        raise ContainerConfigError(f"resourceFieldRef names unknown container {name!r}")
    kind, _, resource = resource_ref["resource"].partition(".")
    quantity = ((container.get("resources") or {}).get(kind) or {}).get(resource)
    if quantity is None:
        quantity = node_allocatable.get(resource, "0")
    divisor = parse_quantity(resource_ref.get("divisor") or "1")
    return str(math.ceil(parse_quantity(quantity) / divisor))


def _value_from(
    pod: dict,
    container: dict,
    value_from: dict,
    config_map: ObjectLookup,
    secret: ObjectLookup,
    node_allocatable: Mapping[str, str],
) -> str | None:
    namespace = pod["metadata"]["namespace"]
    if "fieldRef" in value_from:
        return field_value(pod, value_from["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in value_from:
        return resource_value(pod, container["name"], value_from["resourceFieldRef"], node_allocatable)
    if "configMapKeyRef" in value_from:
        return _key_value(namespace, "ConfigMap", value_from["configMapKeyRef"], config_map, _config_map_data)
    if "secretKeyRef" in value_from:
        return _key_value(namespace, "Secret", value_from["secretKeyRef"], secret, _secret_data)
    raise ContainerConfigError(f"unsupported valueFrom {sorted(value_from)}")


def _key_value(
    namespace: str,
    kind: str,
    ref: dict,
    lookup: ObjectLookup,
    data_of: Callable[[dict], dict[str, str]],
) -> str | None:
    optional = ref.get("optional", False)
    found = lookup(namespace, ref["name"])
    if found is None:
        if optional:
            return None
        raise ContainerConfigError(f'{kind.lower()} "{ref["name"]}" not found')
    data = data_of(found)
    if ref["key"] not in data:
        if optional:
            return None
        raise ContainerConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
    return data[ref["key"]]


def _env_from_values(namespace: str, source: dict, config_map: ObjectLookup, secret: ObjectLookup) -> dict[str, str]:
    if "configMapRef" in source:
        ref, lookup, data_of, kind = source["configMapRef"], config_map, _config_map_data, "configmap"
    elif "secretRef" in source:
        ref, lookup, data_of, kind = source["secretRef"], secret, _secret_data, "secret"
    else:
        raise ContainerConfigError(f"unsupported envFrom source {sorted(source)}")
    found = lookup(namespace, ref["name"])
    if found is None:
        if ref.get("optional", False):
            return {}
        raise ContainerConfigError(f'{kind} "{ref["name"]}" not found')
    return data_of(found)


def _config_map_data(config_map: dict) -> dict[str, str]:
    return dict(config_map.get("data") or {})


def _secret_data(secret: dict) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in (secret.get("data") or {}).items()}
