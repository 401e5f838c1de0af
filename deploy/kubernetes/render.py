#!/usr/bin/env python3
"""Renders the kustomizations under deploy/kubernetes without kustomize.

kustomize (or `kubectl kustomize`) is the real renderer; this is the fallback for machines
without it, so that the tests (tests/tests/deploy_manifests.rs) can validate every overlay's
output anywhere. It implements only the subset of kustomize these kustomizations use, and
refuses everything else rather than render it differently. Where kustomize is installed the
tests render both ways and require identical objects, which keeps the two in step.

Supported kustomization fields: resources (files and directories), components, namespace,
configMapGenerator (files, literals and envs, with disableNameSuffixHash), generatorOptions,
patches (RFC 6902 JSON patches, inline or from a file, with a target) and images.

    render.py build DIR          the rendered objects as a YAML stream (kustomize build DIR)
    render.py build DIR --json   the same as one JSON array
    render.py json FILE|-        any YAML stream as one JSON array (for tests that read YAML)

Needs PyYAML (kubernetes-validate depends on it, so scripts/setup.sh installs it).
"""

import json
import os
import re
import sys

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {
    "apiVersion", "kind", "resources", "components", "namespace", "configMapGenerator",
    "generatorOptions", "patches", "images",
}
GENERATOR_FIELDS = {"name", "namespace", "behavior", "files", "literals", "envs", "options"}
OPTION_FIELDS = {"disableNameSuffixHash", "labels", "annotations"}
PATCH_FIELDS = {"patch", "path", "target"}
TARGET_FIELDS = {"group", "version", "kind", "name", "namespace"}
IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}

# Kinds without a namespace, among those kustomize's namespace transformer knows.
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass", "IngressClass", "RuntimeClass",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "APIService",
    "CSIDriver", "CSINode", "VolumeAttachment", "Node", "PodSecurityPolicy",
}

# kustomize's default ("legacy") output order: these kinds first, in this order, then every
# other kind, then the webhook configurations; ties by apiVersion, kind, namespace and name.
ORDER_FIRST = [
    "Namespace", "ResourceQuota", "StorageClass", "CustomResourceDefinition", "ServiceAccount",
    "PodSecurityPolicy", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding",
    "ConfigMap", "Secret", "Endpoints", "Service", "LimitRange", "PriorityClass",
    "PersistentVolume", "PersistentVolumeClaim", "Deployment", "StatefulSet", "CronJob",
    "PodDisruptionBudget",
]
ORDER_LAST = ["MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"]


class RenderError(Exception):
    pass


def load_yaml_stream(text, origin):
    try:
        return [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as e:
        raise RenderError(f"{origin}: not valid YAML: {e}") from e


def read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise RenderError(f"cannot read {path}: {e}") from e


def kustomization_file(directory):
    for name in KUSTOMIZATION_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise RenderError(f"{directory}: no kustomization.yaml")


def refuse_unknown(fields, known, where):
    unknown = sorted(set(fields) - known)
    if unknown:
        raise RenderError(
            f"{where}: {', '.join(unknown)} not supported by render.py (use kustomize, or "
            "extend render.py and its cross-check in tests/tests/deploy_manifests.rs)"
        )


def group_of(obj):
    api_version = obj.get("apiVersion", "")
    return api_version.split("/")[0] if "/" in api_version else ""


def version_of(obj):
    return obj.get("apiVersion", "").split("/")[-1]


def object_id(obj):
    meta = obj.get("metadata") or {}
    return (group_of(obj), obj.get("kind"), meta.get("namespace", ""), meta.get("name"))


def build(directory, accumulated=None):
    """Renders the kustomization (or component) in `directory`. A component transforms the
    objects accumulated so far by the kustomization that lists it."""
    path = kustomization_file(directory)
    docs = load_yaml_stream(read(path), path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise RenderError(f"{path}: expected one mapping")
    k = docs[0]
    refuse_unknown(k, SUPPORTED_FIELDS, path)
    kind = k.get("kind", "Kustomization")
    if kind == "Component":
        objects = list(accumulated or [])
    elif kind == "Kustomization":
        if accumulated:
            raise RenderError(f"{path}: a Kustomization listed as a component")
        objects = []
    else:
        raise RenderError(f"{path}: unknown kind {kind}")

    for entry in k.get("resources") or []:
        target = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(target):
            objects += build(target)
        else:
            for doc in load_yaml_stream(read(target), target):
                if not isinstance(doc, dict) or "kind" not in doc:
                    raise RenderError(f"{target}: a document without kind")
                objects.append(doc)
    for generator in k.get("configMapGenerator") or []:
        objects.append(generate_config_map(generator, k.get("generatorOptions") or {}, directory, path))
    for entry in k.get("components") or []:
        objects = build(os.path.normpath(os.path.join(directory, entry)), objects)

    seen = set()
    for obj in objects:
        if object_id(obj) in seen:
            raise RenderError(f"{path}: {object_id(obj)} defined twice")
        seen.add(object_id(obj))

    for patch in k.get("patches") or []:
        apply_patch(patch, objects, directory, path)
    if "namespace" in k:
        set_namespace(objects, k["namespace"])
    for image in k.get("images") or []:
        set_image(image, objects, path)
    return objects


def generate_config_map(generator, global_options, directory, where):
    refuse_unknown(generator, GENERATOR_FIELDS, f"{where}: configMapGenerator")
    if generator.get("behavior", "create") != "create":
        raise RenderError(f"{where}: configMapGenerator behavior other than create")
    options = dict(global_options)
    options.update(generator.get("options") or {})
    refuse_unknown(options, OPTION_FIELDS, f"{where}: generator options")
    if not options.get("disableNameSuffixHash"):
        raise RenderError(
            f"{where}: configMapGenerator {generator.get('name')}: name suffix hashes are not "
            "reproduced by render.py; set options.disableNameSuffixHash: true"
        )
    data = {}
    for literal in generator.get("literals") or []:
        key, sep, value = literal.partition("=")
        if not sep:
            raise RenderError(f"{where}: literal {literal!r} is not key=value")
        data[key] = value
    for env_file in generator.get("envs") or []:
        for number, line in enumerate(read(os.path.join(directory, env_file)).splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep:
                raise RenderError(f"{env_file}:{number}: not key=value")
            data[key] = value
    for entry in generator.get("files") or []:
        key, sep, file_path = entry.partition("=")
        if not sep:
            key, file_path = os.path.basename(entry), entry
        data[key] = read(os.path.join(directory, file_path))
    metadata = {"name": generator["name"]}
    if "namespace" in generator:
        metadata["namespace"] = generator["namespace"]
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    if options.get("annotations"):
        metadata["annotations"] = dict(options["annotations"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def matches(target, obj):
    meta = obj.get("metadata") or {}
    checks = {
        "group": group_of(obj),
        "version": version_of(obj),
        "kind": obj.get("kind"),
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
    }
    for field, actual in checks.items():
        if field in target and not re.fullmatch(str(target[field]), actual or ""):
            return False
    return True


def apply_patch(patch, objects, directory, where):
    refuse_unknown(patch, PATCH_FIELDS, f"{where}: patch")
    target = patch.get("target")
    if not isinstance(target, dict):
        raise RenderError(f"{where}: a patch without target (strategic merge patches are not supported)")
    refuse_unknown(target, TARGET_FIELDS, f"{where}: patch target")
    if "patch" in patch:
        text, origin = patch["patch"], f"{where}: inline patch"
    elif "path" in patch:
        origin = os.path.join(directory, patch["path"])
        text = read(origin)
    else:
        raise RenderError(f"{where}: a patch without patch or path")
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise RenderError(f"{origin}: only RFC 6902 JSON patches (a list of operations) are supported")
    hits = [obj for obj in objects if matches(target, obj)]
    for obj in hits:
        for operation in operations:
            json_patch(obj, operation, origin)


def pointer(path, origin):
    if path == "":
        return []
    if not path.startswith("/"):
        raise RenderError(f"{origin}: JSON pointer {path!r} does not start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def walk(document, parts, origin, path):
    node = document
    for part in parts:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise RenderError(f"{origin}: path {path} does not exist")
    return node


def json_patch(document, operation, origin):
    op, path = operation.get("op"), operation.get("path")
    if op not in ("add", "remove", "replace", "test") or path is None:
        raise RenderError(f"{origin}: unsupported operation {operation}")
    parts = pointer(path, origin)
    if not parts:
        raise RenderError(f"{origin}: operations on the whole document are not supported")
    parent = walk(document, parts[:-1], origin, path)
    last = parts[-1]
    if op == "test":
        if walk(document, parts, origin, path) != operation.get("value"):
            raise RenderError(f"{origin}: test failed: {path} is not {operation.get('value')!r}")
    elif isinstance(parent, dict):
        if op != "add" and last not in parent:
            raise RenderError(f"{origin}: path {path} does not exist")
        if op == "remove":
            del parent[last]
        else:
            parent[last] = operation.get("value")
    elif isinstance(parent, list):
        if op == "add" and last == "-":
            parent.append(operation.get("value"))
            return
        if not last.isdigit() or int(last) > len(parent) or (op != "add" and int(last) == len(parent)):
            raise RenderError(f"{origin}: index {last} out of range in {path}")
        index = int(last)
        if op == "add":
            parent.insert(index, operation.get("value"))
        elif op == "remove":
            del parent[index]
        else:
            parent[index] = operation.get("value")
    else:
        raise RenderError(f"{origin}: {path}: parent is neither an object nor an array")


def set_namespace(objects, namespace):
    """kustomize's namespace transformer: namespaced objects move, Namespace objects are
    renamed, and binding subjects follow the service accounts that moved with them."""
    moved_accounts = {
        ((obj.get("metadata") or {}).get("name"), (obj.get("metadata") or {}).get("namespace", "default"))
        for obj in objects
        if obj.get("kind") == "ServiceAccount"
    }
    for obj in objects:
        if obj.get("kind") == "Namespace":
            obj.setdefault("metadata", {})["name"] = namespace
        if obj.get("kind") in CLUSTER_SCOPED:
            continue
        obj.setdefault("metadata", {})["namespace"] = namespace
    for obj in objects:
        if obj.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        for subject in obj.get("subjects") or []:
            account = (subject.get("name"), subject.get("namespace", "default"))
            if subject.get("kind") == "ServiceAccount" and (account in moved_accounts or account[1] == "default"):
                subject["namespace"] = namespace


def pod_specs(obj):
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        yield spec
    if "template" in spec:
        yield (spec["template"] or {}).get("spec") or {}
    job_template = spec.get("jobTemplate") or {}
    if "template" in (job_template.get("spec") or {}):
        yield job_template["spec"]["template"].get("spec") or {}


def split_image(image):
    """(name, tag or None, digest or None) of an image reference."""
    name, _, digest = image.partition("@")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def set_image(entry, objects, where):
    refuse_unknown(entry, IMAGE_FIELDS, f"{where}: images")
    for obj in objects:
        for spec in pod_specs(obj):
            for container in (spec.get("initContainers") or []) + (spec.get("containers") or []):
                name, tag, digest = split_image(container.get("image", ""))
                if name != entry["name"]:
                    continue
                name = entry.get("newName", name)
                if "digest" in entry:
                    container["image"] = f"{name}@{entry['digest']}"
                elif "newTag" in entry:
                    container["image"] = f"{name}:{entry['newTag']}"
                else:
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def order(obj):
    kind = obj.get("kind")
    if kind in ORDER_FIRST:
        rank = ORDER_FIRST.index(kind)
    elif kind in ORDER_LAST:
        rank = len(ORDER_FIRST) + 1 + ORDER_LAST.index(kind)
    else:
        rank = len(ORDER_FIRST)
    meta = obj.get("metadata") or {}
    return (rank, obj.get("apiVersion", ""), kind, meta.get("namespace", ""), meta.get("name", ""))


def main(argv):
    if len(argv) >= 2 and argv[0] == "build" and argv[2:] in ([], ["--json"]):
        objects = sorted(build(argv[1]), key=order)
        if argv[2:] == ["--json"]:
            json.dump(objects, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            yaml.safe_dump_all(objects, sys.stdout, default_flow_style=False, sort_keys=True)
        return 0
    if len(argv) == 2 and argv[0] == "json":
        text = sys.stdin.read() if argv[1] == "-" else read(argv[1])
        json.dump(load_yaml_stream(text, argv[1]), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except RenderError as e:
        sys.stderr.write(f"render.py: {e}\n")
        sys.exit(1)
