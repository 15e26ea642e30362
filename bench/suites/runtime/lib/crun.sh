# The crun peer: an OCI bundle (`crun spec --rootless` as the base) with
# pid, network, ipc, uts, mount and user namespaces (root mapped to the same
# host uid range as the LXC peer), the same root filesystem and the same
# busybox /sbin/init as our VEs, and the same memory and pids limits. No
# veth: crun only creates the empty network namespace. Sourced by ../run.
#
# crun refuses to run on a hybrid cgroup host whose cgroup2 hierarchy has
# any controller enabled (here: hugetlb), even though it drives the v1
# controllers fine. So crun runs in a mount namespace of its own where an
# empty file hides /sys/fs/cgroup/unified/cgroup.controllers; entering it
# costs an `nsenter` per crun command, which crun_nsenter_overhead_ms
# measures and the run script subtracts from crun's start times.

CRUN_ROOT=/run/vz-bench/crun
CRUN_BUNDLE=$WORK_DIR/crun
CRUN_NAME=crunb-0
CRUN_CGROUP_PARENT=crunbench
CRUN_MNTNS=$RUN_DIR/crun-mntns

crun_cmd() { nsenter --mount="$CRUN_MNTNS" crun --root "$CRUN_ROOT" "$@"; }

crun_cgroup() { echo "/sys/fs/cgroup/pids/$CRUN_CGROUP_PARENT/$CRUN_NAME"; }

crun_setup() {
    rm -rf "$CRUN_BUNDLE"
    mkdir -p "$CRUN_BUNDLE" "$CRUN_ROOT"
    if ! mountpoint -q "$CRUN_MNTNS"; then
        touch "$CRUN_MNTNS" "$RUN_DIR/empty"
        unshare --mount="$CRUN_MNTNS" --propagation slave true
        nsenter --mount="$CRUN_MNTNS" mount --bind "$RUN_DIR/empty" /sys/fs/cgroup/unified/cgroup.controllers
    fi
    cp -a "$PEER_ROOTFS" "$CRUN_BUNDLE/rootfs"
    (cd "$CRUN_BUNDLE" && crun spec --rootless)
    local map="[{\"containerID\":0,\"hostID\":$PEER_UID_BASE,\"size\":65536}]"
    # Root in the container keeps every capability but those LXC's busybox
    # template drops (as in the LXC peer): the rootless spec's three would
    # make the boot scripts fail (sethostname) where the other sides' succeed.
    local caps
    caps=$(printf '"CAP_%s",' CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP \
        LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_RAWIO \
        SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TTY_CONFIG MKNOD LEASE \
        AUDIT_WRITE AUDIT_CONTROL SETFCAP SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF \
        CHECKPOINT_RESTORE)
    jq --argjson map "$map" --argjson caps "[${caps%,}]" --arg cgroup "/$CRUN_CGROUP_PARENT/$CRUN_NAME" '
        .process.args = ["/sbin/init"]
        | .process.capabilities = {"bounding": $caps, "effective": $caps, "permitted": $caps}
        | .process.terminal = false
        | .process.user = {"uid": 0, "gid": 0}
        | .root.readonly = false
        | .hostname = "crunb"
        | .linux.uidMappings = $map
        | .linux.gidMappings = $map
        | .linux.cgroupsPath = $cgroup
        | .linux.resources = {"memory": {"limit": 67108864}, "pids": {"limit": 128}}
        ' "$CRUN_BUNDLE/config.json" >"$CRUN_BUNDLE/config.json.new"
    mv "$CRUN_BUNDLE/config.json.new" "$CRUN_BUNDLE/config.json"
}

# start = crun create + crun start + until init was exec'd; prints its pid.
crun_start() {
    crun_cmd create --bundle "$CRUN_BUNDLE" "$CRUN_NAME" </dev/null >/dev/null 2>>"$LOG_DIR/crun.log" &&
        crun_cmd start "$CRUN_NAME" 2>>"$LOG_DIR/crun.log" &&
        wait_cgroup_init "$(crun_cgroup)"
}

crun_init_pid() { crun_cmd state "$CRUN_NAME" 2>/dev/null | jq -r '.pid // empty'; }

crun_stop() { crun_cmd delete -f "$CRUN_NAME" >/dev/null 2>>"$LOG_DIR/crun.log"; }

crun_cleanup() {
    if [[ -d $CRUN_ROOT ]]; then
        if mountpoint -q "$CRUN_MNTNS"; then
            crun_cmd delete -f "$CRUN_NAME" >/dev/null 2>&1 || true
        fi
        rm -rf "$CRUN_ROOT"
    fi
    mountpoint -q "$CRUN_MNTNS" && umount "$CRUN_MNTNS"
    rm -f "$CRUN_MNTNS" "$RUN_DIR/empty"
    local dir
    for dir in /sys/fs/cgroup/*/"$CRUN_CGROUP_PARENT"; do
        [[ -d $dir ]] || continue
        find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    done
    rm -rf "$CRUN_BUNDLE"
}

# What one `nsenter` into crun's mount namespace adds to a command, in ms:
# median of (nsenter + true) minus median of (true), 20 runs each.
crun_nsenter_overhead_ms() {
    local with=() without=() i t0 t1
    for ((i = 0; i < 20; i++)); do
        t0=$(now_ms); nsenter --mount="$CRUN_MNTNS" true; t1=$(now_ms)
        with+=("$(elapsed_ms "$t0" "$t1")")
        t0=$(now_ms); /bin/true; t1=$(now_ms)
        without+=("$(elapsed_ms "$t0" "$t1")")
    done
    awk -v a="$(median "${with[@]}")" -v b="$(median "${without[@]}")" 'BEGIN { d = a - b; printf "%.1f\n", (d > 0 ? d : 0) }'
}
