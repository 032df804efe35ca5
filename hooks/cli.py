"""Command lines of nbd-prerun, nbd-postrun and nbdsnap: parsing and exits.

nbd-server runs the hooks through /bin/sh with no terminal and throws their
output away, so every outcome, including a bug's traceback, is logged (to
syslog and stderr) before the process exits.
"""

import argparse
import json
import logging
import os
import shlex
import sys
import textwrap

from . import config as config_mod
from . import log as log_mod
from . import watchdog
from .errors import ConfigError, Error, NotRoot

log = logging.getLogger("nbdsnap")

EPILOG_CONFIG = """\
environment:
  NBDSNAP_CONFIG        configuration file (default /etc/nbdsnap.conf)
  LIBVIRT_DEFAULT_URI   libvirt connection (default qemu:///system)
"""


def _run(prog, func, verbose=False, stderr_level=logging.INFO):
    """Run func() with logging set up; map outcomes to exit statuses."""
    log_mod.setup(prog, verbose, stderr_level)
    try:
        return func()
    except Error as e:
        log.error("%s", e)
        return e.status
    except KeyboardInterrupt:
        log.error("interrupted")
        return 1
    except Exception:
        # A bug.  nbd-server discards stderr, so make sure syslog has it.
        log.critical("internal error, please report it", exc_info=True)
        return 1


def _load_config():
    return config_mod.load()


class _HookParser(argparse.ArgumentParser):
    """An argument error is logged too: it comes before the hook sets up
    logging, and nbd-server throws stderr away, so a client refused for a
    bad hook string would leave no trace of why."""

    def parse_args(self, args=None, namespace=None):
        self.given = sys.argv[1:] if args is None else list(args)
        return super().parse_args(args, namespace)

    def error(self, message):
        self.print_usage(sys.stderr)
        log_mod.setup(self.prog)
        log.error("bad arguments (%s): %s", shlex.join(self.given), message)
        logging.shutdown()
        sys.exit(2)


def _hook_parser(prog, description, statuses):
    """The parser both hooks share: EXPORT, -v, and the exit statuses."""
    p = _HookParser(
        prog=prog, description=textwrap.fill(description, 78),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="%s\n\n%s" % (textwrap.fill("exit status: " + statuses, 78),
                               EPILOG_CONFIG))
    p.add_argument("export", metavar="EXPORT",
                   help="the exported path (nbd-server's %%s)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log debugging detail too")
    return p


def prerun_main(argv=None):
    p = _hook_parser(
        "nbd-prerun",
        "Freeze the base disk behind an nbd-server export for this "
        "connection: the first connection takes an external disk-only "
        "libvirt snapshot, later ones join it.  Run from nbd-server's config "
        "as 'prerun = nbd-prerun %s'.",
        "0 serve the export, 1 refused (see syslog), 2 usage or "
        "configuration error")
    p.add_argument("--domain", help="skip the search: the domain's name "
                   "(still checked against EXPORT)")
    p.add_argument("--disk", metavar="TARGET",
                   help="skip the search: the disk's target, e.g. vda")
    p.add_argument("--group", metavar="TARGET,TARGET...",
                   help="freeze these disks of the domain at one instant "
                   "with --disk (one atomic snapshot), --disk among them; "
                   "a connection to any of them holds them all, and the "
                   "last one to end commits them all")
    p.add_argument("--quiesce", choices=config_mod.QUIESCE_POLICIES,
                   help="override the configuration's quiesce policy")
    args = p.parse_args(argv)
    if bool(args.domain) != bool(args.disk):
        p.error("--domain and --disk go together")
    group = [t for t in (args.group or "").split(",") if t]
    if args.group is not None and not (args.disk and args.disk in group):
        p.error("--group needs --domain and --disk, and names --disk "
                "among its disks")

    def run():
        from .freeze import Freezer
        config = _load_config()
        watchdog.arm("nbd-prerun", watchdog.seconds(config, "nbd-prerun"))
        try:
            Freezer(config).prerun(args.export, quiesce=args.quiesce,
                                   domain=args.domain, disk=args.disk,
                                   group=group)
        finally:
            _hook_metrics(config)
        return 0
    return _run("nbd-prerun", run, args.verbose)


def postrun_main(argv=None):
    p = _hook_parser(
        "nbd-postrun",
        "Release this connection's hold on a frozen export; the last live "
        "connection commits the overlay back into the base and removes it.  "
        "Run from nbd-server's config as 'postrun = nbd-postrun %s'.",
        "0 released or committed, 1 left for recovery (see syslog and "
        "'nbdsnap status')")
    args = p.parse_args(argv)

    def run():
        from .release import Releaser
        config = _load_config()
        watchdog.arm("nbd-postrun", watchdog.seconds(config,
                                                     "nbd-postrun"))
        try:
            Releaser(config).postrun(args.export)
        finally:
            _hook_metrics(config)
        return 0
    # 0 or 1 only (docs/DESIGN.md): a configuration error also leaves the
    # session for recovery.
    return min(_run("nbd-postrun", run, args.verbose), 1)


def _hook_metrics(config):
    """metrics_file rewritten, if set; loaded only then (a join stays
    light)."""
    if config.metrics_file:
        from . import metrics
        metrics.write_configured(config)


NOT_ROOT = "2 when not run as root"


def _nbdsnap_parser():
    p = argparse.ArgumentParser(
        prog="nbdsnap",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="See and repair nbdsnap's freezes of libvirt disks.  "
                    "Run it as root (exit status %s)." % NOT_ROOT,
        epilog=EPILOG_CONFIG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    st = sub.add_parser(
        "status", help="list sessions, holders and overlays",
        description="List every session: export, domain, disk, phase, "
                    "holders (alive or dead), overlay and its size, age and "
                    "consistency.  Exit status 0, 2 for a configuration "
                    "error, %s." % NOT_ROOT)
    st.set_defaults(run=_status)
    st.add_argument("--json", action="store_true",
                    help="machine-readable output")
    rc = sub.add_parser(
        "recover", help="commit or clean stale and failed sessions",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Bring back every stale or failed freeze of the named exports "
            "(or all of them): a running domain on its overlay is committed "
            "online, a shut-off one offline with qemu-img and its definition "
            "pointed back at the base; an overlay left behind is deleted "
            "only if its content is in the base.  Live sessions are left "
            "alone.  Safe to run while hooks run, and twice at once.", 78),
        epilog="exit status: 0 nothing left stuck, 1 something still stuck "
               "(see the output and syslog), 2 usage or configuration "
               "error, %s" % NOT_ROOT)
    rc.set_defaults(run=_recover)
    what = rc.add_mutually_exclusive_group(required=True)
    what.add_argument("exports", metavar="EXPORT", nargs="*", default=[],
                      help="an exported path, as in nbd-server's config")
    what.add_argument("--all", action="store_true",
                      help="every session and every orphaned overlay")
    rc.add_argument("--dry-run", action="store_true",
                    help="print the plan, change nothing")
    lh = sub.add_parser(
        "libvirt-hook", help="libvirtd's qemu hook (installed, not typed)",
        description="Run by libvirtd as /etc/libvirt/hooks/qemu.d/nbdsnap "
                    "with the domain XML on stdin: refuses to start a "
                    "domain whose disk a client is copying while it is shut "
                    "off.  Exit status 0 let it start, 1 refuse.")
    lh.set_defaults(run=_libvirt_hook)
    lh.add_argument("domain", metavar="DOMAIN")
    lh.add_argument("operation", metavar="OPERATION")
    lh.add_argument("suboperation", metavar="SUBOP")
    lh.add_argument("extra", metavar="EXTRA", nargs="*")
    hi = sub.add_parser(
        "history", help="list the sessions that ended",
        description="List every session that ended: start, length, export, "
                    "domain and disk, connections, consistency, overlay size "
                    "at the commit, commit time and result.  The history "
                    "keeps about the last 3000 sessions.  Exit status 0, "
                    "2 for a configuration error, %s." % NOT_ROOT)
    hi.set_defaults(run=_history)
    hi.add_argument("--json", action="store_true",
                    help="machine-readable output")
    me = sub.add_parser(
        "metrics", help="print or write node_exporter textfile metrics",
        description="Print (or write to FILE, atomically, mode 0644, for "
                    "node_exporter's textfile collector) the host's metrics: "
                    "sessions by verdict, the oldest freeze, overlay bytes, "
                    "and each export's last commit and result.  Exit status "
                    "0, 2 for a configuration error or a FILE that cannot be "
                    "written, %s." % NOT_ROOT)
    me.set_defaults(run=_metrics)
    me.add_argument("-o", "--output", metavar="FILE",
                    help="write FILE (e.g. /var/lib/prometheus/"
                    "node-exporter/nbdsnap.prom) instead of printing")
    ex = sub.add_parser(
        "export", help="print or write nbd-server sections for a domain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Print (or write to FILE, atomically) one nbd-server export "
            "section per disk of DOMAIN: exportname the disk's base, "
            "read-only, the installed hooks with --domain and --disk, and an "
            "authfile of the --allow addresses (FILE's folder, NAME.allow).  "
            "Default: every file or block disk that is not read-only or "
            "shareable.  Several disks are frozen together, at one instant "
            "(prerun's --group names them all in every section): a "
            "connection to any of them holds them all.", 78),
        epilog="exit status: 0 done, 1 refused (unknown domain, no disk to "
               "export, a path the hook's shell would split, a target with "
               "a comma, a FILE not written by nbdsnap), 2 usage or configuration error, %s"
               % NOT_ROOT)
    ex.set_defaults(run=_export)
    ex.add_argument("domain", metavar="DOMAIN")
    ex.add_argument("--disk", metavar="TARGET", action="append", default=[],
                    help="only this disk (repeatable), e.g. vda")
    ex.add_argument("--name", help="section name (default DOMAIN-TARGET; "
                    "with several disks NAME-TARGET, NAME default DOMAIN)")
    ex.add_argument("--allow", metavar="ADDR", action="append", default=[],
                    type=_allow_address,
                    help="a client address or address/prefix allowed to "
                    "connect (repeatable, needs -o); without it, every "
                    "address may")
    ex.add_argument("-o", "--output", metavar="FILE",
                    help="write FILE (e.g. /etc/nbd-server/conf.d/DOM.conf) "
                    "instead of printing, and print 'wrote FILE', or "
                    "'unchanged FILE' when it held the same already")
    ex.add_argument("--force", action="store_true",
                    help="replace a FILE (or authfile) nbdsnap did not write")
    ex.add_argument("--tls", action="store_true",
                    help="force_tls = true in every section: only clients "
                    "with a certificate of [generic]'s cacertfile connect "
                    "(see 'nbdsnap certs'); without it, export warns")
    ex.add_argument("--separate", action="store_true",
                    help="freeze each disk on its own (no --group): the "
                    "copies of several disks are then of different instants")
    ce = sub.add_parser(
        "certs", help="make the TLS certificates of a VM host and its "
        "clone hosts",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Make, with openssl, what is missing in DIR: a CA, the VM "
            "host's server certificate (for nbd-server's [generic] "
            "certfile, keyfile and cacertfile) and, for each --client, a "
            "clone host's folder DIR/clients/NAME in libnbd's layout "
            "(ca-cert.pem, client-cert.pem, client-key.pem), to copy to "
            "the clone host as /etc/pki/libnbd or to name in "
            "nbds://HOST/EXPORT?tls-certificates=FOLDER.  Keys are "
            "ECDSA P-256, files 0600, folders 0700; nothing that exists "
            "is replaced, so a rerun adds clients.", 78),
        epilog="exit status: 0 made (or nothing missing), 1 openssl "
               "failed or a half-made pair is in the way, 2 usage or "
               "configuration error (a bad name, an unsafe DIR), %s"
               % NOT_ROOT)
    ce.set_defaults(run=_certs)
    ce.add_argument("--dir", default="/etc/nbdsnap/tls",
                    help="where the files go (default %(default)s)")
    ce.add_argument("--server-name", metavar="NAME", action="append",
                    default=[],
                    help="a DNS name or address clients use to reach the "
                    "VM host (repeatable; the first is the certificate's "
                    "name); needed the first time")
    ce.add_argument("--client", metavar="NAME", action="append", default=[],
                    help="a clone host to make a folder for (repeatable)")
    ce.add_argument("--days", type=int, default=825,
                    help="how long the server and client certificates are "
                    "valid (default %(default)s; the CA's is 10 years)")
    li = sub.add_parser(
        "lint", help="check nbd-server's configuration",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Read nbd-server's configuration as nbd-server does ([generic], "
            "includedir, the export sections) and print one line per "
            "finding, SECTION: finding: exports that are writable or "
            "copy-on-write, unpaired or unsafe hook strings, exportnames "
            "that are no domain's disk or sit on an overlay now, images "
            "with a backing file, no authfile, the sections of disks frozen "
            "together (--group) that disagree, plain text beyond "
            "loopback, force_tls without [generic]'s certfile and keyfile, "
            "certfile without cacertfile, tlsonly (which nbd-server 3.24 "
            "ignores), TLS files missing or keys others can read, "
            "nbd-server running as a user other than root, AppArmor "
            "before libvirt 12.1.", 78),
        epilog="exit status: 0 no finding, 1 findings, 2 the configuration "
               "cannot be read or nbd-server would refuse it, %s" % NOT_ROOT)
    li.set_defaults(run=_lint)
    li.add_argument("config", metavar="CONFIG", nargs="?",
                    default="/etc/nbd-server/config",
                    help="nbd-server's configuration file (default "
                    "%(default)s)")
    return p


def nbdsnap_main(argv=None):
    p = _nbdsnap_parser()
    args = p.parse_args(argv)
    if args.command == "recover" and not args.all and not args.exports:
        p.error("recover: name EXPORTs or give --all")
    if args.command == "libvirt-hook":
        return _libvirt_hook(args)

    def run():
        # The sessions, their locks and libvirt's system connection are
        # root's: what another user would see is an error or a false report.
        if os.geteuid() != 0:
            raise NotRoot("nbdsnap %s must run as root (the sessions, their "
                          "locks and libvirt's system connection are root's)"
                          % args.command)
        return args.run(args)
    # The report goes to stdout; stderr shows only warnings and errors.
    return _run("nbdsnap", run, stderr_level=logging.WARNING)


def _status(args):
    from . import status as status_mod
    text = status_mod.report(_load_config(), args.json,
                             domain_states=status_mod.libvirt_states)
    _print(text)
    return 0


def _print(text):
    """print(), flushed; a reader that went away (nbdsnap status | head -1)
    ends the output, not the command.  stdout then goes to /dev/null: later
    lines and Python's own flush at exit do not fail again, and a recover
    goes on with the disks that are left, its exit status unchanged."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _recover(args):
    from .recover import Recovery
    stuck = Recovery(_load_config(), out=_print).run(
        args.exports, dry_run=args.dry_run)
    return 1 if stuck else 0


def _history(args):
    from . import history
    entries = history.read(_load_config())
    _print(json.dumps({"sessions": entries}, sort_keys=True, indent=2)
           if args.json else history.format_text(entries))
    return 0


def _metrics(args):
    from nbdsnap.verify import textfile

    from . import metrics
    text = metrics.text(_load_config())
    if args.output is None:
        _print(text.rstrip("\n"))
        return 0
    try:
        textfile.write(args.output, text)
    except OSError as e:
        raise ConfigError("cannot write %s: %s" % (
            args.output, e.strerror or e)) from None
    return 0


def _export(args):
    from . import export as export_mod
    from .sessions import SessionStore
    config = _load_config()
    export_mod.run(args.domain, args.disk, args.name, args.allow,
                   args.output, args.force,
                   is_ours=SessionStore(config).is_ours,
                   manifest_dir=config.manifest_dir if config.digest else None,
                   out=_print, separate=args.separate, tls=args.tls)
    return 0


def _certs(args):
    from . import certs
    if args.days < 1:
        raise ConfigError("--days must be at least 1")
    folder = os.path.abspath(args.dir)
    steps = certs.make(folder, args.server_name, args.client, args.days,
                       out=_print)
    if not steps:
        _print("nothing to make: %s has it all" % folder)
    _print("nbd-server's [generic]:\n    " + "\n    ".join(
        certs.generic_lines(folder)))
    for name in args.client:
        _print("clone host %s: copy %s to it as /etc/pki/libnbd (or name "
               "it in nbds://...?tls-certificates=FOLDER)"
               % (name, os.path.join(folder, "clients", name)))
    return 0


def _lint(args):
    from . import lint as lint_mod, nbd_config
    from .sessions import SessionStore
    conf = nbd_config.read(args.config)
    findings = lint_mod.lint(conf,
                             lint_mod.host(SessionStore(_load_config())))
    for section, finding in findings:
        _print("%s: %s" % (section, finding))
    log.info("lint of %s: %d findings", args.config, len(findings))
    return 1 if findings else 0


def _libvirt_hook(args):
    # libvirtd shows the hook's stderr line in its error; syslog has it too.
    from .libvirt_hook import check
    log_mod.setup("nbdsnap-libvirt-hook", stderr_level=logging.WARNING)
    reason = check(args.domain, args.operation, args.suboperation,
                   sys.stdin.read())
    return 1 if reason else 0


def _allow_address(text):
    from .export import allow_address
    try:
        return allow_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "%r is no IP address or address/prefix" % text)


if __name__ == "__main__":
    sys.exit(nbdsnap_main())
