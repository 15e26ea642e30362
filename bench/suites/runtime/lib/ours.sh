# Our side: VEs driven by the `vectl` CLI with a node config of the
# benchmark's own (state, run dir, bridge, cgroup parent, address range),
# sharing nothing with a real node on this machine. Sourced by ../run.

OURS_STATE_DIR=$WORK_DIR/state
OURS_BRIDGE=vzbench0
OURS_CGROUP_PARENT=vzbench
OURS_PREFIX=vzb-
OURS_PROCFS=$RUN_DIR/procfs
export VZ_CONFIG=$WORK_DIR/node.toml

ours_name() { echo "$OURS_PREFIX$1"; }
ours_cgroup() { echo "/sys/fs/cgroup/pids/$OURS_CGROUP_PARENT/$(ours_name "$1")"; }

ours_setup() {
    mkdir -p "$WORK_DIR"
    cat >"$VZ_CONFIG" <<TOML
# Written by bench/suites/runtime/run: a node of the benchmark's own.
state_dir = "$OURS_STATE_DIR"
run_dir = "$RUN_DIR"
templates_dir = "$TEMPLATES_DIR"
cgroup_parent = "$OURS_CGROUP_PARENT"
procfs_mountpoint = "$OURS_PROCFS"
[network]
bridge = "$OURS_BRIDGE"
ipv4_gateway = "10.214.0.1/16"
ipv6_gateway = "fd00:214::1/64"
nat_outbound = false
TOML
}

# ours_create N
ours_create() {
    local name
    name=$(ours_name "$1")
    [[ -d $OURS_STATE_DIR/ves/$name ]] && return 0
    "$VECTL" create "$name" --template busybox --ip "$(nth_address 10.214 "$1")/16" \
        --memory 64M --disk 64M --pids 128 >/dev/null
}

# start = `vectl start` (returns once init runs with its network up) + until
# the VE's init was exec'd; prints init's pid.
ours_start() {
    "$VECTL" start "$(ours_name "$1")" >/dev/null && wait_cgroup_init "$(ours_cgroup "$1")"
}

ours_init_pid() { "$VECTL" show "$(ours_name "$1")" 2>/dev/null | jq -r '.init_pid // empty'; }

# stop + delete: kill at once and tear down (unmount, loop device, veth,
# cgroup); the VE's disk image stays.
ours_stop() { "$VECTL" stop "$(ours_name "$1")" --timeout 0 >/dev/null; }

# Removes every VE of the benchmark with vectl, then whatever a crashed
# vectl may have left: processes in our cgroups, mounts under our run dir,
# loop devices of our images, veths on our bridge, the bridge's nft tables,
# our ve-procfs daemon, our cgroups.
ours_cleanup() {
    local dir name pid mount loop link family
    if [[ -d $OURS_STATE_DIR/ves && -x ${VECTL:-} && -f $VZ_CONFIG ]]; then
        for dir in "$OURS_STATE_DIR"/ves/"$OURS_PREFIX"*; do
            [[ -d $dir ]] || continue
            name=${dir##*/}
            "$VECTL" destroy --force "$name" >/dev/null 2>&1 || log "vectl destroy --force $name failed; removing by hand"
        done
    fi
    for pid in $(pids_in_cgroups /sys/fs/cgroup/pids/"$OURS_CGROUP_PARENT"); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # ve-procfs serving our mountpoint: the one `vectl start` spawned for us.
    for pid in $(pgrep -x ve-procfs 2>/dev/null); do
        tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--mountpoint $OURS_PROCFS " &&
            kill "$pid" 2>/dev/null || true
    done
    sleep 0.2
    for mount in $(awk -v root="$RUN_DIR/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | sort -r); do
        umount -l "$mount" 2>/dev/null || true
    done
    for loop in $(losetup -n -O NAME,BACK-FILE 2>/dev/null | awk -v root="$OURS_STATE_DIR/" 'index($2, root) == 1 { print $1 }'); do
        losetup -d "$loop" 2>/dev/null || true
    done
    if ip link show "$OURS_BRIDGE" >/dev/null 2>&1; then
        for link in $(ip -o link show master "$OURS_BRIDGE" | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }'); do
            ip link del "$link" 2>/dev/null || true
        done
    fi
    remove_bridge "$OURS_BRIDGE"
    for family in bridge ip ip6; do
        nft list table "$family" "$OURS_BRIDGE" >/dev/null 2>&1 && nft delete table "$family" "$OURS_BRIDGE" || true
    done
    for dir in /sys/fs/cgroup/*/"$OURS_CGROUP_PARENT" /sys/fs/cgroup/unified/"$OURS_CGROUP_PARENT"; do
        [[ -d $dir ]] || continue
        find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    return 0
}
