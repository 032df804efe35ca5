"""nbdsnap.hooks.procs: who holds a connection, and is it still alive.

Real processes, started by the test and reaped by it: /proc parsing is
exactly the kind of thing a fake would get right and the kernel would not.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nbdsnap.hooks import procs
from nbdsnap.hooks.procs import Holder

# Fits in comm's 15 characters, and looks like the end of comm plus fields.
ODD_NAME = "x) Z 1 (y z)"


@pytest.fixture
def sleeper(tmp_path):
    """start(name) -> a running Popen of sleep copied to a file called name."""
    started = []

    def start(name="sleep"):
        exe = tmp_path / name
        shutil.copy(shutil.which("sleep"), exe)
        p = subprocess.Popen([str(exe), "30"])
        started.append(p)
        wait_for(lambda: procs._stat(p.pid) is not None
                 and procs._stat(p.pid)[0] == name[:15])
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def state_letter(pid):
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2]


# -- /proc/PID/stat ----------------------------------------------------------

def test_stat_of_our_own_process():
    comm, ppid, start = procs._stat(os.getpid())
    with open("/proc/self/comm") as f:
        assert comm == f.read().rstrip("\n")
    assert ppid == os.getppid()
    assert start > 0


def test_comm_with_spaces_and_parentheses_is_parsed(sleeper):
    p = sleeper(ODD_NAME)
    comm, ppid, start = procs._stat(p.pid)
    assert comm == ODD_NAME
    assert ppid == os.getpid()
    assert start >= procs._stat(os.getpid())[2]


def test_odd_comm_process_is_alive(sleeper):
    p = sleeper(ODD_NAME)
    assert procs.is_alive(procs.holder_of(p.pid))


def test_stat_of_a_reaped_process_is_none():
    p = subprocess.Popen(["true"])
    p.wait(timeout=5)
    assert procs._stat(p.pid) is None
    assert procs.holder_of(p.pid) is None


# -- is_alive ----------------------------------------------------------------

def test_running_holder_is_alive(sleeper):
    p = sleeper()
    h = procs.holder_of(p.pid)
    assert h == Holder(p.pid, procs._stat(p.pid)[2], procs.boot_id())
    assert procs.is_alive(h)


def test_holder_is_dead_once_killed_and_reaped(sleeper):
    p = sleeper()
    h = procs.holder_of(p.pid)
    p.kill()
    p.wait(timeout=5)
    assert not procs.is_alive(h)


def test_exited_but_unreaped_holder_is_dead(sleeper):
    p = sleeper()
    h = procs.holder_of(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    wait_for(lambda: state_letter(p.pid) == "Z")   # a zombie: not reaped
    assert not procs.is_alive(h)
    assert procs.holder_of(p.pid) is None
    p.wait(timeout=5)


def test_holder_from_another_boot_is_dead():
    me = procs.holder_of(os.getpid())
    other = Holder(me.pid, me.start, "00000000-0000-0000-0000-000000000000")
    assert procs.is_alive(me)
    assert not procs.is_alive(other)


def test_current_boot_can_be_given():
    me = procs.holder_of(os.getpid())
    assert procs.is_alive(me, current_boot=me.boot)
    assert not procs.is_alive(me, current_boot="another-boot")


def test_reused_pid_is_not_the_same_holder():
    me = procs.holder_of(os.getpid())
    earlier = Holder(me.pid, me.start - 1, me.boot)
    assert not procs.is_alive(earlier)


def test_boot_id_looks_like_a_uuid():
    b = procs.boot_id()
    assert len(b) == 36 and b.count("-") == 4


def test_holder_round_trips_through_json():
    h = Holder(pid=1234, start=98765, boot="b")
    assert h.to_json() == {"pid": 1234, "start": 98765, "boot": "b"}
    assert Holder.from_json(h.to_json()) == h
    assert Holder.from_json({"pid": "1234", "start": "98765",
                             "boot": "b"}) == h


# -- connection_holder ---------------------------------------------------------

# Run inside the child: who holds this connection, and who are my ancestors.
REPORT = textwrap.dedent("""
    import os
    from nbdsnap.hooks import procs
    h = procs.connection_holder()
    parent = procs._stat(os.getpid())[1]
    grandparent = procs._stat(parent)[1]
    print(h.pid, h.start, parent, procs._stat(parent)[0],
          grandparent, procs._stat(grandparent)[0])
""")


def run_report(argv):
    out = subprocess.run(argv, check=True, capture_output=True, text=True,
                         timeout=30).stdout.split()
    pid, start, parent, parent_comm, gp, gp_comm = out
    return int(pid), int(start), int(parent), parent_comm, int(gp), gp_comm


def test_hook_run_through_sh_is_held_by_the_caller_not_the_shell():
    # "; exit $?" keeps sh from exec'ing python, as system() would.
    pid, start, parent, parent_comm, _, _ = run_report(
        ["sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, REPORT])
    assert parent_comm == "sh"
    assert pid == os.getpid()
    assert start == procs._stat(os.getpid())[2]


def test_hook_run_directly_is_held_by_its_parent():
    pid, _, parent, _, _, _ = run_report([sys.executable, "-c", REPORT])
    assert pid == parent == os.getpid()


def test_nbd_server_ancestor_holds_the_connection(tmp_path):
    # nbd-server (child) -> sh -c -> hook, with this test process above it:
    # the nbd-server child is the holder, not the nearest non-shell.
    server = tmp_path / "nbd-server"
    shutil.copy(shutil.which("sh"), server)
    pid, start, parent, parent_comm, gp, gp_comm = run_report(
        [str(server), "-c", 'sh -c \'"$0" -c "$1"; exit $?\' "$0" "$1"; '
         'exit $?', sys.executable, REPORT])
    assert (parent_comm, gp_comm) == ("sh", "nbd-server")
    assert pid == gp
    assert pid != os.getpid()


def test_connection_holder_of_a_given_pid(sleeper):
    p = sleeper()
    h = procs.connection_holder(p.pid)
    assert h.pid == os.getpid()
