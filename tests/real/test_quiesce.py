"""Quiesced freezes on a real guest with a real qemu-guest-agent.

The guest (lab/guest.py) boots Debian's kernel under software emulation,
mounts its exported disk (ext4) at /data and writes files without pause,
each named after the checksum of its content and renamed into place once
fsync'd.  Each test checks what an operator would: the client is served or
refused, the session and history say how consistent the freeze was, the
agent froze and thawed the guest (and never left it frozen), and a copy is
fsck-clean with every finished file intact.
"""

import json
import re
import shutil
import time

import pytest

import lab
from lab import guest as lab_guest
from test_freeze import assert_clean

WARNING = 4
DAEMON = 3


@pytest.fixture
def guest(virt, env):
    name = env.name("qga")
    data = lab_guest.make_data_disk(env.path("data.raw"))
    try:
        g = lab_guest.define_guest(virt, env.folder, name, data)
        # Something to copy: the writer has finished files before the freeze.
        lab.wait_until(lambda: written(g.dom) >= 20, 60,
                       what="the guest's writer to finish 20 files")
        yield g
    finally:
        # Through a new connection: virt's dies if libvirtd is restarted.
        lab.remove_domains(name)


def written(dom):
    return int(lab_guest.guest_control(dom, "written"))


def serve(virt, env, data):
    return virt.nbd_server(env.folder, {"vm": (data, None)}, env.vars)


def sessions(env):
    return json.loads(env.hook("nbdsnap", "status", "--json",
                               check=0).stdout)["sessions"]


def history(env):
    return json.loads(env.hook("nbdsnap", "history", "--json",
                               check=0).stdout)["sessions"]


def assert_thawed(dom):
    assert lab_guest.agent_command(dom, "guest-fsfreeze-status") == "thawed"
    before = written(dom)
    lab.wait_until(lambda: written(dom) > before, 30,
                   what="the guest to write again")


def assert_files_intact(copy, dump):
    files = lab_guest.written_files(copy, dump)
    assert len(files) >= 20
    bad = [n for n, (expected, actual) in files.items()
           if expected != actual]
    assert bad == [], "files that do not match their checksum: %s" % bad
    return files


def restart_agent(dom):
    assert lab_guest.guest_control(dom, "start-agent") == "ok"
    lab.wait_until(lambda: lab_guest.agent_answers(dom), 30,
                   what="the restarted agent to answer")


def records(syslog, prog, severity, *words):
    pattern = re.compile(r"^<%d>%s\[\d+\]: " % (DAEMON * 8 + severity,
                                                 re.escape(prog)))
    return [r for r in list(syslog)
            if pattern.match(r) and all(w in r for w in words)]


def test_require_quiesces_and_the_copy_is_consistent(virt, env, guest):
    env.configure(quiesce="require")
    dom = guest.dom
    server = serve(virt, env, guest.data)
    held = lab.HeldConnection(server.port, "vm")        # the freeze
    at_freeze = written(dom)
    (session,) = sessions(env)
    assert session["consistency"] == "quiesced"
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy, connections=4)
    # The guest wrote on, into the overlay, while the copy was taken.
    assert written(dom) > at_freeze
    held.close()
    assert_clean(env, dom, guest.data)
    assert history(env)[-1]["consistency"] == "quiesced"

    # The agent froze the filesystem for the snapshot and thawed it.
    hook = lab_guest.agent_read_file(dom, "/run/fsfreeze.log")
    assert re.findall(r"fsfreeze-hook (\w+)", hook) == ["freeze", "thaw"]
    qga = lab_guest.agent_read_file(dom, "/run/qga.log")
    assert qga.count('"execute":"guest-fsfreeze-freeze"') == 1, qga
    # qemu-ga does not log while frozen (its log could be on a frozen
    # filesystem): the thaw command itself is not in its log, this is.
    assert qga.count("disabling logging due to filesystem freeze") == 1, qga
    assert qga.count("logging re-enabled due to filesystem unfreeze") == 1
    assert_thawed(dom)

    # Frozen clean: no journal to replay, nothing for fsck to find, and
    # every file the guest had finished is whole.
    status, out = lab_guest.fsck(copy)
    assert status == 0, out
    assert_files_intact(copy, env.path("dump"))


def test_try_without_agent_goes_ahead_crash_consistent(virt, env, guest,
                                                       syslog):
    env.configure(quiesce="try")
    dom = guest.dom
    assert lab_guest.guest_control(dom, "kill-agent") == "ok"
    lab.wait_until(lambda: not lab_guest.agent_answers(dom), 30,
                   what="the killed agent to stop answering")
    server = serve(virt, env, guest.data)
    held = lab.HeldConnection(server.port, "vm")
    (session,) = sessions(env)
    assert session["consistency"] == "crash-consistent"
    assert "quiesce failed" in session["warning"]
    assert "WARNING      quiesce failed" in env.hook("nbdsnap", "status",
                                                    check=0).stdout
    warned = lab.wait_until(
        lambda: records(syslog, "nbd-prerun", WARNING, guest.data,
                        "crash-consistent", "quiesce = try"),
        10, what="the fallback's warning in syslog")
    assert len(warned) == 1, list(syslog)
    copy = env.path("copy.raw")
    lab.nbdcopy(server.uri("vm"), copy, connections=4)
    held.close()
    assert_clean(env, dom, guest.data)
    assert history(env)[-1]["consistency"] == "crash-consistent"

    # A crash-consistent copy is one journal replay away from clean, and
    # the guest's fsync-then-rename still leaves every finished file whole.
    replayed = env.path("replayed.raw")
    shutil.copyfile(copy, replayed)
    lab_guest.fsck(replayed, repair=True)
    status, out = lab_guest.fsck(replayed)
    assert status == 0, out
    assert_files_intact(replayed, env.path("dump"))

    restart_agent(dom)
    assert_thawed(dom)


def test_require_without_agent_refuses(virt, env, guest):
    env.configure(quiesce="require")
    dom = guest.dom
    assert lab_guest.guest_control(dom, "kill-agent") == "ok"
    lab.wait_until(lambda: not lab_guest.agent_answers(dom), 30,
                   what="the killed agent to stop answering")
    server = serve(virt, env, guest.data)
    with pytest.raises(lab.RefusedError):
        lab.HeldConnection(server.port, "vm").close()
    proc = env.hook("nbd-prerun", guest.data, check=1)
    # What it tried, then why it refused: one line each.
    tried, refusal = proc.stderr.splitlines()
    assert tried.startswith("nbd-prerun: ") and "snapshot into" in tried
    assert refusal.startswith("nbd-prerun: ")
    assert "quiesce = require" in refusal and "agent" in refusal
    assert sessions(env) == [] and env.overlays() == []
    assert lab.disk_source(dom, "vda") == guest.data
    assert lab.disk_source(dom, "vda", inactive=True) == guest.data

    restart_agent(dom)
    assert_thawed(dom)


def frozen_status(dom):
    return lab_guest.agent_command(dom, "guest-fsfreeze-status")


def assert_never_left_frozen(dom):
    """Once the agent runs again, the guest is (or is soon) thawed."""
    assert lab_guest.guest_control(dom, "cont-agent") == "ok"
    lab.wait_until(lambda: lab_guest.agent_answers(dom), 30,
                   what="the agent to answer again")
    lab.wait_until(lambda: frozen_status(dom) == "thawed", 30,
                   what="the guest to be thawed")
    assert_thawed(dom)


@pytest.mark.parametrize("policy", ["require", "try"])
def test_hung_agent_is_bounded_and_never_leaves_the_guest_frozen(
        virt, env, guest, policy):
    env.configure(quiesce=policy, quiesce_timeout=3)
    dom = guest.dom
    assert lab_guest.guest_control(dom, "stop-agent") == "ok"
    # Bounded: the hook returns (the subprocess timeout is only a guard).
    proc = env.hook("nbd-prerun", guest.data)
    if policy == "require":
        assert proc.returncode == 1, proc.stderr
        assert "did not answer" in proc.stderr.splitlines()[-1]
        assert sessions(env) == [] and env.overlays() == []
        assert lab.disk_source(dom, "vda") == guest.data
    else:
        assert proc.returncode == 0, proc.stderr
        (session,) = sessions(env)
        assert session["consistency"] == "crash-consistent"
    assert_never_left_frozen(dom)
    if policy == "try":
        env.hook("nbd-postrun", guest.data, check=0)
        assert_clean(env, dom, guest.data)


def test_agent_hung_between_freeze_and_thaw_is_thawed_later(virt, env,
                                                             guest):
    env.configure(quiesce="require", quiesce_timeout=3)
    dom = guest.dom
    assert lab_guest.guest_control(dom, "stop-agent-after-freeze 0.2") == "ok"
    proc = env.hook("nbd-prerun", guest.data)
    # Either libvirt took the snapshot before the agent hung (served,
    # quiesced) or it gave up first (refused); never a frozen guest.
    if proc.returncode == 0:
        (session,) = sessions(env)
        assert session["consistency"] == "quiesced"
    else:
        assert proc.returncode == 1, proc.stderr
        assert lab.disk_source(dom, "vda") == guest.data
    assert_never_left_frozen(dom)
    if proc.returncode == 0:
        env.hook("nbd-postrun", guest.data, check=0)
        assert_clean(env, dom, guest.data)


def test_a_domain_with_no_agent_channel_is_named_so(virt, env, syslog):
    # libvirt says at once that no agent is configured; "did not answer in
    # 10 s" after a fraction of a second sent operators looking for a hung
    # agent that does not exist.
    env.configure(quiesce="try")
    base = lab.make_image(env.path("nochan.raw"), 16, fill=0x11)
    dom = virt.define(env.name("nochan"), [lab.disk_xml(base, "vda")])
    why = "domain %s has no guest agent channel" % dom.name()
    frozen = env.hook("nbd-prerun", base, check=0)
    assert why in frozen.stderr and "did not answer" not in frozen.stderr
    warned = lab.wait_until(
        lambda: records(syslog, "nbd-prerun", WARNING, base, why,
                        "crash-consistent", "quiesce = try"),
        10, what="the fallback's warning in syslog")
    assert len(warned) == 1, list(syslog)
    (session,) = sessions(env)
    assert session["consistency"] == "crash-consistent"
    assert why in session["warning"]
    env.hook("nbd-postrun", base, check=0)
    env.wait_clean()

    refused = env.hook("nbd-prerun", "--quiesce", "require", base, check=1)
    assert refused.stderr.splitlines()[-1] == (
        "nbd-prerun: %s (org.qemu.guest_agent.0): nothing can quiesce its "
        "filesystems (quiesce = require)" % why)
    assert env.sessions() == [] and env.overlays() == []


def test_a_freeze_made_on_purpose_is_left_to_its_owner(virt, env, guest):
    # An operator froze the guest (virsh domfsfreeze) before the client
    # came: nbdsnap neither asks the agent again nor thaws that freeze.
    env.configure(quiesce="try", quiesce_timeout=3)
    dom = guest.dom
    lab_guest.agent_command(dom, "guest-fsfreeze-freeze")
    try:
        env.hook("nbd-prerun", guest.data, check=0)
        (session,) = sessions(env)
        assert session.get("agent_watcher") is None
        assert "already frozen" in session["warning"]
        # A watcher would thaw within a few seconds: give it the time.
        for _ in range(4):
            time.sleep(2)
            assert frozen_status(dom) == "frozen"
    finally:
        lab_guest.agent_command(dom, "guest-fsfreeze-thaw")
    assert_thawed(dom)
    env.hook("nbd-postrun", guest.data, check=0)
    assert_clean(env, dom, guest.data)


def test_agent_watcher_is_in_the_session_and_in_status(virt, env, guest):
    env.configure(quiesce="try", quiesce_timeout=3)
    dom = guest.dom
    # The agent freezes /data, then hangs before it answers or thaws.
    assert lab_guest.guest_control(dom, "stop-agent-after-freeze 0") == "ok"
    env.hook("nbd-prerun", guest.data, check=0)
    (session,) = sessions(env)
    watcher = session["agent_watcher"]
    assert watcher["alive"] is True and watcher["pid"] > 0
    text = env.hook("nbdsnap", "status", check=0).stdout
    assert "agent watch  pid %d (waiting" % watcher["pid"] in text
    assert_never_left_frozen(dom)          # the watcher thawed the guest
    lab.wait_until(lambda: not sessions(env)[0]["agent_watcher"]["alive"],
                   30, what="the watcher to end once it thawed the guest")
    assert "pid %d (ended)" % watcher["pid"] in env.hook(
        "nbdsnap", "status", check=0).stdout
    env.hook("nbd-postrun", guest.data, check=0)
    assert_clean(env, dom, guest.data)
