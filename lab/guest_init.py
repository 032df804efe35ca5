"""The test guest's own scripts: its /init and qemu-ga's fsfreeze hook.

The guest's /init loads the modules, mounts the data disk (vda, ext4) at
/data, starts qemu-ga (verbose, logging to /run/qga.log and to the console,
with an fsfreeze hook that logs "freeze" and "thaw"), runs a writer without
pause, and answers commands on a second virtio-serial port (CONTROL_PORT) so
that a test can stop, resume, kill and restart the agent without the agent.

Every finished file of the writer is /data/files/SEQ-SHA256, where SHA256
is the checksum of its content: written to /data/tmp/SEQ, fsync'd, then
renamed.  A copy is consistent when every file in files/ matches its name.
"""

AGENT_PORT = "org.qemu.guest_agent.0"
CONTROL_PORT = "org.nbdsnap.control"


# -- the guest's own scripts ---------------------------------------------------

INIT = r"""#!/bin/busybox sh
# /init of the nbdsnap test guest (lab/guest.py).  PID 1: must never exit.
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
say() { echo "nbdsnap-guest: $*" > /dev/console; }
uptime_s() { read up _ < /proc/uptime; echo $up; }

for m in $(cat /etc/modules.load); do
    insmod /lib/modules/$m.ko || say "insmod $m failed"
done

# No udev: name the virtio ports as udev would.
ports() {
    mkdir -p /dev/virtio-ports
    for p in /sys/class/virtio-ports/*; do
        name=$(cat $p/name 2>/dev/null)
        [ -n "$name" ] && ln -sf ../${p##*/} /dev/virtio-ports/$name
    done
    [ -e /dev/virtio-ports/@AGENT@ ] && [ -e /dev/virtio-ports/@CONTROL@ ]
}
n=0
until [ -b /dev/vda ] && ports; do
    n=$((n + 1)); [ $n -gt 400 ] && { say "no vda or ports"; break; }
    sleep 0.05
done

mkdir -p /data
mount -t ext4 /dev/vda /data || say "cannot mount /dev/vda"

start_agent() {
    [ -p /run/qga.fifo ] || mkfifo /run/qga.fifo
    tee -a /run/qga.log < /run/qga.fifo > /dev/console &
    qemu-ga -m virtio-serial -p /dev/virtio-ports/@AGENT@ -t /run -v \
        -F/etc/fsfreeze-hook > /run/qga.fifo 2>&1 &
    echo $! > /run/qga.pid
    say "agent started, pid $! at $(uptime_s)"
}

# Files that carry their checksum in their name, without pause.
writer() {
    mkdir -p /data/files /data/tmp
    i=0
    while :; do
        i=$((i + 1))
        t=/data/tmp/$i
        head -c $(( (i % 16 + 1) * 4096 )) /dev/urandom > $t
        sync $t
        s=$(sha256sum $t)
        mv $t /data/files/$i-${s%% *}
        rm -f /data/files/$((i - 300))-*
        echo $i > /run/written.new && mv /run/written.new /run/written
    done
}

# Commands from the host on the control port, one a line; the reply is
# "COMMAND: RESULT".  The agent is acted on by pid, as a hung agent would be.
control() {
    exec 3<>/dev/virtio-ports/@CONTROL@
    while :; do
        # With no host connected the port reads end of file: poll.
        read -r cmd arg <&3 || { sleep 0.2; continue; }
        pid=$(cat /run/qga.pid)
        case "$cmd" in
        ping) r=pong ;;
        stop-agent) kill -STOP $pid && r=ok || r=failed ;;
        cont-agent) kill -CONT $pid && r=ok || r=failed ;;
        kill-agent) kill -KILL $pid && r=ok || r=failed ;;
        start-agent) start_agent; r=ok ;;
        agent-pid) r=$pid ;;
        agent-state) r=$(sed -n 's/^State:[[:space:]]*//p' /proc/$pid/status 2>/dev/null) ;;
        written) r=$(cat /run/written 2>/dev/null || echo 0) ;;
        thaw) fsfreeze --unfreeze /data && r=ok || r=failed ;;
        stop-agent-after-freeze)
            echo "${arg:-0.5}" > /run/stop-after-freeze; r=ok ;;
        *) r="unknown command" ;;
        esac
        echo "$cmd: ${r:-none}" >&3
    done
}

start_agent
writer &
control &
say "ready at $(uptime_s)"
while :; do sleep 3600; done
""".replace("@AGENT@", AGENT_PORT).replace("@CONTROL@", CONTROL_PORT)

# qemu-ga runs it with "freeze" before freezing and "thaw" after thawing,
# with stdout and stderr on /dev/null: it writes where the host can read.
FSFREEZE_HOOK = r"""#!/bin/sh
read up _ < /proc/uptime
echo "nbdsnap-guest: fsfreeze-hook $1 at $up" | tee -a /run/fsfreeze.log > /dev/console
# Armed by the control command stop-agent-after-freeze SECONDS (once): the
# agent hangs after it has frozen /data, before the thaw.
if [ "$1" = freeze ] && [ -e /run/stop-after-freeze ]; then
    delay=$(cat /run/stop-after-freeze); rm -f /run/stop-after-freeze
    (sleep $delay; kill -STOP $(cat /run/qga.pid)
     echo "nbdsnap-guest: agent stopped $delay s after freeze" > /dev/console) \
        < /dev/null > /dev/null 2>&1 &
fi
"""
