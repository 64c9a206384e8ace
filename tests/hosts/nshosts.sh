#!/usr/bin/env bash
# Test hosts as Linux network namespaces, one sshd each, on a private bridge of this machine.
#
#   tests/hosts/nshosts.sh up N     start hosts h1..hN (idempotent), write the inventory
#   tests/hosts/nshosts.sh down     stop everything this harness started, whatever state it is in
#   tests/hosts/nshosts.sh status   list hosts, sshd processes and addresses
#   tests/hosts/nshosts.sh clean    down, then remove what `up` leaves on this machine: the user
#                                   $VDQ_USER and its sudo rule, the /run/netns mount when no
#                                   namespace is left, /var/lib/images when empty
#
# Each host has its own network namespace and address (no default route, no forwarding: the
# only reachable addresses are the bridge's), its own hostname and /etc/hosts, its own
# /var/lib/images (a private mount namespace), and its own sshd with key-only login for root
# and for the unprivileged user $VDQ_USER (passwordless sudo). Everything else (the root
# filesystem, users, packages) is shared with this machine: see tests/hosts/README.md.
#
# Environment: VDQ_PREFIX (default vdq), VDQ_NET (default 10.231.0), VDQ_STATE (default
# tests/hosts/.state), VDQ_USER (default vdqtest), VDQ_EXTRA_PUBKEY (another key to accept).
# Two sets run side by side when all four differ: the namespaces, veths, bridge, /run
# directory and sudo rule are named after VDQ_PREFIX, the addresses come from VDQ_NET, keys,
# sshd configs, ControlPersist sockets and images live under VDQ_STATE, and `down`/`clean`
# touch only their own set (processes are found by namespace, never by a name pattern).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
PFX=${VDQ_PREFIX:-vdq}
NET=${VDQ_NET:-10.231.0}
STATE=${VDQ_STATE:-$HERE/.state}
RUNDIR=/run/nshosts-$PFX
BRIDGE=${PFX}br0
USER_NAME=${VDQ_USER:-vdqtest}

log() { printf '[nshosts] %s\n' "$*"; }

real_python() {
    local ver=$1 cand
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$ver".*/bin/python"$ver" \
                /root/.pyenv/versions/"$ver".*/bin/python"$ver" "/usr/bin/python$ver"; do
        if [ -x "$cand" ] && "$cand" -c 'import sys' >/dev/null 2>&1; then
            echo "$cand"
            return 0
        fi
    done
    return 1
}

hosts_up() {
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PFX}-h[0-9]+$" || true
}

ensure_user() {
    if ! id "$USER_NAME" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash "$USER_NAME"
    fi
    printf '%s ALL=(ALL) NOPASSWD: ALL\n' "$USER_NAME" > "/etc/sudoers.d/90-$PFX-$USER_NAME"
    chmod 0440 "/etc/sudoers.d/90-$PFX-$USER_NAME"
}

ensure_keys() {
    mkdir -p "$STATE" "$RUNDIR"
    chmod 0755 "$RUNDIR"
    if [ ! -f "$STATE/id_ed25519" ]; then
        ssh-keygen -q -t ed25519 -N '' -C "nshosts-$PFX" -f "$STATE/id_ed25519"
    fi
    # sshd reads authorized_keys as the target user with StrictModes: keep it on a root-owned,
    # world-traversable path.
    cat "$STATE/id_ed25519.pub" > "$RUNDIR/authorized_keys"
    if [ -n "${VDQ_EXTRA_PUBKEY:-}" ] && [ -f "$VDQ_EXTRA_PUBKEY" ]; then
        cat "$VDQ_EXTRA_PUBKEY" >> "$RUNDIR/authorized_keys"
    fi
    chmod 0644 "$RUNDIR/authorized_keys"
}

ensure_bridge() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$NET.1/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
}

start_host() {
    local i=$1
    local ns="$PFX-h$i"
    local veth="${PFX}v$i"
    local addr="$NET.$((10 + i))"
    local dir="$STATE/h$i"
    mkdir -p "$dir/images"
    if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        ip netns add "$ns"
    fi
    if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1; then
        ip link del "$veth" >/dev/null 2>&1 || true
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        ip link set "$veth" master "$BRIDGE" up
        ip netns exec "$ns" ip addr add "$addr/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        ip netns exec "$ns" ip link set lo up
    fi
    if [ -f "$dir/sshd.pid" ] && kill -0 "$(cat "$dir/sshd.pid")" 2>/dev/null; then
        return 0
    fi
    [ -f "$dir/ssh_host_ed25519_key" ] || \
        ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh_host_ed25519_key"
    printf '127.0.0.1 localhost\n%s h%s\n' "$addr" "$i" > "$dir/hosts"
    cat > "$dir/sshd_config" <<EOF
ListenAddress $addr:22
HostKey $dir/ssh_host_ed25519_key
PidFile $dir/sshd.pid
AuthorizedKeysFile $RUNDIR/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM yes
StrictModes yes
MaxSessions 64
MaxStartups 64:30:128
Subsystem sftp internal-sftp
EOF
    # sshd runs inside the host's network namespace and a private mount and UTS namespace:
    # every session sees the host's own hostname, /etc/hosts and /var/lib/images.
    ip netns exec "$ns" unshare --mount --uts --propagation private sh -c "
        hostname h$i
        mount --bind '$dir/hosts' /etc/hosts
        mkdir -p /var/lib/images
        mount --bind '$dir/images' /var/lib/images
        exec /usr/sbin/sshd -D -f '$dir/sshd_config'" \
        >"$dir/sshd.log" 2>&1 </dev/null &
    echo $! > "$dir/sshd.launch"
}

write_inventory() {
    local n=$1 i py
    local pys=()
    for v in 3.9 3.11 3.13; do
        if py=$(real_python "$v"); then pys+=("$py"); fi
    done
    [ ${#pys[@]} -gt 0 ] || pys=(/usr/bin/python3)
    {
        echo "---"
        echo "nshosts:"
        echo "  hosts:"
        for i in $(seq 1 "$n"); do
            py=${pys[$(( (i - 1) % ${#pys[@]} ))]}
            echo "    h$i:"
            echo "      ansible_host: $NET.$((10 + i))"
            echo "      ansible_python_interpreter: $py"
            echo "      nshost_python_version: \"$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')\""
        done
        echo "  vars:"
        echo "    ansible_connection: ssh"
        echo "    ansible_user: $USER_NAME"
        echo "    ansible_ssh_private_key_file: $STATE/id_ed25519"
        echo "    ansible_ssh_common_args: >-"
        echo "      -o UserKnownHostsFile=$STATE/known_hosts -o StrictHostKeyChecking=yes"
        echo "      -o IdentitiesOnly=yes -o ControlPath=$STATE/cp-%C"
    } > "$STATE/inventory.yml"
    : > "$STATE/known_hosts"
    for i in $(seq 1 "$n"); do
        printf '%s %s\n' "$NET.$((10 + i))" "$(cut -d' ' -f1,2 "$STATE/h$i/ssh_host_ed25519_key.pub")" \
            >> "$STATE/known_hosts"
    done
}

wait_ssh() {
    local n=$1 i deadline
    deadline=$((SECONDS + 20))
    for i in $(seq 1 "$n"); do
        until ssh -n -o BatchMode=yes -o ConnectTimeout=2 -o UserKnownHostsFile="$STATE/known_hosts" \
                -o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -i "$STATE/id_ed25519" \
                "$USER_NAME@$NET.$((10 + i))" true 2>/dev/null; do
            if [ $SECONDS -ge $deadline ]; then
                log "h$i did not answer over ssh; its log:"
                cat "$STATE/h$i/sshd.log" >&2 || true
                return 1
            fi
            sleep 0.1
        done
    done
}

cmd_up() {
    local n=${1:-3} i
    [ "$(id -u)" = 0 ] || { log "needs root (network namespaces)"; exit 1; }
    [ -x /usr/sbin/sshd ] || { log "/usr/sbin/sshd missing: run tests/hosts/setup.sh"; exit 1; }
    mkdir -p /run/sshd
    ensure_user
    ensure_keys
    ensure_bridge
    for i in $(seq 1 "$n"); do
        start_host "$i"
    done
    write_inventory "$n"
    wait_ssh "$n"
    log "$n host(s) up on $NET.0/24; inventory: $STATE/inventory.yml"
}

cmd_down() {
    local ns pid veth
    # First the processes (sshd and the sessions ControlPersist keeps), while the bridge exists.
    for ns in $(hosts_up); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill "$pid" 2>/dev/null || true
        done
    done
    for _try in $(seq 1 50); do
        local alive=0
        for ns in $(hosts_up); do
            if [ -n "$(ip netns pids "$ns" 2>/dev/null)" ]; then alive=1; fi
        done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for ns in $(hosts_up); do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -9 "$pid" 2>/dev/null || true
        done
    done
    for veth in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | \
                  grep -E "^${PFX}v[0-9]+$" || true); do
        ip link del "$veth" 2>/dev/null || true
    done
    for ns in $(hosts_up); do
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    rm -rf "$RUNDIR"
    rm -f "$STATE"/cp-* "$STATE"/h*/sshd.pid 2>/dev/null || true
    # The hosts' image directories are test data: the next `up` starts empty.
    rm -rf "$STATE"/h*/images 2>/dev/null || true
    log "down: $(hosts_up | wc -l) namespace(s) left"
}

cmd_clean() {
    cmd_down
    # The user is the harness's when its sudo rule is: a user of the same name without the
    # rule is left alone.
    if [ -f "/etc/sudoers.d/90-$PFX-$USER_NAME" ]; then
        rm -f "/etc/sudoers.d/90-$PFX-$USER_NAME"
        if id "$USER_NAME" >/dev/null 2>&1; then
            userdel --remove "$USER_NAME" 2>/dev/null || userdel "$USER_NAME" || true
        fi
        log "clean: user $USER_NAME and its sudo rule removed"
    fi
    # `ip netns add` bind-mounts /run/netns onto itself; with no namespace left it is unused.
    if [ -z "$(ip netns list 2>/dev/null)" ] && mountpoint -q /run/netns 2>/dev/null; then
        if umount /run/netns 2>/dev/null; then rmdir /run/netns 2>/dev/null || true; fi
    fi
    # The hosts' /var/lib/images are bind mounts of $STATE/hN/images over this directory, in
    # their private mount namespaces. Removing it while another set's hosts run (another
    # VDQ_PREFIX) would detach their mounts (the kernel allows rmdir of a directory that is a
    # mount point only in other mount namespaces), so it goes only when no namespace is left.
    if [ -z "$(ip netns list 2>/dev/null)" ]; then
        rmdir /var/lib/images 2>/dev/null || true
    fi
    log "clean: done"
}

cmd_status() {
    local ns
    echo "namespaces: $(hosts_up | tr '\n' ' ')"
    for ns in $(hosts_up); do
        printf '%s: %s pids=%s\n' "$ns" \
            "$(ip netns exec "$ns" ip -4 -o addr show eth0 2>/dev/null | awk '{print $4}')" \
            "$(ip netns pids "$ns" 2>/dev/null | tr '\n' ',')"
    done
    ip link show "$BRIDGE" >/dev/null 2>&1 && echo "bridge: $BRIDGE up" || echo "bridge: none"
}

case "${1:-}" in
    up) cmd_up "${2:-3}" ;;
    down) cmd_down ;;
    clean) cmd_clean ;;
    status) cmd_status ;;
    *) echo "usage: $0 up N | down | clean | status" >&2; exit 2 ;;
esac
