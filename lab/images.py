"""Disk images, loop devices and device nodes, and what they hold."""

import contextlib
import os
import subprocess


def make_image(path, size_mib, fmt="raw", backing=None, backing_fmt="raw",
               fill=None):
    """A raw or qcow2 image; fill=byte writes that pattern over all of it."""
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing:
        cmd += ["-b", backing, "-F", backing_fmt]
    cmd += [path]
    if not backing:
        cmd += ["%dM" % size_mib]
    subprocess.run(cmd, check=True)
    if fill is not None:
        with open(path, "r+b") as f:
            chunk = bytes([fill]) * (1 << 20)
            for _ in range(size_mib):
                f.write(chunk)
    return path


def read_range(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def loop_device(image):
    dev = subprocess.run(["losetup", "-f", "--show", image], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def device_node(device, path):
    """A second node of device's numbers at path, as /dev/mapper/vg-lv and
    /dev/dm-N are of one LV; removed with the folder it is made in."""
    rdev = os.stat(device).st_rdev
    subprocess.run(["mknod", path, "b", str(os.major(rdev)),
                    str(os.minor(rdev))], check=True)
    return path


def image_reads(path, pattern, offset, length):
    """True if the image chain at path reads pattern over the range
    (qemu-io, read-only: the image must not be open for writing)."""
    proc = subprocess.run(["qemu-io", "-r", "-c", "read -P 0x%02x %d %d"
                           % (pattern, offset, length), path],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode and "Pattern verification failed" not in proc.stdout:
        raise RuntimeError("qemu-io cannot read %s: %s%s"
                           % (path, proc.stdout, proc.stderr))
    return proc.returncode == 0
