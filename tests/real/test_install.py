"""make install, into a scratch prefix, as an operator runs it."""

import os
import subprocess

import lab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_make_install_gives_commands_hook_unit_and_config(tmp_path):
    folder = lab.workdir("nbdsnap-install-")
    try:
        dirs = {"PREFIX": folder + "/usr", "INSTALL_VENV": folder + "/opt",
                "SYSCONFDIR": folder + "/etc", "UNITDIR": folder + "/unit"}
        subprocess.run(["make", "-s", "-C", ROOT, "install"]
                       + ["%s=%s" % kv for kv in dirs.items()],
                       check=True, capture_output=True, timeout=300)
        for command in ("nbd-prerun", "nbd-postrun", "nbdsnap", "nbd-verify",
                        "nbd-pull"):
            out = subprocess.run([folder + "/usr/bin/" + command, "--help"],
                                 check=True, capture_output=True, text=True)
            assert "usage: %s" % command in out.stdout
        hook = folder + "/etc/libvirt/hooks/qemu.d/nbdsnap"
        assert os.access(hook, os.X_OK)
        text = open(hook).read()
        assert "NBDSNAP_CONFIG=%s/etc/nbdsnap.conf exec %s/usr/bin/nbdsnap " \
            "libvirt-hook" % (folder, folder) in text
        unit = open(folder + "/unit/nbdsnap-recover.service").read()
        assert "ExecStart=%s/usr/bin/nbdsnap recover --all" % folder in unit
        assert "Before=nbd-server.service" in unit
        pull = open(folder + "/unit/nbd-pull@.service").read()
        assert "ExecStart=%s/usr/bin/nbd-pull @%s/etc/nbdsnap/pull/%%i.args" \
            % (folder, folder) in pull
        assert os.path.exists(folder + "/unit/nbd-pull@.timer")
        conf = open(folder + "/etc/nbdsnap.conf").read()
        assert "[nbdsnap]" in conf
        # The shipped configuration is valid as it stands.
        out = subprocess.run([folder + "/usr/bin/nbdsnap", "status"],
                             env=dict(os.environ, NBDSNAP_CONFIG=folder
                                      + "/etc/nbdsnap.conf"),
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    finally:
        lab.cleanup_folder(folder)
