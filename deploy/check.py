"""Check deploy/kubernetes against the Kubernetes API and against Airlock.

1. Every manifest, and the config Secret kustomize generates, validates
   against the API schemas (kubernetes-validate, strict: an unknown or
   misspelt field fails) of the oldest and the newest Kubernetes we name.
2. The manifests agree with each other and with airlock.toml: the config
   and backend Secrets are mounted where airlock.toml and the container's
   arguments say, the data directory and the port are the config's, the
   probes are /healthz and /readyz, the Service and the budget select the
   DaemonSet's pods.
3. `airlock serve --check` accepts airlock.toml as the pods would read it
   (the example backend Secret's files at their mount path, the guest
   image's files present).

Usage: python deploy/check.py path/to/airlock
"""

import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib

import kubernetes_validate
import yaml

HERE = pathlib.Path(__file__).resolve().parent / "kubernetes"
VERSIONS = ["1.29.0", "1.37.0"]


def fail(message):
    print(f"deploy/check.py: {message}", file=sys.stderr)
    sys.exit(1)


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def main():
    if len(sys.argv) != 2:
        fail("usage: check.py path/to/airlock")
    airlock = sys.argv[1]
    kustomization = yaml.safe_load((HERE / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"] + ["backends.example.yaml"]:
        docs += documents(HERE / name)
    # The Secret kustomize makes from airlock.toml.
    generated = kustomization["secretGenerator"][0]
    config_text = (HERE / generated["files"][0]).read_text()
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": generated["name"],
                "namespace": kustomization["namespace"],
                "labels": generated["options"]["labels"],
            },
            "type": "Opaque",
            "stringData": {generated["files"][0]: config_text},
        }
    )

    # 1. The API schemas.
    for doc in docs:
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}): {e.message} at {list(e.path)}")
    print(f"{len(docs)} resources valid against Kubernetes {' and '.join(VERSIONS)} (strict)")

    # 2. The manifests against each other and airlock.toml.
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    ds = by_kind[("DaemonSet", "airlock")]
    pod = ds["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    config = tomllib.loads(config_text)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    def secret_dir(secret):
        for name, v in volumes.items():
            if v.get("secret", {}).get("secretName") == secret:
                if ("Secret", secret) not in by_kind:
                    fail(f"the pod mounts Secret {secret}, which no manifest makes")
                return mounts[name], by_kind[("Secret", secret)]
        fail(f"the pod does not mount Secret {secret}")

    args = container["args"]
    config_path = pathlib.PurePosixPath(args[args.index("--config") + 1])
    config_dir, _ = secret_dir(generated["name"])
    if str(config_path) != f"{config_dir}/{generated['files'][0]}":
        fail(f"--config {config_path} is not where Secret {generated['name']} is mounted ({config_dir})")
    backends_dir, backends = secret_dir("airlock-backends")
    for key in [config["storage"]["url_file"], config["blobs"]["credentials_file"]]:
        path = pathlib.PurePosixPath(key)
        if str(path.parent) != backends_dir or path.name not in backends["stringData"]:
            fail(f"airlock.toml reads {key}, which Secret airlock-backends does not put there")
    if mounts.get("data") != config["data_dir"]:
        fail(f"data_dir {config['data_dir']} is not the data volume's mount ({mounts.get('data')})")
    port = int(config["listen"].rsplit(":", 1)[1])
    (container_port,) = container["ports"]
    if container_port["containerPort"] != port:
        fail(f"the container port {container_port['containerPort']} is not listen's {port}")
    if container["readinessProbe"]["httpGet"]["path"] != "/readyz":
        fail("the readiness probe must ask /readyz (the database answers)")
    if container["livenessProbe"]["httpGet"]["path"] != "/healthz":
        fail("the liveness probe must ask /healthz")
    if mounts.get("kvm") != "/dev/kvm":
        fail("the pod needs /dev/kvm for VM isolation")
    for kind, name in [("Service", "airlock"), ("PodDisruptionBudget", "airlock")]:
        spec = by_kind[(kind, name)]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        if any(labels.get(k) != v for k, v in selector.items()):
            fail(f"{kind} {name} selects {selector}, not the DaemonSet's pods {labels}")
    print("manifests agree with each other and with airlock.toml")

    # 3. airlock itself reads the config as a pod would.
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        text = config_text
        secrets = tmp / "secrets"
        secrets.mkdir()
        for key, value in backends["stringData"].items():
            (secrets / key).write_text(value)
        text = text.replace(backends_dir + "/", f"{secrets}/")
        image = tmp / "image"
        image.mkdir()
        for key in ["kernel", "initrd"]:
            path = pathlib.PurePosixPath(config["isolation"][key])
            (image / path.name).write_bytes(b"placeholder")
            text = text.replace(str(path), str(image / path.name))
        (tmp / "airlock.toml").write_text(text)
        out = subprocess.run(
            [airlock, "serve", "--check", "--config", str(tmp / "airlock.toml"), "--data-dir", str(tmp / "data")],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            fail(f"airlock serve --check refused airlock.toml: {out.stderr.strip()}")
        print(f"airlock serve --check: {out.stdout.strip()}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
