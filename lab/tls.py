"""TLS material for tests and benchmarks, made by the real `nbdsnap
certs` (openssl), and the [generic] settings nbd-server reads it from."""

import os
import subprocess

from .host import VENV_BIN

SERVER_NAMES = ("localhost", "127.0.0.1")


class Pki:
    """A CA, the server's certificate and clients' folders under folder."""

    def __init__(self, folder, clients=("clone",), names=SERVER_NAMES):
        self.folder = folder
        self.made = self.add(clients, names)    # what nbdsnap certs said

    def add(self, clients, names=()):
        cmd = [os.path.join(VENV_BIN, "nbdsnap"), "certs", "--dir",
               self.folder]
        for name in names:
            cmd += ["--server-name", name]
        for name in clients:
            cmd += ["--client", name]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError("nbdsnap certs failed: %s" % proc.stderr)
        return proc.stdout

    def client(self, name="clone"):
        """The folder a clone host names in ?tls-certificates=."""
        return os.path.join(self.folder, "clients", name)

    def generic(self):
        """nbd-server's [generic] TLS settings (lab.NbdServer(generic=))."""
        return {"certfile": os.path.join(self.folder, "server-cert.pem"),
                "keyfile": os.path.join(self.folder, "server-key.pem"),
                "cacertfile": os.path.join(self.folder, "ca-cert.pem")}


def uri(server, export, certificates, host="127.0.0.1"):
    """libnbd's form: nbds://HOST:PORT/EXPORT?tls-certificates=DIR."""
    return "nbds://%s:%d/%s?tls-certificates=%s" % (host, server.port,
                                                   export, certificates)
