# The LXC peer: unprivileged busybox containers (lxc-create -t busybox), a
# veth on our own bridge with a static address, the same root filesystem
# and init as our VEs. Sourced by ../run.

LXC_PATH=$WORK_DIR/lxc
LXC_BRIDGE=lxcbench0
LXC_GATEWAY=10.215.0.1
LXC_PREFIX=lxcb-
# LXC asks shadow's newuidmap to map ids when it is installed, which grants
# root only the ranges /etc/subuid and /etc/subgid give it.
LXC_SUBID_LINE="root:$PEER_UID_BASE:65536"

lxc_name() { echo "$LXC_PREFIX$1"; }
lxc_cgroup() { echo "/sys/fs/cgroup/pids/lxc.payload.$(lxc_name "$1")"; }

lxc_setup() {
    make_bridge "$LXC_BRIDGE" "$LXC_GATEWAY/16"
    local file
    for file in /etc/subuid /etc/subgid; do
        grep -qxF "$LXC_SUBID_LINE" "$file" 2>/dev/null || echo "$LXC_SUBID_LINE" >>"$file"
    done
    mkdir -p "$LXC_PATH"
}

# The first container comes from LXC's busybox template; its config is
# then adjusted (below) and its root filesystem replaced by the peers'
# shared one, so all sides run the same files.
lxc_create_first() {
    local name defaults
    name=$(lxc_name 0)
    defaults=$WORK_DIR/lxc-default.conf
    cat >"$defaults" <<CONF
lxc.net.0.type = veth
lxc.net.0.link = $LXC_BRIDGE
lxc.net.0.flags = up
lxc.net.0.ipv4.address = $(nth_address 10.215 0)/16
lxc.net.0.ipv4.gateway = $LXC_GATEWAY
lxc.idmap = u 0 $PEER_UID_BASE 65536
lxc.idmap = g 0 $PEER_UID_BASE 65536
CONF
    lxc-create -P "$LXC_PATH" -n "$name" -t busybox -f "$defaults" >"$LOG_DIR/lxc-create.log" 2>&1 ||
        die "lxc-create -t busybox failed, see $LOG_DIR/lxc-create.log"
    local config=$LXC_PATH/$name/config
    # The template binds the host's /lib and /usr/lib into the container for
    # dynamically linked busybox builds; Debian's is static, so they only
    # cost LXC time: drop them. No ttys: the inittab runs no getty (our VEs
    # have none either). Same limits as our VEs.
    sed -i -e '\#^lxc.mount.entry = /\(usr/\)\?lib\(64\)\? #d' -e 's/^lxc.tty.max = .*/lxc.tty.max = 0/' "$config"
    cat >>"$config" <<CONF
lxc.cgroup.memory.limit_in_bytes = 64M
lxc.cgroup.pids.max = 128
CONF
    rm -rf "$LXC_PATH/$name/rootfs"
    cp -a "$PEER_ROOTFS" "$LXC_PATH/$name/rootfs"
}

# Further containers: a copy of the first (what lxc-copy does), with their
# own name, address and root filesystem copy.
# lxc_create N
lxc_create() {
    local n=$1 name first
    name=$(lxc_name "$n")
    first=$(lxc_name 0)
    [[ -d $LXC_PATH/$name ]] && return 0
    ((n == 0)) && { lxc_create_first; return; }
    mkdir "$LXC_PATH/$name"
    cp -a "$PEER_ROOTFS" "$LXC_PATH/$name/rootfs"
    chown --reference="$LXC_PATH/$first" "$LXC_PATH/$name"
    chmod --reference="$LXC_PATH/$first" "$LXC_PATH/$name"
    sed -e "s#$LXC_PATH/$first/#$LXC_PATH/$name/#" \
        -e "s#^lxc.uts.name = .*#lxc.uts.name = \"$name\"#" \
        -e "s#^lxc.net.0.ipv4.address = .*#lxc.net.0.ipv4.address = $(nth_address 10.215 "$n")/16#" \
        "$LXC_PATH/$first/config" >"$LXC_PATH/$name/config"
}

# Starts container N; prints init's pid once init was exec'd.
# start = lxc-start -d (returns when the monitor reports RUNNING) + lxc-wait
# RUNNING + until the container's init was exec'd.
lxc_start() {
    local name
    name=$(lxc_name "$1")
    lxc-start -P "$LXC_PATH" -n "$name" -d -o "$LOG_DIR/lxc-start.log" -l WARN &&
        lxc-wait -P "$LXC_PATH" -n "$name" -s RUNNING -t 10 &&
        wait_cgroup_init "$(lxc_cgroup "$1")"
}

# init's pid as LXC reports it (for verification outside the timings).
lxc_init_pid() { lxc-info -P "$LXC_PATH" -n "$(lxc_name "$1")" -p -H 2>/dev/null; }

lxc_running() { init_execd "$(lxc_init_pid "$1")"; }

# stop + delete: kill at once and tear down the runtime state (network,
# cgroups, mounts); the container's files stay for the next run, as our
# VE's disk does after `vectl stop`.
lxc_stop() { lxc-stop -P "$LXC_PATH" -n "$(lxc_name "$1")" -k; }

lxc_cleanup() {
    local dir name
    if [[ -d $LXC_PATH ]]; then
        for dir in "$LXC_PATH"/"$LXC_PREFIX"*; do
            [[ -d $dir ]] || continue
            name=${dir##*/}
            lxc-stop -P "$LXC_PATH" -n "$name" -k >/dev/null 2>&1 || true
            lxc-destroy -P "$LXC_PATH" -n "$name" >/dev/null 2>&1 || rm -rf "$dir"
        done
        rm -rf "$LXC_PATH"
    fi
    # Cgroups LXC leaves behind after a failed start.
    # lxc.pivot is LXC's own helper cgroup; rmdir only removes it when empty.
    for dir in /sys/fs/cgroup/*/lxc.payload."$LXC_PREFIX"* /sys/fs/cgroup/*/lxc.monitor."$LXC_PREFIX"* /sys/fs/cgroup/*/lxc.pivot; do
        [[ -d $dir ]] && rmdir "$dir" 2>/dev/null || true
    done
    remove_bridge "$LXC_BRIDGE"
    local file
    for file in /etc/subuid /etc/subgid; do
        grep -qxF "$LXC_SUBID_LINE" "$file" 2>/dev/null && sed -i "\\#^$LXC_SUBID_LINE\$#d" "$file"
    done
    return 0
}
