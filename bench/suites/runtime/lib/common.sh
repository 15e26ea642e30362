# Shared helpers of the runtime benchmark: logging, timing, statistics, the
# RESULT line, host memory, kernel limits. Sourced by ../run.

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Milliseconds since the epoch as a decimal (bash's $EPOCHREALTIME: no fork,
# so the timer adds nothing measurable to what it times).
now_ms() { local t=${EPOCHREALTIME/./}; echo "${t:0:-3}.${t: -3}"; }
elapsed_ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", b - a }'; }

# Median of the numbers given as arguments (the mean of the two middle ones
# when the count is even).
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "null"; exit }
        if (NR % 2) printf "%.1f\n", v[(NR + 1) / 2]
        else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# One RESULT line in the format of BENCHMARKS.md.
# result METRIC UNIT OURS PEER PEER_VALUE BETTER RUNS
result() {
    local metric=$1 unit=$2 ours=$3 peer=$4 peer_value=$5 better=$6 runs=$7 ratio
    ratio=$(awk -v o="$ours" -v p="$peer_value" 'BEGIN {
        if (o == "null" || p == "null" || p + 0 == 0) print "null"; else printf "%.3f", o / p }')
    printf 'RESULT {"bench":"runtime","metric":"%s","unit":"%s","ours":%s,"peer":"%s","peer_value":%s,"ratio":%s,"better":"%s","runs":%s}\n' \
        "$metric" "$unit" "$ours" "$peer" "$peer_value" "$ratio" "$better" "$runs"
}

# Host memory in use that no reclaim would free, KiB, as the sum of the
# kernel's own counters: anonymous pages, shared memory, buffers (metadata
# of mounted filesystems), unreclaimable slab, kernel stacks, page tables,
# vmalloc, per-cpu memory. Read right after dropping the page cache,
# dentries and inodes. Not MemTotal - MemAvailable (nor MemTotal -
# MemFree - caches): on this shared VM those move by hundreds of MiB
# within seconds while every counter above stays put, and MemAvailable
# counts the file pages containers map (their busybox) as available.
host_used_kib() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    awk '/^(AnonPages|Shmem|Buffers|SUnreclaim|KernelStack|PageTables|VmallocUsed|Percpu):/ { sum += $2 }
        END { print sum }' /proc/meminfo
}

# A process's proportional share (KiB) of the memory host_used_kib counts:
# anonymous and shared-memory pages (file pages are page cache, which
# host_used_kib leaves out). Proportional, not RSS: the processes of one
# container share pages, which RSS would count once per process.
unreclaimable_pss_kib() {
    local key value rest anon=0 shmem=0
    while read -r key value rest; do
        case $key in
            Pss_Anon:) anon=$value ;;
            Pss_Shmem:) shmem=$value; break ;;
        esac
    done 2>/dev/null <"/proc/$1/smaps_rollup" || true
    echo $((anon + shmem))
}

# Whether pid $1 belongs to a container side: it sits in a container's
# cgroup (ours: vzbench/, LXC: lxc.payload.* and its monitors in
# lxc.monitor.*, crun: crunbench/), or it is the ve-procfs serving our VEs.
side_process() {
    local pid=$1 hierarchy controllers path comm
    while IFS=: read -r hierarchy controllers path; do
        [[ $controllers == pids ]] || continue
        case $path in
            /"$OURS_CGROUP_PARENT"/* | /lxc.payload.* | /lxc.monitor.* | /"$CRUN_CGROUP_PARENT"/*) return 0 ;;
        esac
        break
    done 2>/dev/null <"/proc/$pid/cgroup" || return 1
    read -r comm 2>/dev/null <"/proc/$pid/comm" || return 1
    [[ $comm == ve-procfs ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "--mountpoint $OURS_PROCFS "
}

# unreclaimable_pss_kib of every process on the host that belongs to no
# container side, summed: compilers and tests other people run on this
# machine, this script.
foreign_pss_kib() {
    local dir total=0
    for dir in /proc/[0-9]*; do
        side_process "${dir#/proc/}" && continue
        total=$((total + $(unreclaimable_pss_kib "${dir#/proc/}")))
    done
    echo "$total"
}

# Host memory the container sides account for, KiB: host_used_kib minus
# foreign_pss_kib, so other work on this shared machine (a compiler taking
# a GiB) does not show up as container overhead. What remains is the
# kernel's memory (page tables, slab, loop devices, mounts, network
# devices...), the containers' processes and the sides' helper processes. Median of five readings a second apart: a process that starts
# or exits between reading /proc/meminfo and scanning the processes skews
# one reading. Logs the parts.
side_memory_kib() {
    local readings=() i used foreign
    for i in 1 2 3 4 5; do
        used=$(host_used_kib)
        foreign=$(foreign_pss_kib)
        readings+=("$((used - foreign))")
        log "memory reading: host used $used KiB, other processes' PSS $foreign KiB => $((used - foreign)) KiB"
        ((i < 5)) && sleep 1
    done
    median "${readings[@]}" | cut -d. -f1
}

# unreclaimable_pss_kib of the given pids, summed.
pss_kib_of_pids() {
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(unreclaimable_pss_kib "$pid")))
    done
    echo "$total"
}

# Every pid in the cgroup directories given (v1 memory hierarchy), recursively.
pids_in_cgroups() {
    local dir
    for dir in "$@"; do
        [[ -d $dir ]] || continue
        find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null
    done
}

# Whether pid $1 is alive and runs the busybox init (comm "init"), i.e. the
# container's init was exec'd (before the exec its comm is the runtime's).
init_execd() {
    local pid=$1 comm
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == init ]]
}

# Kernel limits raised for the density run, restored on exit.
declare -A SAVED_SYSCTLS=()
raise_sysctl() {
    local key=$1 wanted=$2 path current
    path=/proc/sys/${key//.//}
    [[ -w $path ]] || { log "cannot raise $key: $path is not writable"; return 0; }
    current=$(<"$path")
    if ((current < wanted)); then
        [[ -n ${SAVED_SYSCTLS[$key]:-} ]] || SAVED_SYSCTLS[$key]=$current
        echo "$wanted" >"$path"
        log "raised $key from $current to $wanted (restored on exit)"
    fi
}
restore_sysctls() {
    local key
    for key in "${!SAVED_SYSCTLS[@]}"; do
        echo "${SAVED_SYSCTLS[$key]}" >"/proc/sys/${key//.//}" 2>/dev/null || true
        unset 'SAVED_SYSCTLS[$key]'
    done
}

# Host tuning for every side alike: with favordynmods the kernel keeps the
# cgroup threadgroup lock in its slow-path mode, so moving a task into a
# cgroup (every container start, on every side: ours, LXC and crun all
# write cgroup.procs on this cgroup v1 host) skips an RCU grace period
# (10-25 ms here). vz-node sets it on every node, so the benchmark does as
# a node would; the kernel keeps it until the next boot.
CGROUP2_MOUNT=/sys/fs/cgroup/unified
favor_cgroup_moves() {
    if grep -q " $CGROUP2_MOUNT cgroup2 " /proc/mounts && ! grep -q " $CGROUP2_MOUNT cgroup2 [^ ]*favordynmods" /proc/mounts; then
        mount -o remount,favordynmods "$CGROUP2_MOUNT" && log "cgroup2 remounted with favordynmods, as vz-node does on a node"
    fi
}

# A bridge of our own with a gateway address on it.
# make_bridge NAME ADDRESS/PREFIX
make_bridge() {
    local name=$1 address=$2
    ip link show "$name" >/dev/null 2>&1 || ip link add "$name" type bridge
    ip addr replace "$address" dev "$name"
    ip link set "$name" up
}
remove_bridge() { ip link show "$1" >/dev/null 2>&1 && ip link del "$1" || true; }

# IPv4 address number $2 (0-based) in the /16 whose first two octets are $1,
# skipping .0.0 to .0.9 (the gateway is .0.1).
nth_address() {
    local prefix=$1 n=$(($2 + 10))
    echo "$prefix.$((n / 250)).$((n % 250 + 1))"
}

# The peers' root filesystem: the files of our busybox template image
# (same binary, same inittab, same rcS, same daemons), owned by the host
# uid range PEER_UID_BASE..+65535 so a container whose user namespace maps
# root there owns its files, as our VEs' root owns theirs.
# prepare_peer_rootfs TEMPLATE_IMG DEST
prepare_peer_rootfs() {
    local image=$1 dest=$2 mnt
    [[ -f $image ]] || die "template image $image is missing (run images/build busybox)"
    rm -rf "$dest"
    mkdir -p "$dest" "$TEMPLATE_MOUNT"
    mount -o ro,loop "$image" "$TEMPLATE_MOUNT"
    cp -a "$TEMPLATE_MOUNT/." "$dest/"
    umount "$TEMPLATE_MOUNT"
    rm -rf "$dest/lost+found"
    # The template stores every file as uid/gid 0; shift them all.
    if [[ -n $(find "$dest" \( ! -uid 0 -o ! -gid 0 \) -print -quit) ]]; then
        die "template $image has files not owned by root: the ownership shift below assumes uid/gid 0 only"
    fi
    chown -R -h "$PEER_UID_BASE:$PEER_UID_BASE" "$dest"
}

# The pid of the container's init once it was exec'd: polls the cgroup's
# processes for one whose comm is "init" (up to 5 s). Empty if none.
# wait_cgroup_init CGROUP_DIR
wait_cgroup_init() {
    local dir=$1 deadline=$((SECONDS + 5)) pid
    while ((SECONDS < deadline)); do
        if [[ -r $dir/cgroup.procs ]]; then
            while read -r pid; do
                init_execd "$pid" && { echo "$pid"; return 0; }
            done <"$dir/cgroup.procs"
        fi
        sleep 0.001
    done
    return 1
}
