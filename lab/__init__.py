"""The lab: real parts for the tests, the demo and the benchmarks.

Used by the real tests (tests/real), the demo (lab/demo.py) and the
benchmarks (lab/bench.py).  Everything runs as root on this machine: domains are
software-emulated (type='qemu') and need no operating system, nbd-server
listens on a loopback port of its own, clients are userspace (nbdcopy and
the tiny NBD client in lab/nbd.py).

By what they do:

- host: the daemons (ensure_host, restart_libvirtd), folders, config files
- images: disk images, loop devices, device nodes, what an image reads
- domains: domain XML, Lab (a test's domains and servers), guest I/O
- nbd: nbd-server with our hooks, nbdcopy, a client holding a connection
- netns: a network namespace whose loopback runs at a real speed
  (ShapedLink; import it from lab.netns)
- rpcgate: a proxy before libvirtd that holds one call of a hook until
  the test lets it go (CallGate; import it from lab.rpcgate)
- guest: the small Linux guest with an agent, at run time; guest_build
  builds it from guest_debs (Debian's packages), guest_init holds its
  scripts

Everything the tests use is here as `lab.NAME`.
"""

from .host import (HOOKS_DIR, KEEP_HOOK, LIBVIRTD_PIDFILE, URI,  # noqa: F401
                   VENV_BIN, cleanup_folder, ensure_host,
                   libvirt_hooks_missing, restart_libvirtd, scratch,
                   started_by_lab, _libvirt_answers, _running, wait_until,
                   workdir, write_config)
from .images import (device_node, image_reads, loop_device,  # noqa: F401
                     make_image, read_range, sha256)
from .domains import (Lab, disk_alias, disk_source, disk_xml,  # noqa: F401
                      domain_xml, guest_reads, guest_write, hmp,
                      remove_domains, _qemu_io)
from .nbd import (IHAVEOPT, NBD_CMD_DISC, NBD_CMD_READ,  # noqa: F401
                  NBD_MAGIC, NBD_OPT_GO, NBD_REP_ACK, NBD_REP_INFO,
                  NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, REPLY_MAGIC,
                  HeldConnection, NbdServer, RefusedError, free_port, nbdcopy)
