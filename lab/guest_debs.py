"""Debian's packages for the test guest: which, at which versions, fetched
without installing them on the host (apt-get download + dpkg-deb -x)."""

import os
import subprocess

KERNEL_META = "linux-image-amd64"
# What the initramfs needs; qemu-guest-agent's libraries are added from its
# dependencies (library_packages), the kernel's package from KERNEL_META.
PACKAGES = ("busybox-static", "qemu-guest-agent")


# -- Debian's packages -------------------------------------------------------------

def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 600), **kw).stdout


def _depends(package, recurse=False):
    cmd = ["apt-cache", "depends", "--no-recommends", "--no-suggests",
           "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
           "--no-pre-depends"]
    out = _run(cmd + (["--recurse"] if recurse else []) + [package])
    if recurse:
        return sorted({l for l in out.splitlines()
                       if l and not l.startswith(" ") and "<" not in l})
    return [l.split(":", 1)[1].strip() for l in out.splitlines()
            if l.strip().startswith("Depends:")]


def library_packages():
    """qemu-guest-agent's run-time closure: the packages its libraries are
    in.  ldd later picks the files it links; the rest is left out."""
    return [p for p in _depends("qemu-guest-agent", recurse=True)
            if p != "qemu-guest-agent"]


def versions(packages):
    """{package: candidate version}; apt-get update once if one is unknown."""
    def candidates():
        out = _run(["apt-cache", "policy"] + list(packages))
        found, name = {}, None
        for line in out.splitlines():
            if not line.startswith(" "):
                name = line.rstrip(":")
            elif line.strip().startswith("Candidate:"):
                v = line.split(":", 1)[1].strip()
                if v != "(none)":
                    found[name] = v
        return found
    found = candidates()
    if set(found) != set(packages):
        _run(["apt-get", "update", "-qq"])
        found = candidates()
    missing = sorted(set(packages) - set(found))
    if missing:
        raise RuntimeError("no Debian package %s in apt's lists"
                           % ", ".join(missing))
    return found


def wanted_packages():
    kernel = [p for p in _depends(KERNEL_META)
              if p.startswith("linux-image-")]
    if len(kernel) != 1:
        raise RuntimeError("%s depends on %r, not on one kernel"
                           % (KERNEL_META, kernel))
    pkgs = kernel + list(PACKAGES) + library_packages()
    return kernel[0], versions(pkgs)


def _download(folder, pinned):
    _run(["apt-get", "download", "-o", "APT::Sandbox::User=root"]
         + ["%s=%s" % kv for kv in sorted(pinned.items())], cwd=folder)
    root = os.path.join(folder, "root")
    for deb in sorted(os.listdir(folder)):
        if deb.endswith(".deb"):
            _run(["dpkg-deb", "-x", os.path.join(folder, deb), root])
    return root
