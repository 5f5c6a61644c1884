"""Builds the operator and trainer images with no Docker and no registry, and imports them into containerd.

The Dockerfiles stay the one recipe: a Debian bookworm base is made with debootstrap (its mirror is the
one apt uses here), then buildah runs each Dockerfile's own instructions against it (BASE build arg),
with host networking for the RUN steps and the host's pip settings passed in (the folder of local wheels
holding the CPU torch build, the CA bundle; local paths are bind-mounted at the same path). Each image
is exported as a docker-archive tar named by the hash of its inputs (Dockerfile, lock, sources, base,
build args), so an unchanged tree never builds twice, then imported with `ctr images import`.

    python -m finetune_dev.images                 # build (or find) both archives, print their paths
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

from finetune_dev.cluster.build import cache_root, exclusive_lock
from finetune_dev.cluster.errors import ClusterError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "ghcr.io/finetune-operator"
DOCKERFILES = {"operator": REPO / "operator" / "Dockerfile", "trainer": REPO / "trainer" / "Dockerfile"}
BUILD_ARGS = {"operator": {}, "trainer": {"TORCH_VARIANT": "cpu"}}
# What the build context sends (see .dockerignore), and what a source file never is.
CONTEXT = ("pyproject.toml", "README.md", "constraints.txt", ".dockerignore", "operator", "trainer")
IGNORED = re.compile(r"(^|/)(__pycache__|[^/]*\.egg-info)(/|$)|\.pyc$|^(operator|trainer)/Dockerfile$")
CONTAINERD_NAMESPACE = "k8s.io"  # the CRI plugin's, where the kubelet looks for images
INPUTS_LABEL = "dev.finetune.inputs"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# Left out of the base, as slim images do: package caches and lists, logs, documentation, translations.
LEFTOVERS = (
    "var/cache/apt/*.bin",
    "var/cache/apt/archives/*.deb",
    "var/lib/apt/lists/*_*",
    "var/log/*",
    "usr/share/doc/*",
    "usr/share/man/*",
    "usr/share/info/*",
    "usr/share/locale/*",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# The pip settings a build receives (as the Dockerfiles' ARGs of the same name), by `pip config` key.
PIP_SETTINGS = {"index-url": "PIP_INDEX_URL", "find-links": "PIP_FIND_LINKS", "cert": "PIP_CERT"}
KEPT = 3
# buildah's own storage (layer cache of earlier builds) is trimmed past this size.
STORAGE_LIMIT = 8 * 2**30
# Bump when this module builds differently, so that cached archives are rebuilt.
RECIPE = "2"


def app_version() -> str:
    chart = yaml.safe_load((REPO / "charts" / "finetune-operator" / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def image_refs() -> dict[str, str]:
    """The chart's default image references, which the embedded cluster's images are tagged with."""
    return {role: f"{REGISTRY}/{role}:{app_version()}" for role in DOCKERFILES}


def ensure_images(containerd_address: str) -> dict[str, str]:
    """Build both images unless cached, import them into containerd's "k8s.io" namespace, return their refs.

    An image already imported from the same inputs is not imported again.
    """
    refs = image_refs()
    ctr = ["ctr", "-a", containerd_address, "-n", CONTAINERD_NAMESPACE, "images"]
    for role, archive in build_images().items():
        # The archive's name carries its inputs' hash; containerd keeps it as a label of the imported image.
        label = f"{INPUTS_LABEL}={archive.stem.rpartition('-')[2]}"
        query = f'name=={refs[role]},labels."{INPUTS_LABEL}"=={label.partition("=")[2]}'
        listed = subprocess.run([*ctr, "ls", "-q", query], capture_output=True, text=True)
        if listed.returncode == 0 and listed.stdout.split() == [refs[role]]:
            continue
        _step(f"importing the {role} image into containerd", [*ctr, "import", str(archive)], f"import-{archive.stem}")
        _step(f"labelling the {role} image in containerd", [*ctr, "label", refs[role], label], f"label-{archive.stem}")
    _drop_replaced_images(ctr)
    return refs


def _drop_replaced_images(ctr: list[str]) -> None:
    """Remove the images no name points to any more: the references by ID (`sha256:...`) that containerd's
    CRI plugin keeps of an image whose name an import has moved to a newer build. Left, each would keep a
    replaced build's layers in the machine's shared image store (gigabytes per trainer change)."""
    listed = subprocess.run([*ctr, "ls"], capture_output=True, text=True)
    rows = [line.split() for line in listed.stdout.splitlines()[1:] if line.strip()]
    named = {row[2] for row in rows if not row[0].startswith("sha256:")}
    replaced = [row[0] for row in rows if row[0].startswith("sha256:") and row[2] not in named]
    if replaced:  # --sync: containerd's garbage collection has freed their layers when this returns
        _step("removing replaced images from containerd", [*ctr, "rm", "--sync", *replaced], "remove-replaced")


def build_images() -> dict[str, Path]:
    """The docker-archive tar of each image, built now unless one with the same inputs exists."""
    require_tools()
    pip_args, volumes = pip_settings()
    archives = {}
    with exclusive_lock(images_dir() / "build.lock", "the images"):  # the others then find them cached
        base = base_image_id()
        for role, dockerfile in DOCKERFILES.items():
            args = {**BUILD_ARGS[role], **pip_args}
            archive = images_dir() / f"{role}-{inputs_hash(dockerfile, base, args, volumes)}.tar"
            if not archive.exists():
                _build(role, dockerfile, ensure_base(), args, volumes, archive)
            archive.touch()  # recently used: kept by _prune (several trees may share this cache)
            _prune(role)
            archives[role] = archive
    return archives


def images_dir() -> Path:
    return cache_root() / "images"


def inputs_hash(dockerfile: Path, base: str, args: dict[str, str], volumes: list[str]) -> str:
    digest = hashlib.sha256(f"{RECIPE}\n{base}\n{sorted(args.items())}\n".encode())
    for path in [dockerfile, *context_files()]:
        digest.update(f"{path.relative_to(REPO)}\n".encode())
        digest.update(path.read_bytes())
    for volume in volumes:  # local wheels and certificates: by name, size and time
        host = Path(volume.split(":")[0])
        for path in sorted(host.iterdir()) if host.is_dir() else [host]:
            stat = path.stat()
            digest.update(f"{path} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def context_files() -> list[Path]:
    files = []
    for name in CONTEXT:
        top = REPO / name
        found = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        files += [p for p in found if not IGNORED.search(str(p.relative_to(REPO)))]
    return files


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and SUITE in fields.get("Suites", "").split():
                return fields["URIs"].split()[0]
    sources = Path("/etc/apt/sources.list")
    if sources.exists():
        for line in sources.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and SUITE in parts:
                return next(p for p in parts[1:] if "://" in p)
    return DEFAULT_MIRROR


def base_image_id() -> str:
    recipe = f"{RECIPE} {SUITE} {debian_mirror()} {','.join(BASE_PACKAGES)} {','.join(LEFTOVERS)}"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def ensure_base() -> str:
    """The local base image (debootstrap's bookworm with python3), made once per base_image_id."""
    name = f"localhost/finetune-base:{base_image_id()}"
    if _buildah("inspect", "--type", "image", name, check=False).returncode == 0:
        return name
    rootfs = images_dir() / f"rootfs-{base_image_id()}"
    shutil.rmtree(rootfs, ignore_errors=True)
    log.info("making the base image with debootstrap (about 2 minutes)")
    started = time.monotonic()
    _step(
        "debootstrap of the base image",
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            SUITE,
            str(rootfs),
            debian_mirror(),
        ],
        "debootstrap",
    )
    for pattern in LEFTOVERS:
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    container = _buildah("from", "scratch").stdout.strip()
    try:
        mount = _buildah("mount", container).stdout.strip()
        _step("copying the base rootfs", ["cp", "-a", f"{rootfs}/.", mount], "base-copy")
        _buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", container)
        _buildah("config", "--cmd", "/bin/bash", container)
        _buildah("commit", "--rm", container, name)
    except BaseException:
        _buildah("rm", container, check=False)
        raise
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    log.info("made the base image %s in %.0f s", name, time.monotonic() - started)
    return name


def pip_settings() -> tuple[dict[str, str], list[str]]:
    """Build args from the host's pip settings (PIP_* env over the config files) and the local paths to mount.

    Index URLs on the local disk (file://) are left out: the build uses PyPI then.
    """
    pip = [sys.executable, "-m", "pip"] if importlib.util.find_spec("pip") else [shutil.which("pip3") or "pip3"]
    listed = subprocess.run([*pip, "config", "list"], capture_output=True, text=True)
    if listed.returncode != 0:
        raise ClusterError(f"`{' '.join(pip)} config list` failed: {listed.stderr.strip()[-300:]}")
    found: dict[str, str] = {}
    for section in ("global", "install", ":env:"):  # later sections win
        for key, value in re.findall(rf"^{re.escape(section)}\.([\w-]+)='(.*)'$", listed.stdout, re.M):
            if key in PIP_SETTINGS:
                found[key] = value
    args, volumes = {}, []
    for key, value in found.items():
        kept = []
        for item in value.split():
            path = Path(item.removeprefix("file://"))
            if item.startswith("file://") and key == "index-url":
                continue
            if path.is_absolute() and path.exists():
                volumes.append(f"{path}:{path}:ro")
            kept.append(item)
        if kept:
            args[PIP_SETTINGS[key]] = " ".join(kept)
    return args, volumes


def image_files(archive: Path) -> set[str]:
    """Paths present in a docker-archive image (layers applied in order, whiteouts honoured)."""
    present: set[str] = set()
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for layer in manifest[0]["Layers"]:
            with tarfile.open(fileobj=outer.extractfile(layer)) as inner:
                for member in inner:
                    path = member.name.removeprefix("./").rstrip("/")
                    folder, _, leaf = path.rpartition("/")
                    if leaf == ".wh..wh..opq":
                        present = {p for p in present if not p.startswith(f"{folder}/")}
                    elif leaf.startswith(".wh."):
                        gone = f"{folder}/{leaf[4:]}".lstrip("/")
                        present = {p for p in present if p != gone and not p.startswith(f"{gone}/")}
                    else:
                        present.add(path)
    return present


def _build(role: str, dockerfile: Path, base: str, args: dict[str, str], volumes: list[str], archive: Path) -> None:
    ref = image_refs()[role]
    log.info("building the %s image %s with buildah (cold: minutes)", role, ref)
    started = time.monotonic()
    argv = ["bud", "--network", "host", "--layers", "--pull-never", "-f", str(dockerfile), "-t", ref]
    for key, value in {"BASE": base, **args}.items():
        argv += ["--build-arg", f"{key}={value}"]
    for volume in volumes:
        argv += ["--volume", volume]
    _step(f"building the {role} image", [*_buildah_argv(), *argv, str(REPO)], f"build-{archive.stem}")
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    export = [*_buildah_argv(), "push", ref, f"docker-archive:{partial}:{ref}"]
    _step(f"exporting the {role} image", export, f"export-{archive.stem}")
    partial.rename(archive)
    size = archive.stat().st_size / 2**20
    log.info("built the %s image in %.0f s: %s (%.0f MiB)", role, time.monotonic() - started, archive, size)
    _trim_storage()


def _trim_storage() -> None:
    """Past STORAGE_LIMIT bytes, drop buildah's untagged images (older builds, layer cache); the base stays."""
    storage = images_dir() / "storage"
    used = sum(
        (Path(folder) / name).lstat().st_size
        for folder, _, names in os.walk(storage)
        for name in names
        if not (Path(folder) / name).is_symlink()
    )
    if used > STORAGE_LIMIT:
        log.info("buildah storage holds %.1f GiB: dropping untagged images", used / 2**30)
        # Builds run one at a time under build.lock, so any working container left now is an interrupted
        # build's (a killed test run); each holds its image, and `rmi --prune` would fail on it.
        _buildah("rm", "--all")
        _buildah("rmi", "--prune")


def _prune(role: str) -> None:
    """Keep the KEPT most recently used archives of a role: worktrees or branches sharing the cache alternate."""
    archives = sorted(images_dir().glob(f"{role}-*.tar"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in archives[KEPT:]:
        stale.unlink()


def _buildah_argv() -> list[str]:
    """buildah with storage of its own under the cache, apart from any other user of buildah or podman."""
    storage = images_dir() / "storage"
    return [
        "buildah",
        "--root",
        str(storage / "root"),
        "--runroot",
        str(storage / "run"),
        "--storage-driver",
        "overlay",
    ]


def _buildah(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*_buildah_argv(), *argv], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ClusterError(f"`buildah {' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done


def _step(what: str, argv: list[str], log_name: str) -> None:
    """Run one step with its output in a log file; failing, raise one line naming the step and the log."""
    logs = images_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{log_name}.log"
    with log_file.open("w") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise ClusterError(f"{what} failed (exit {done.returncode}); see {log_file}")


def require_tools() -> None:
    """Raise ClusterError unless this machine can build the images (tools installed, root)."""
    missing = [tool for tool in ("debootstrap", "buildah", "cp") if not shutil.which(tool)]
    if missing:
        raise ClusterError(f"building the images needs {', '.join(missing)}: apt-get install {' '.join(missing)}")
    if os.geteuid() != 0:
        raise ClusterError("building the images needs root (debootstrap, buildah's overlay storage)")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        archives = build_images()
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for role, archive in archives.items():
        print(f"{image_refs()[role]} {archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
