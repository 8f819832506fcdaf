"""Idempotent installation of the peers the side-by-side benchmark compares against.

- Debian packages ``etcd-server``, ``etcd-client`` and ``zookeeper`` (+ a headless JRE, which
  ``zookeeper`` depends on). ``apt-cache policy`` is checked first; ``apt-get update`` runs at
  most once per call and only when a package has no install candidate. Needs root.
- Python clients installed into the running venv with pip: ``kazoo`` (ZooKeeper). etcd is
  driven through its v3 HTTP/JSON gateway with :mod:`http.client` (no protobuf, no gRPC
  client library: the Python etcd3 clients pin old protobuf versions).

Nothing here starts a service. ``ensure_all()`` returns what it found and did, for the results
file.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys

DEBIAN_PACKAGES = ("etcd-server", "etcd-client", "zookeeper")
PIP_PACKAGES = {"kazoo": "kazoo"}           # import name -> pip requirement


class SetupError(RuntimeError):
    pass


def _run(argv: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def apt_policy(pkg: str) -> tuple[str | None, str | None]:
    """(installed version or None, candidate version or None) from ``apt-cache policy``."""
    out = _run(["apt-cache", "policy", pkg]).stdout
    inst = re.search(r"Installed:\s*(\S+)", out)
    cand = re.search(r"Candidate:\s*(\S+)", out)
    norm = lambda m: None if (m is None or m.group(1) == "(none)") else m.group(1)  # noqa: E731
    return norm(inst), norm(cand)


def ensure_debian(packages=DEBIAN_PACKAGES, log=print) -> dict[str, str]:
    """Install the missing packages; return ``{package: installed version}``."""
    if shutil.which("apt-get") is None:
        raise SetupError("apt-get not found: the peers are installed from Debian packages")
    missing, versions = [], {}
    for p in packages:
        inst, _ = apt_policy(p)
        if inst:
            versions[p] = inst
        else:
            missing.append(p)
    if not missing:
        return versions
    if os.geteuid() != 0:
        raise SetupError(f"missing Debian packages {missing}; run as root or "
                         f"'sudo apt-get install {' '.join(missing)}'")
    if any(apt_policy(p)[1] is None for p in missing):
        log(f"== apt-get update (no candidate for some of {missing})")
        r = _run(["apt-get", "update", "-qq"])
        if r.returncode != 0:
            raise SetupError(f"apt-get update failed: {r.stderr[-2000:]}")
    log(f"== apt-get install {' '.join(missing)}")
    r = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing])
    if r.returncode != 0:
        # one retry after refreshing the lists (stale lists give 404s)
        log("== apt-get install failed; apt-get update and retry")
        _run(["apt-get", "update", "-qq"])
        r = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing])
        if r.returncode != 0:
            raise SetupError(f"apt-get install {missing} failed: {r.stderr[-2000:]}")
    for p in packages:
        inst, _ = apt_policy(p)
        if not inst:
            raise SetupError(f"{p} still not installed after apt-get install")
        versions[p] = inst
    return versions


def ensure_pip(reqs: dict[str, str] = PIP_PACKAGES, log=print) -> dict[str, str]:
    """pip-install the missing client libraries into this interpreter's environment."""
    from importlib import metadata
    missing = []
    for mod, req in reqs.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            missing.append(req)
    if missing:
        log(f"== pip install {' '.join(missing)}")
        r = _run([sys.executable, "-m", "pip", "install", "-q", *missing])
        if r.returncode != 0:
            raise SetupError(f"pip install {missing} failed: {r.stderr[-2000:]}")
        importlib.invalidate_caches()
    out = {}
    for mod, req in reqs.items():
        importlib.import_module(mod)
        out[req] = metadata.version(req)
    return out


def etcd_binary() -> str:
    for cand in ("etcd", "/usr/bin/etcd"):
        p = shutil.which(cand)
        if p:
            return p
    raise SetupError("etcd binary not found (Debian package etcd-server)")


def java_binary() -> str:
    p = shutil.which("java")
    if not p:
        raise SetupError("java not found (zookeeper depends on a JRE)")
    return p


def zookeeper_classpath(conf_dir: str | None = None) -> str:
    """The classpath Debian's ``/etc/zookeeper/conf/environment`` uses: the config directory
    (for log4j.properties) plus ``zookeeper.jar``, whose manifest lists its dependencies."""
    jar = "/usr/share/java/zookeeper.jar"
    env = "/etc/zookeeper/conf/environment"
    if os.path.exists(env):
        with open(env, encoding="utf-8") as fh:
            for line in fh:
                m = re.match(r'\s*CLASSPATH="?([^"\n]+)', line)
                if m:
                    jars = [p for p in m.group(1).split(":") if p.endswith(".jar")]
                    if jars:
                        jar = ":".join(jars)
    if not all(os.path.exists(j) for j in jar.split(":")):
        raise SetupError(f"zookeeper jars not found ({jar}; Debian package zookeeper)")
    return f"{conf_dir}:{jar}" if conf_dir else jar


def etcd_version() -> str:
    r = _run([etcd_binary(), "--version"])
    m = re.search(r"etcd Version:\s*(\S+)", r.stdout)
    return m.group(1) if m else r.stdout.strip().splitlines()[0] if r.stdout.strip() else "?"


def ensure_all(log=print) -> dict:
    deb = ensure_debian(log=log)
    pipv = ensure_pip(log=log)
    return {"debian": deb, "pip": pipv, "etcd": etcd_version(), "zookeeper": deb.get("zookeeper")}


if __name__ == "__main__":  # pragma: no cover
    print(ensure_all())
