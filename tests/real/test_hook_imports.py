"""What a hook run imports: a join and a leave need neither libvirt nor lxml.

A 4-connection copy runs 8 hooks in a row; 6 of them (3 joins, 3 leaves)
only touch the session file.  Their cost is mostly start-up and imports
(lab/bench_hooks.py): the libvirt bindings and lxml are for the freeze and
the commit alone.
"""

import json
import os
import subprocess
import sys

from test_freeze import assert_clean, export_domain

HEAVY = ("libvirt", "libvirt_qemu", "libvirtmod", "libvirtmod_qemu", "lxml")

# One hook run in this process, as its entry point runs it; then the heavy
# modules it imported.
CHILD = r"""
import json, sys
from nbdsnap.hooks import cli
main = {"prerun": cli.prerun_main, "postrun": cli.postrun_main}[sys.argv[1]]
status = main([sys.argv[2]])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"status": status, "heavy": heavy}))
""" % (HEAVY,)

# A second connection's holder: it stays alive across its two hook runs,
# as nbd-server's per-connection child does, and runs each as its child.
HOLDER = r"""
import subprocess, sys
for hook in ("prerun", "postrun"):
    subprocess.run([sys.executable, "-I", "-c", sys.argv[1], hook,
                    sys.argv[2]], check=True)
"""


def test_join_and_leave_import_neither_libvirt_nor_lxml(virt, env):
    dom, base = export_domain(virt, env)
    env.hook("nbd-prerun", base, check=0)      # the freeze, held by this test
    proc = subprocess.run([sys.executable, "-I", "-c", HOLDER, CHILD, base],
                          env=dict(os.environ, **env.vars),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    join, leave = (json.loads(line) for line in proc.stdout.splitlines())
    assert "joined by pid" in proc.stderr
    assert "released by pid" in proc.stderr
    assert join == {"status": 0, "heavy": []}
    assert leave == {"status": 0, "heavy": []}
    env.hook("nbd-postrun", base, check=0)     # the last one commits
    assert_clean(env, dom, base)
