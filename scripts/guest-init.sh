#!/bin/sh
# /init of the tiny TCG test guest (busybox ash). Packed by scripts/build-guest.sh.
#
# Driven by the kernel command line (/proc/cmdline); prints machine-readable marker
# lines on the console (ttyS0, kernel booted with console=ttyS0):
#
#   LV-READY                      once, after mounts + module loading and the first LV-BLOCK
#   LV-BLOCK vda:2048 sda:8192    all /sys/block/{sd,vd}* with size in 512-byte sectors,
#                                 sorted; printed at start and then only on change
#                                 (checked every 0.5 s: hot-plug, unplug, growth)
#   LV-WROTE <dev> <text>         lv.write=<dev>:<text> done (text read back from disk)
#   LV-READ <dev> <line>          lv.read=<dev>: first line at offset 0 of /dev/<dev>
#   LV-BSIZE <dev> <log> <phys>   lv.bsize=<dev>: the logical and physical block sizes the
#                                 guest's kernel sees on /dev/<dev>
#   LV-FILE <dev> <file> <line>   lv.file=<dev>:<file>: first line of <file> on the ISO 9660
#                                 filesystem of /dev/<dev> (a cdrom, e.g. sr0), mounted read-only
#   LV-COUNT <n>                  lv.counter=<dev>: n is on disk (fsync'ed) when printed
#   LV-FROZEN-COUNT <n>           guest-fsfreeze-freeze with lv.counter running: the counter
#                                 is held and n is what its disk holds until the thaw
#   LV-ACPI-IGNORED               power button pressed while lv.acpi=ignore
#   LV-POWEROFF / LV-REBOOT       right before poweroff -f / reboot -f
#   LV-AGENT <command>            the minimal guest agent received <command>
#   LV-EXEC <pid> <command...>    guest-exec started <command> as <pid>
#   LV-ERROR <what>               anything that went wrong (the guest keeps running)
#   LV-NET <ip>/<prefix> router=<ip> dns=<a,b> domain=<d> mtu=<n> hostname=<h>
#                                 lv.net=dhcp: udhcpc got a lease on eth0 and configured it
#                                 (a value is empty when the server sent no such option)
#   LV-NET-FAIL                   lv.net=dhcp: no eth0, or no lease (udhcpc gave up)
#   LV-NET6 <ip6>/<prefix> dns=<a,b>
#                                 lv.net6=dhcp: dhcp6c (wide-dhcpv6) got an IA_NA address on
#                                 eth0 and configured it (dns: the DHCPv6 DNS option)
#   LV-NET6-FAIL                  lv.net6=dhcp: no global IPv6 address on eth0 within 60 s
#   LV-FETCH <ip>:<port> <line>   lv.fetch=<ip|gw>:<port>: first line a TCP server sent
#   LV-SERVING <port>             lv.serve=<port>: a TCP responder listens; each connection
#                                 gets one line "lv-guest <hostname> <ip>" and is closed
#   LV-ECHO <line>                lv.echo: a line typed on the serial console (ttyS0)
#   LV-CPUS <list>                the online CPUs (/sys/devices/system/cpu/online, e.g. 0-1),
#                                 printed at start and on change (checked every 0.5 s); a
#                                 hot-plugged CPU is brought online first, as a distribution's
#                                 udev rule (SUBSYSTEM=="cpu", ACTION=="add") does
#
# Parameters (repeatable ones are applied in order; values cannot contain spaces):
#   lv.write=<dev>:<text>  write "<text>\n" at offset 0 of /dev/<dev>, sync, read back
#   lv.read=<dev>          print the first line of /dev/<dev>
#   lv.bsize=<dev>         print the block sizes of /dev/<dev> (LV-BSIZE)
#   lv.file=<dev>:<file>   mount /dev/<dev> (iso9660, read-only) and print <file>'s first line
#   lv.counter=<dev>       count every 200 ms, resuming from the value on the disk
#   lv.acpi=poweroff|ignore   what the ACPI power button does (default poweroff)
#   lv.hotplug=list|rw     rw: read and write disks that appear while running (LV-HOTREAD,
#                          LV-HOTWROTE <dev> lv-hot-<dev>); list (default): only LV-BLOCK
#   lv.agent=on|off        answer a qemu-guest-agent channel (org.qemu.guest_agent.0)
#                          if one exists (default on)
#   lv.net=dhcp            bring eth0 up and get a DHCPv4 lease with udhcpc (LV-NET)
#   lv.net6=dhcp           after the DHCPv4 lease: get an IPv6 address with dhcp6c (LV-NET6)
#   lv.gw6=<ip6>           after the DHCPv6 lease: default IPv6 route via <ip6>, on-link (DHCPv6
#                          has no route option; a real guest learns it from cloud-init or an RA)
#   lv.fetch=<ip|gw>:<port>  after the lease: connect, print the first line (LV-FETCH);
#                          gw = the lease's router; an IPv6 address as [ip6]:<port>;
#                          retried for 60 s
#   lv.serve=<port>        after the lease: a TCP responder on <port> (LV-SERVING)
#   lv.mtu=ignore          do not apply the lease's MTU (LV-NET shows mtu= empty)
#   lv.echo                read lines typed on the serial console and print LV-ECHO <line>
#
# PID 1 must never exit (the kernel panics): everything ends in an endless loop.

PATH=/bin:/sbin
export PATH

# ---------------------------------------------------------------- basics
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The initramfs may have no /dev/console node: reopen stdio on the console now.
[ -c /dev/console ] && exec </dev/console >/dev/console 2>&1
mkdir -p /tmp /run /var/run /var/log
mount -t tmpfs tmpfs /tmp 2>/dev/null

err() { echo "LV-ERROR $*"; }

CMDLINE=$(cat /proc/cmdline 2>/dev/null)

# ---------------------------------------------------------------- modules
# /lib/modules/load-order lists module file names (dependencies first), made by
# build-guest.sh. Built-in drivers are simply not in the list.
if [ -r /lib/modules/load-order ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        out=$(insmod "/lib/modules/$mod" 2>&1) || case "$out" in
            *"File exists"*) ;;
            *) err "insmod $mod: $out" ;;
        esac
    done </lib/modules/load-order
else
    err "no /lib/modules/load-order"
fi

# ---------------------------------------------------------------- parameters
ACPI_MODE=poweroff
AGENT=on
HOTPLUG=list
for arg in $CMDLINE; do
    case "$arg" in
        lv.acpi=*) ACPI_MODE=${arg#lv.acpi=} ;;
        lv.hotplug=*) HOTPLUG=${arg#lv.hotplug=} ;;
        lv.agent=*) AGENT=${arg#lv.agent=} ;;
    esac
done

# ---------------------------------------------------------------- helpers
# wait_dev <dev>: wait up to 10 s for /dev/<dev> (scsi scans are asynchronous).
wait_dev() {
    i=0
    while [ ! -b "/dev/$1" ]; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then
            err "no block device /dev/$1"
            return 1
        fi
        sleep 0.1
    done
    return 0
}

# first_line <dev>: first line at offset 0, printable characters only.
# O_DIRECT so that a change made on the host side is seen; buffered as a fallback.
first_line() {
    { dd if="/dev/$1" bs=4096 count=1 iflag=direct 2>/dev/null ||
        dd if="/dev/$1" bs=4096 count=1 2>/dev/null; } | head -n 1 | tr -d '\000-\037\177-\377'
}

# put_line <dev> <text>: write "<text>\n" at offset 0 and flush it to the disk.
put_line() {
    echo "$2" | dd of="/dev/$1" bs=4096 conv=notrunc,fsync 2>/dev/null
}

do_poweroff() {
    sync
    echo "LV-POWEROFF"
    poweroff -f
    sleep 5
    err "poweroff -f returned"
}

do_reboot() {
    sync
    echo "LV-REBOOT"
    reboot -f
    sleep 5
    err "reboot -f returned"
}

# ---------------------------------------------------------------- ACPI power button
# The cloud kernel has no /proc/acpi/event; the ACPI "button" driver reports the
# power button as an input device (KEY_POWER) which busybox acpid reads through
# evdev (/dev/input/event*) and maps to the action PWRF/00000080.
start_acpid() {
    mkdir -p /etc/acpi/PWRF
    case "$ACPI_MODE" in
        poweroff)
            cat >/etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
exec >/dev/console 2>&1
sync
echo "LV-POWEROFF"
poweroff -f
EOF
            ;;
        ignore)
            cat >/etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
echo "LV-ACPI-IGNORED" >/dev/console
EOF
            ;;
        *)
            err "unknown lv.acpi=$ACPI_MODE (use poweroff or ignore); power button ignored"
            printf '#!/bin/sh\necho "LV-ACPI-IGNORED" >/dev/console\n' >/etc/acpi/PWRF/00000080
            ;;
    esac
    chmod 755 /etc/acpi/PWRF/00000080
    if ! ls /dev/input/event* >/dev/null 2>&1; then
        err "no /dev/input/event* (button/evdev missing?): ACPI power button not handled"
        return
    fi
    if ! acpid -c /etc/acpi -l /var/log/acpid.log -p /var/run/acpid.pid; then
        err "acpid failed to start"
        return
    fi
    # acpid daemonizes before it opens the input devices: a power button pressed in between
    # is lost. LV-READY (after this) means the button is handled.
    i=0
    while [ $i -lt 100 ]; do
        pid=$(cat /var/run/acpid.pid 2>/dev/null)
        if [ -n "$pid" ] && ls -l "/proc/$pid/fd" 2>/dev/null | grep -q /dev/input/event; then
            return
        fi
        i=$((i + 1))
        sleep 0.05
    done
    err "acpid did not open /dev/input/event* within 5 s"
}

# ---------------------------------------------------------------- guest agent
# A minimal qemu-guest-agent on the virtio-serial port named org.qemu.guest_agent.0:
# guest-sync(-delimited), guest-ping, guest-info, guest-get-host-name,
# guest-get-osinfo (/etc/os-release + uname), guest-get-time, guest-get-timezone,
# guest-get-users, guest-get-fsinfo, guest-network-get-interfaces, guest-shutdown,
# guest-fsfreeze-{freeze,thaw,status} (LV-FROZEN <n> / LV-THAWED <n>), guest-exec (runs the
# command for real, output captured, LV-EXEC <pid> <command>; arguments without '"' or '\')
# and guest-exec-status. Everything else: CommandNotFound.
agent_port() {
    for n in /sys/class/virtio-ports/*/name; do
        [ -r "$n" ] || continue
        read -r name <"$n"
        if [ "$name" = "org.qemu.guest_agent.0" ]; then
            d=${n%/name}
            echo "/dev/${d##*/}"
            return 0
        fi
    done
    return 1
}

# json_str <key>: the string value of "<key>" in $line (no escapes inside).
json_str() {
    echo "$line" | sed -n "s/.*\"$1\" *: *\"\([^\"]*\)\".*/\1/p"
}

# os_field <KEY>: a value of /etc/os-release, unquoted.
os_field() {
    sed -n "s/^$1=//p" /etc/os-release 2>/dev/null | tr -d '"'
}

# guest-exec: the command runs in the background; its output, errors and exit code land in
# /tmp/lv-exec/<pid>.{out,err,rc}, where guest-exec-status finds them (pid: the background
# job's own process id).
agent_exec() {
    path=$(json_str path)
    args=$(echo "$line" | sed -n 's/.*"arg" *: *\[\([^]]*\)\].*/\1/p')
    set --
    if [ -n "$(echo "$args" | tr -d ' ')" ]; then
        # "a", "b" -> one argument per line
        list=$(echo "$args" | sed 's/^ *"//; s/" *$//; s/" *, *"/\n/g')
        while IFS= read -r a; do
            set -- "$@" "$a"
        done <<EOF
$list
EOF
    fi
    mkdir -p /tmp/lv-exec
    # shellcheck disable=SC2016 # expanded by the inner shell
    sh -c 'd=/tmp/lv-exec/$$; "$@" </dev/null >$d.out 2>$d.err; echo $? >$d.rc.new; mv $d.rc.new $d.rc' \
        lv-exec "$path" "$@" 3>&- &
    echo "LV-EXEC $! $path $*"
    echo "{\"return\": {\"pid\": $!}}" >&3
}

agent_exec_status() {
    epid=$(echo "$line" | sed -n 's/.*"pid" *: *\([0-9]*\).*/\1/p')
    d=/tmp/lv-exec/$epid
    if [ -z "$epid" ] || [ ! -e "$d.out" ]; then
        echo "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Invalid parameter 'pid'\"}}" >&3
    elif [ -e "$d.rc" ]; then
        read -r rc <"$d.rc"
        out=$(base64 <"$d.out" | tr -d '\n')
        errd=$(base64 <"$d.err" | tr -d '\n')
        rm -f "$d.out" "$d.err" "$d.rc"
        echo "{\"return\": {\"exited\": true, \"exitcode\": $rc, \"out-data\": \"$out\", \"err-data\": \"$errd\"}}" >&3
    else
        echo '{"return": {"exited": false}}' >&3
    fi
}

# guest-get-fsinfo: the mounted filesystems with their sizes from df (no disk details: the
# test guest mounts no disk).
agent_fsinfo() {
    sep=""
    printf '{"return": [' >&3
    df -k -P 2>/dev/null | tail -n +2 | while read -r dev blocks used _avail _pct mnt; do
        fstype=$(awk -v m="$mnt" '$2 == m {print $3; exit}' /proc/mounts)
        printf '%s{"name": "%s", "mountpoint": "%s", "type": "%s", "used-bytes": %s, "total-bytes": %s, "disk": []}' \
            "$sep" "$dev" "$mnt" "$fstype" "$((used * 1024))" "$((blocks * 1024))" >&3
        sep=", "
    done
    echo ']}' >&3
}

# guest-network-get-interfaces: every link with its MAC and addresses.
agent_interfaces() {
    sep=""
    printf '{"return": [' >&3
    for l in /sys/class/net/*; do
        n=${l##*/}
        read -r mac <"$l/address" 2>/dev/null || mac=""
        ips=""
        isep=""
        for a in $(ip -o addr show dev "$n" 2>/dev/null | awk '{print $3 "," $4}'); do
            fam=${a%%,*}
            cidr=${a#*,}
            t=ipv4
            [ "$fam" = inet6 ] && t=ipv6
            ips="$ips$isep{\"ip-address-type\": \"$t\", \"ip-address\": \"${cidr%/*}\", \"prefix\": ${cidr#*/}}"
            isep=", "
        done
        printf '%s{"name": "%s", "hardware-address": "%s", "ip-addresses": [%s]}' "$sep" "$n" "$mac" "$ips" >&3
        sep=", "
    done
    echo ']}' >&3
}

agent_loop() {
    port=$1
    while :; do
        if ! exec 3<>"$port"; then
            err "cannot open agent port $port"
            sleep 5
            continue
        fi
        # read fails (EOF) while the host side is not connected: poll.
        while :; do
            if ! IFS= read -r line <&3; then
                sleep 0.5
                continue
            fi
            line=$(echo "$line" | tr -d '\000-\037\177-\377')
            case "$line" in
                *'"execute"'*) ;;
                *) continue ;;
            esac
            cmd=${line#*\"execute\"}
            cmd=${cmd#*\"}
            cmd=${cmd%%\"*}
            echo "LV-AGENT $cmd"
            case "$cmd" in
                guest-sync | guest-sync-delimited)
                    id=${line#*\"id\"}
                    id=${id#*:}
                    id=$(echo "$id" | tr -cd '0-9')
                    [ "$cmd" = guest-sync-delimited ] && printf '\377' >&3
                    echo "{\"return\": ${id:-0}}" >&3
                    ;;
                guest-ping) echo '{"return": {}}' >&3 ;;
                guest-info)
                    echo '{"return": {"version": "lv-0.1", "supported_commands": [{"name": "guest-sync", "enabled": true, "success-response": true}, {"name": "guest-sync-delimited", "enabled": true, "success-response": true}, {"name": "guest-ping", "enabled": true, "success-response": true}, {"name": "guest-info", "enabled": true, "success-response": true}, {"name": "guest-get-host-name", "enabled": true, "success-response": true}, {"name": "guest-get-osinfo", "enabled": true, "success-response": true}, {"name": "guest-get-time", "enabled": true, "success-response": true}, {"name": "guest-get-timezone", "enabled": true, "success-response": true}, {"name": "guest-get-users", "enabled": true, "success-response": true}, {"name": "guest-get-fsinfo", "enabled": true, "success-response": true}, {"name": "guest-network-get-interfaces", "enabled": true, "success-response": true}, {"name": "guest-exec", "enabled": true, "success-response": true}, {"name": "guest-exec-status", "enabled": true, "success-response": true}, {"name": "guest-shutdown", "enabled": true, "success-response": false}, {"name": "guest-fsfreeze-freeze", "enabled": true, "success-response": true}, {"name": "guest-fsfreeze-thaw", "enabled": true, "success-response": true}, {"name": "guest-fsfreeze-status", "enabled": true, "success-response": true}]}}' >&3
                    ;;
                guest-get-host-name) echo "{\"return\": {\"host-name\": \"$(hostname)\"}}" >&3 ;;
                guest-get-osinfo)
                    echo "{\"return\": {\"id\": \"$(os_field ID)\", \"name\": \"$(os_field NAME)\", \"pretty-name\": \"$(os_field PRETTY_NAME)\", \"version\": \"$(os_field VERSION)\", \"version-id\": \"$(os_field VERSION_ID)\", \"kernel-release\": \"$(uname -r)\", \"kernel-version\": \"$(uname -v)\", \"machine\": \"$(uname -m)\"}}" >&3
                    ;;
                guest-get-time) echo "{\"return\": $(date +%s)000000000}" >&3 ;;
                guest-get-timezone) echo '{"return": {"zone": "UTC", "offset": 0}}' >&3 ;;
                guest-get-users)
                    # The console's root "session", since boot.
                    echo "{\"return\": [{\"user\": \"root\", \"login-time\": $(($(date +%s) - $(cut -d. -f1 /proc/uptime))).0}]}" >&3
                    ;;
                guest-get-fsinfo) agent_fsinfo ;;
                guest-network-get-interfaces) agent_interfaces ;;
                guest-exec) agent_exec ;;
                guest-exec-status) agent_exec_status ;;
                guest-fsfreeze-freeze | guest-fsfreeze-freeze-list)
                    # The test guest's disks are raw block devices: flushing them is the
                    # whole of a consistent point. One "filesystem" per virtio disk.
                    sync
                    FROZEN=$(ls -d /sys/block/vd* 2>/dev/null | wc -l)
                    counter_hold
                    echo "LV-FROZEN $FROZEN"
                    echo "{\"return\": $FROZEN}" >&3
                    ;;
                guest-fsfreeze-thaw)
                    counter_release
                    echo "LV-THAWED ${FROZEN:-0}"
                    echo "{\"return\": ${FROZEN:-0}}" >&3
                    FROZEN=0
                    ;;
                guest-fsfreeze-status)
                    if [ "${FROZEN:-0}" -gt 0 ]; then echo '{"return": "frozen"}' >&3; else echo '{"return": "thawed"}' >&3; fi
                    ;;
                guest-shutdown)
                    # Like qemu-ga: no reply on success, the guest just goes away.
                    case "$line" in
                        *'"reboot"'*) do_reboot ;;
                        *) do_poweroff ;;
                    esac
                    ;;
                *)
                    echo "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command $cmd has not been found\"}}" >&3
                    ;;
            esac
        done
    done
}

# ---------------------------------------------------------------- counter freeze (snapshot issue #21)
# A freeze holds the counter between two writes, as a real filesystem freeze holds writers:
# the agent's freeze sets /tmp/lv-hold and waits (up to 10 s) until the counter says, in
# /tmp/lv-held, the value its disk holds; it prints LV-FROZEN-COUNT <n>. The thaw lets it go.
counter_hold() {
    [ -e /tmp/lv-counter-running ] || return 0
    # Frozen already (a second freeze): the counter is held where it was.
    if [ -e /tmp/lv-hold ] && [ -s /tmp/lv-held ]; then
        echo "LV-FROZEN-COUNT $(cat /tmp/lv-held)"
        return 0
    fi
    rm -f /tmp/lv-held
    : >/tmp/lv-hold
    i=0
    while [ ! -s /tmp/lv-held ] && [ $i -lt 200 ]; do
        i=$((i + 1))
        sleep 0.05
    done
    if [ -s /tmp/lv-held ]; then
        echo "LV-FROZEN-COUNT $(cat /tmp/lv-held)"
    else
        err "the counter did not stop for the freeze within 10 s"
    fi
}

counter_release() {
    rm -f /tmp/lv-hold /tmp/lv-held
}

# counter_wait_thawed <n>: called by the counter before each write; n is on its disk.
counter_wait_thawed() {
    [ -e /tmp/lv-hold ] || return 0
    echo "$1" >/tmp/lv-held.new && mv /tmp/lv-held.new /tmp/lv-held
    while [ -e /tmp/lv-hold ]; do sleep 0.05; done
}

# ---------------------------------------------------------------- counter
counter_loop() {
    dev=$1
    wait_dev "$dev" || return
    n=$(first_line "$dev")
    case "$n" in
        '' | *[!0-9]*) n=0 ;;
    esac
    : >/tmp/lv-counter-running
    while :; do
        counter_wait_thawed "$n"
        n=$((n + 1))
        if put_line "$dev" "$n"; then
            echo "LV-COUNT $n"
        else
            err "counter write to /dev/$dev failed at $n"
            n=$((n - 1))
        fi
        sleep 0.2
    done
}

# ---------------------------------------------------------------- block list
# block_list: set $cur to " vda:<sectors> ..." for all /sys/block/{sd,vd}*.
block_list() {
    cur=""
    # sd* sorts before vd*, and each glob is sorted: the list is sorted.
    for d in /sys/block/sd* /sys/block/vd*; do
        [ -e "$d/size" ] || continue
        read -r size <"$d/size" 2>/dev/null || continue
        cur="$cur ${d##*/}:$size"
    done
}

# ---------------------------------------------------------------- start
hostname lv-guest 2>/dev/null
# What guest-get-osinfo reports.
mkdir -p /etc
cat >/etc/os-release <<EOF
ID=lv-test
NAME="lv test guest"
VERSION="1 (busybox)"
VERSION_ID=1
PRETTY_NAME="lv test guest 1 (busybox)"
EOF
start_acpid
# The first LV-BLOCK comes before LV-READY (a test that saw LV-READY reads the disks at once),
# and before any LV-WROTE/LV-READ.
block_list
echo "LV-BLOCK$cur"
last=$cur
echo "LV-READY"

for arg in $CMDLINE; do
    case "$arg" in
        lv.write=*)
            v=${arg#lv.write=}
            dev=${v%%:*}
            text=${v#*:}
            if [ -z "$dev" ] || [ "$dev" = "$v" ]; then
                err "bad lv.write=$v (want <dev>:<text>)"
            elif wait_dev "$dev"; then
                if put_line "$dev" "$text"; then
                    sync
                    echo "LV-WROTE $dev $(first_line "$dev")"
                else
                    err "write to /dev/$dev failed"
                fi
            fi
            ;;
        lv.read=*)
            dev=${arg#lv.read=}
            wait_dev "$dev" && echo "LV-READ $dev $(first_line "$dev")"
            ;;
        lv.bsize=*)
            dev=${arg#lv.bsize=}
            wait_dev "$dev" && echo "LV-BSIZE $dev $(cat "/sys/block/$dev/queue/logical_block_size") $(cat "/sys/block/$dev/queue/physical_block_size")"
            ;;
        lv.file=*)
            v=${arg#lv.file=}
            dev=${v%%:*}
            file=${v#*:}
            if [ -z "$dev" ] || [ "$dev" = "$v" ]; then
                err "bad lv.file=$v (want <dev>:<file>)"
            elif wait_dev "$dev"; then
                mkdir -p "/mnt/$dev"
                if out=$(mount -t iso9660 -o ro "/dev/$dev" "/mnt/$dev" 2>&1); then
                    if [ -r "/mnt/$dev/$file" ]; then
                        echo "LV-FILE $dev $file $(head -n 1 "/mnt/$dev/$file" | tr -d '\000-\037\177-\377')"
                    else
                        err "no $file on /dev/$dev: $(ls "/mnt/$dev" | tr '\n' ' ')"
                    fi
                else
                    err "mount /dev/$dev: $out"
                fi
            fi
            ;;
    esac
done

# lv.echo: each line typed on the serial console comes back as LV-ECHO <line>.
echo_loop() {
    while IFS= read -r line; do
        echo "LV-ECHO $line"
    done </dev/console
}

for arg in $CMDLINE; do
    case "$arg" in
        lv.counter=*) counter_loop "${arg#lv.counter=}" & ;;
        lv.echo) echo_loop & ;;
    esac
done

if [ "$AGENT" != off ]; then
    if port=$(agent_port); then
        agent_loop "$port" &
    fi
fi

# ---------------------------------------------------------------- network (networking issue #18)
# lv.net=dhcp: virtio_net's eth0 gets its address from the DHCP server on the other side
# (the launcher's own server in a pod, passt standalone). udhcpc calls /tmp/lv-udhcpc.sh.
NET=
for arg in $CMDLINE; do
    case "$arg" in
        lv.net=*) NET=${arg#lv.net=} ;;
    esac
done

net_scripts() {
    cat >/tmp/lv-udhcpc.sh <<'EOF'
#!/bin/sh
case "$1" in
    bound | renew)
        ip addr flush dev "$interface"
        grep -q 'lv.mtu=ignore' /proc/cmdline && mtu=
        [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
        prefix=$(ipcalc -p "$ip" "$subnet" | cut -d= -f2)
        ip addr add "$ip/$prefix" dev "$interface"
        r=${router%% *}
        [ -n "$r" ] && ip route add default via "$r" dev "$interface"
        : >/etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
        echo "$ip" >/tmp/lv-ip
        echo "$r" >/tmp/lv-router
        [ -n "$hostname" ] && hostname "$hostname"
        dnsl=$(echo $dns | tr ' ' ',')
        echo "LV-NET $ip/$prefix router=$r dns=$dnsl domain=$domain mtu=$mtu hostname=$hostname" >/dev/console
        ;;
esac
exit 0
EOF
    chmod 755 /tmp/lv-udhcpc.sh
    cat >/tmp/lv-respond.sh <<'EOF'
#!/bin/sh
echo "lv-guest $(hostname) $(cat /tmp/lv-ip 2>/dev/null)"
EOF
    chmod 755 /tmp/lv-respond.sh
}

# net_fetch <ip|gw>:<port>: first line from a TCP server, retried for 60 s.
net_fetch() {
    host=${1%:*}
    port=${1##*:}
    host=${host#[}
    host=${host%]}
    [ "$host" = gw ] && host=$(cat /tmp/lv-router 2>/dev/null)
    i=0
    while [ $i -lt 60 ]; do
        line=$(nc -w 3 "$host" "$port" </dev/null 2>/dev/null | head -n 1 | tr -d '\000-\037\177-\377')
        if [ -n "$line" ]; then
            echo "LV-FETCH $host:$port $line"
            return 0
        fi
        i=$((i + 1))
        sleep 1
    done
    err "fetch $host:$port: no reply in 60 s"
}

# net6_up: dhcp6c asks for one address (IA_NA) and the DNS servers; it adds the address to
# eth0 itself and then runs /tmp/lv-dhcp6c.sh, which records the DNS servers.
net6_up() {
    mkdir -p /var/lib/dhcpv6
    cat >/tmp/lv-dhcp6c.conf <<'EOF'
interface eth0 {
    send ia-na 0;
    request domain-name-servers;
    script "/tmp/lv-dhcp6c.sh";
};
id-assoc na 0 { };
EOF
    cat >/tmp/lv-dhcp6c.sh <<'EOF'
#!/bin/sh
echo "$new_domain_name_servers" >/tmp/lv-dns6.new && mv /tmp/lv-dns6.new /tmp/lv-dns6
exit 0
EOF
    chmod 755 /tmp/lv-dhcp6c.sh
    dhcp6c -f -d -c /tmp/lv-dhcp6c.conf -p /tmp/lv-dhcp6c.pid eth0 >/tmp/lv-dhcp6c.log 2>&1 &
    i=0
    a=
    while [ $i -lt 120 ]; do
        a=$(ip -6 -o addr show dev eth0 scope global 2>/dev/null | awk '{print $4; exit}')
        [ -n "$a" ] && [ -e /tmp/lv-dns6 ] && break
        i=$((i + 1))
        sleep 0.5
    done
    if [ -z "$a" ]; then
        err "dhcp6c: $(tail -n 3 /tmp/lv-dhcp6c.log 2>/dev/null | tr '\n' ' ')"
        echo "LV-NET6-FAIL"
        return 1
    fi
    for arg in $CMDLINE; do
        case "$arg" in
            lv.gw6=*)
                # The IA_NA address is a /128: the gateway is made on-link first.
                gw6=${arg#lv.gw6=}
                { ip -6 route add "$gw6" dev eth0 && ip -6 route add default via "$gw6" dev eth0; } ||
                    err "ip -6 route add default via $gw6"
                ;;
        esac
    done
    echo "LV-NET6 $a dns=$(tr -s ' \n' ',' </tmp/lv-dns6 | sed 's/,$//')"
}

net_up() {
    net_scripts
    i=0
    while [ ! -e /sys/class/net/eth0 ]; do
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then
            err "no eth0"
            echo "LV-NET-FAIL"
            return 1
        fi
        sleep 0.1
    done
    ip link set lo up
    # No duplicate address detection: the link-local and DHCPv6 addresses are usable at once
    # (the guest is alone on its link).
    echo 0 >/proc/sys/net/ipv6/conf/eth0/accept_dad 2>/dev/null
    ip link set eth0 up
    if ! udhcpc -i eth0 -s /tmp/lv-udhcpc.sh -q -f -n -t 30 -T 2 >/tmp/lv-udhcpc.log 2>&1; then
        echo "LV-NET-FAIL"
        return 1
    fi
    for arg in $CMDLINE; do
        case "$arg" in
            lv.net6=dhcp) net6_up ;;
            lv.net6=*) err "unknown $arg (use lv.net6=dhcp)" ;;
        esac
    done
    for arg in $CMDLINE; do
        case "$arg" in
            lv.serve=*)
                p=${arg#lv.serve=}
                nc -ll -p "$p" -e /tmp/lv-respond.sh &
                echo "LV-SERVING $p"
                ;;
        esac
    done
    for arg in $CMDLINE; do
        case "$arg" in
            lv.fetch=*) net_fetch "${arg#lv.fetch=}" ;;
        esac
    done
}

case "$NET" in
    '') ;;
    dhcp) net_up & ;;
    *) err "unknown lv.net=$NET (use dhcp)" ;;
esac

# ---------------------------------------------------------------- block watcher
# hot_rw <dev>: with lv.hotplug=rw, a disk that appears while the guest runs is read
# (LV-HOTREAD <dev> <first line>) and, if it holds no data yet, written
# (LV-HOTWROTE <dev> lv-hot-<dev>): a test can detach it, re-attach it and see the data.
hot_rw() {
    line=$(first_line "$1")
    echo "LV-HOTREAD $1 $line"
    case "$line" in
        lv-hot-*) ;;
        *)
            if put_line "$1" "lv-hot-$1"; then
                sync
                echo "LV-HOTWROTE $1 $(first_line "$1")"
            else
                err "write to hot-plugged /dev/$1 failed"
            fi
            ;;
    esac
}

# cpu_watch: bring hot-plugged (offline) CPUs online, print LV-CPUS when the online set
# changed. Builtins only (no fork): it runs every 0.5 s.
cpus_last=
cpu_watch() {
    for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
        [ -e "$f" ] || continue
        read -r v <"$f" 2>/dev/null || continue
        [ "$v" = 0 ] && { echo 1 >"$f" 2>/dev/null || err "cannot online ${f%/online}"; }
    done
    read -r cpus </sys/devices/system/cpu/online 2>/dev/null || return 0
    if [ "$cpus" != "$cpus_last" ]; then
        echo "LV-CPUS $cpus"
        cpus_last=$cpus
    fi
}

# Every 50 ms a look at the names in /sys/block (a glob: no process forked), so that a new disk
# is reported within 50 ms; every 0.5 s (or when the names change) the full list with sizes,
# which also reports a disk that grew.
tick=0
last_names=
while :; do
    set -- /sys/block/*
    names="$*"
    tick=$((tick + 1))
    if [ "$names" = "$last_names" ] && [ "$tick" -lt 10 ]; then
        sleep 0.05 || sleep 1
        continue
    fi
    tick=0
    last_names=$names
    cpu_watch
    block_list
    if [ "$cur" != "$last" ]; then
        echo "LV-BLOCK$cur"
        if [ "$HOTPLUG" = rw ]; then
            for entry in $cur; do
                dev=${entry%%:*}
                case " $last " in
                    *" $dev:"*) ;;
                    *) wait_dev "$dev" && hot_rw "$dev" ;;
                esac
            done
        fi
        last=$cur
    fi
    sleep 0.05 || sleep 1
done

# not reached; belt and braces
while :; do sleep 3600; done
