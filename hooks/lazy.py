"""Modules loaded when first used, so that a hook run pays only for its work.

A 4-connection copy runs 8 hooks in a row.  6 of them, the joins of a live
freeze and the postruns that are not the last, only read and write the
session file; the libvirt bindings and lxml, most of a hook run's CPU time
(BENCHMARKS.md, "Hook runs by kind"), serve the freeze and the commit.

    virt = lazy.module("virt")      # instead of: from . import virt

The module is created at once and executed on its first attribute access
(importlib's LazyLoader, as the Python documentation shows it).
"""

import importlib.util
import sys


def module(name, package=__package__):
    """The submodule name of package, executed on first use."""
    fullname = "%s.%s" % (package, name)
    if fullname in sys.modules:
        return sys.modules[fullname]
    spec = importlib.util.find_spec(fullname)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[fullname] = mod
    spec.loader.exec_module(mod)
    setattr(sys.modules[package], name, mod)
    return mod
