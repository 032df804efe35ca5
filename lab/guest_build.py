"""The test guest's build: a kernel and an initramfs from Debian's packages.

Built without installing them on the host (lab/guest_debs.py: ``apt-get
download`` + ``dpkg-deb -x``): the kernel of linux-image-amd64, booted
uncompressed (the kernel has PVH: QEMU loads the ELF directly and the
emulated CPU does not decompress it, which halves the boot under TCG); an
initramfs with
busybox-static, qemu-guest-agent and the shared libraries it links, the
kernel modules in MODULES with their dependencies, and the scripts of
lab/guest_init.py.

The build is cached under a key made of the packages' versions (and the
recipe: this file, guest_debs.py and guest_init.py): built in a temporary
folder, renamed into place when complete.
"""

import contextlib
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time

from . import guest_debs, guest_init
from .guest_debs import (KERNEL_META, PACKAGES, _download,  # noqa: F401
                         _run, wanted_packages)
from .guest_init import FSFREEZE_HOOK, INIT

CACHE_DIR = "/var/cache/nbdsnap-lab/guest"
# Loaded in this order after their own dependencies (read from each .ko's
# depends=).  crc32c_generic is a soft dependency of jbd2 and ext4 that
# nothing would load for us: there is no modprobe in the guest.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic",
           "ext4")
MULTIARCH = "lib/x86_64-linux-gnu"
# A build removes the guests of other keys unused for this long (prune).
UNUSED_DAYS = 7
# The files whose text makes the guest: a change to any is a new guest.
RECIPE = (__file__, guest_debs.__file__, guest_init.__file__)


def cache_key(pinned):
    """Changes when a package version or this recipe changes."""
    h = hashlib.sha256()
    for name in sorted(pinned):
        h.update(("%s=%s\n" % (name, pinned[name])).encode())
    for path in RECIPE:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


# -- the pieces ----------------------------------------------------------------------

def extract_vmlinux(bzimage, dest):
    """The uncompressed ELF kernel inside a bzImage (Debian: xz)."""
    with open(bzimage, "rb") as f:
        data = f.read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return False
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elf = d.decompress(data[start:])
    if not (d.eof and elf[:4] == b"\x7fELF"):
        return False
    with open(dest, "wb") as f:
        f.write(elf)
    return True


def module_order(moddir, names):
    """Paths of names' modules and their dependencies, dependencies first."""
    with open(os.path.join(moddir, "modules.order")) as f:
        paths = {os.path.basename(l.strip())[:-3].replace("-", "_"):
                 os.path.join(moddir, l.strip()) for l in f if l.strip()}
    order = []

    def add(name):
        if name in order:
            return
        path = paths.get(name)
        if path is None:
            raise RuntimeError("no kernel module %s in %s" % (name, moddir))
        with open(path, "rb") as f:
            m = re.search(rb"\0depends=([^\0]*)\0", f.read())
        for dep in filter(None, (m.group(1).decode() if m else "").split(",")):
            add(dep.replace("-", "_"))
        order.append(name)
    for name in names:
        add(name)
    return [(n, paths[n]) for n in order]


def linked_libraries(root, binary):
    """The shared libraries binary links, resolved inside root only."""
    libdirs = [os.path.join(root, MULTIARCH),
               os.path.join(root, "usr", MULTIARCH)]
    ldso = os.path.join(root, MULTIARCH, "ld-linux-x86-64.so.2")
    out = _run([ldso, "--library-path", ":".join(libdirs), "--list",
                os.path.join(root, binary.lstrip("/"))])
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts:
            path = parts[parts.index("=>") + 1]
            if path == "not" or not path.startswith(root):
                raise RuntimeError("%s: %s is not in the downloaded "
                                   "packages" % (binary, line.strip()))
            libs.append(path)
    return libs + [ldso]



def _install(src, dest, mode=0o644):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(src, dest)
    os.chmod(dest, mode)


def _make_initramfs(root, kernel_version, tree, initrd):
    busybox = os.path.join(root, "bin", "busybox")
    for d in ("bin", "dev", "proc", "sys", "run", "data", "etc",
              "lib/modules", "lib64", MULTIARCH):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    os.makedirs(os.path.join(tree, "var"))
    os.symlink("/run", os.path.join(tree, "var", "run"))
    _install(busybox, os.path.join(tree, "bin", "busybox"), 0o755)
    _install(os.path.join(root, "usr/sbin/qemu-ga"),
             os.path.join(tree, "bin", "qemu-ga"), 0o755)
    for lib in linked_libraries(root, "/usr/sbin/qemu-ga"):
        _install(lib, os.path.join(tree, MULTIARCH, os.path.basename(lib)),
                 0o755)
    os.symlink("/%s/ld-linux-x86-64.so.2" % MULTIARCH,
               os.path.join(tree, "lib64", "ld-linux-x86-64.so.2"))
    moddir = os.path.join(root, "lib", "modules", kernel_version)
    order = module_order(moddir, MODULES)
    for name, path in order:
        _install(path, os.path.join(tree, "lib", "modules", name + ".ko"))
    with open(os.path.join(tree, "etc", "modules.load"), "w") as f:
        f.write("\n".join(n for n, _ in order) + "\n")
    with open(os.path.join(tree, "init"), "w") as f:
        f.write(INIT)
    os.chmod(os.path.join(tree, "init"), 0o755)
    with open(os.path.join(tree, "etc", "fsfreeze-hook"), "w") as f:
        f.write(FSFREEZE_HOOK)
    os.chmod(os.path.join(tree, "etc", "fsfreeze-hook"), 0o755)
    # No cpio on the host: busybox has one.  Uncompressed: the emulated CPU
    # would spend longer inflating it than QEMU spends loading it.
    names = _run([busybox, "find", "."], cwd=tree)
    with open(initrd, "wb") as out:
        subprocess.run([busybox, "cpio", "-o", "-H", "newc"], input=
                       names.encode(), stdout=out, stderr=subprocess.DEVNULL,
                       cwd=tree, check=True, timeout=120)


_built = {}


def build(cache_dir=CACHE_DIR):
    """(kernel_path, initrd_path), built once per set of package versions.

    The build goes to a temporary folder in cache_dir, renamed into place
    when complete: a reader never sees half a guest, and two builds racing
    leave one.  Asking apt for the versions takes seconds here: a process
    asks once.
    """
    if cache_dir not in _built or not os.path.exists(_built[cache_dir][1]):
        _built[cache_dir] = _build(cache_dir)
        # In use: kept from prune() for UNUSED_DAYS.
        with contextlib.suppress(OSError):
            os.utime(manifest_path(_built[cache_dir][0]))
    return _built[cache_dir]


def _lists_fingerprint():
    """Changes whenever apt's package lists do (apt-get update)."""
    h = hashlib.sha256()
    for path in RECIPE:
        with open(path, "rb") as f:
            h.update(f.read())
    folder = "/var/lib/apt/lists"
    for name in sorted(os.listdir(folder)):
        if "Packages" in name:
            st = os.stat(os.path.join(folder, name))
            h.update(("%s %d %d\n" % (name, st.st_size, st.st_mtime_ns))
                     .encode())
    return h.hexdigest()


def _build(cache_dir):
    # apt-cache takes seconds per call here: while apt's lists are the
    # same, the versions (so the key) are too, remembered in SEEN.
    seen_path = os.path.join(cache_dir, "SEEN")
    fingerprint = _lists_fingerprint()
    with contextlib.suppress(OSError, ValueError):
        with open(seen_path) as f:
            seen = json.load(f)
        if seen["lists"] == fingerprint:
            final = os.path.join(cache_dir, seen["key"])
            if os.path.exists(os.path.join(final, "manifest.json")):
                return (os.path.join(final, "vmlinux"),
                        os.path.join(final, "initrd"))
    kernel_pkg, pinned = wanted_packages()
    key = cache_key(pinned)
    final = os.path.join(cache_dir, key)
    kernel, initrd = (os.path.join(final, "vmlinux"),
                      os.path.join(final, "initrd"))
    if not os.path.exists(os.path.join(final, "manifest.json")):
        _build_into(cache_dir, key, kernel_pkg, pinned)
    fd, tmp = tempfile.mkstemp(prefix=".seen-", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump({"lists": fingerprint, "key": key}, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, seen_path)
    return kernel, initrd


def _build_into(cache_dir, key, kernel_pkg, pinned):
    final = os.path.join(cache_dir, key)
    os.makedirs(cache_dir, exist_ok=True)
    os.chmod(cache_dir, 0o755)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix=".build-", dir=cache_dir)
    try:
        os.mkdir(os.path.join(work, "debs"))
        root = _download(os.path.join(work, "debs"), pinned)
        out = os.path.join(work, "out")
        os.mkdir(out)
        kversion = kernel_pkg[len("linux-image-"):]
        bzimage = os.path.join(root, "boot", "vmlinuz-" + kversion)
        uncompressed = extract_vmlinux(bzimage, os.path.join(out, "vmlinux"))
        if not uncompressed:
            shutil.copyfile(bzimage, os.path.join(out, "vmlinux"))
        _make_initramfs(root, kversion, os.path.join(work, "tree"),
                        os.path.join(out, "initrd"))
        manifest = {"packages": pinned, "kernel": kernel_pkg,
                    "uncompressed_kernel": uncompressed,
                    "build_seconds": round(time.monotonic() - started, 1),
                    "bytes": {n: os.path.getsize(os.path.join(out, n))
                              for n in ("vmlinux", "initrd")}}
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        for name in os.listdir(out):
            os.chmod(os.path.join(out, name), 0o644)
        os.chmod(out, 0o755)
        try:
            os.rename(out, final)
        except OSError:
            if not os.path.exists(os.path.join(final, "manifest.json")):
                raise           # not another build that won the race
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prune(cache_dir, key)


def prune(cache_dir, key, now=None):
    """Remove the guests other than key that no process took for
    UNUSED_DAYS (build() touches the manifest of the one it returns).

    A guest of another key is not only one of older package versions: the
    recipe is in the key, and another branch or worktree on this machine may
    be booting its own guest right now.
    """
    cutoff = (time.time() if now is None else now) - UNUSED_DAYS * 86400
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name == key or name.startswith(".") or not os.path.isdir(path):
            continue
        try:
            used = os.stat(os.path.join(path, "manifest.json")).st_mtime
        except OSError:
            used = 0
        if used < cutoff:
            shutil.rmtree(path, ignore_errors=True)


def manifest_path(kernel):
    return os.path.join(os.path.dirname(kernel), "manifest.json")


def manifest(kernel):
    with open(manifest_path(kernel)) as f:
        return json.load(f)
