#!/usr/bin/env bash
# Install/start a local Docker engine and build an offline Debian test image.
#
# Usage:
#   bash tests/docker_setup.sh engine          # install docker.io if needed, start dockerd, wait for `docker info`
#   bash tests/docker_setup.sh image [TAG]     # (engine +) build TAG via debootstrap + docker import (default mngr-test-base:bookworm)
#   bash tests/docker_setup.sh verify [TAG]    # smoke-test run/exec/stop/start/cp/commit/build against TAG
#   bash tests/docker_setup.sh all [TAG]       # engine + image + verify
#
# Designed for a Debian 12 machine, running as root, without systemd as PID 1, with access to the Debian
# package mirror but NOT to any container registry: nothing here ever pulls an image (`--pull=never`).
# Every step is idempotent and safe to re-run while dockerd is running; concurrent runs are serialised by flock.
#
# Environment overrides:
#   MNGR_DOCKER_LOG            dockerd log file               (default /var/log/mngr-dockerd.log)
#   MNGR_DOCKER_STORAGE_DRIVER overlay2 | vfs | fuse-overlayfs (default overlay2, falls back to vfs if overlay2 fails)
#   MNGR_DOCKER_START_TIMEOUT  seconds to wait for the daemon (default 60)
#   MNGR_DEBIAN_MIRROR         mirror for debootstrap          (default: the one apt on this machine uses)
#   MNGR_TEST_CACHE            cache dir                       (default /var/cache/mngr-test)
set -euo pipefail

DEFAULT_TAG="mngr-test-base:bookworm"
SUITE="bookworm"
INCLUDE="python3,tmux,procps,git"
DOCKERD_LOG="${MNGR_DOCKER_LOG:-/var/log/mngr-dockerd.log}"
START_TIMEOUT="${MNGR_DOCKER_START_TIMEOUT:-60}"
CACHE_DIR="${MNGR_TEST_CACHE:-/var/cache/mngr-test}"
LOCK_FILE="/var/lock/mngr-docker-setup.lock"
# Bump when the rootfs post-processing below changes, so stale cached tarballs are not reused.
ROOTFS_RECIPE_VERSION="1"

export DEBIAN_FRONTEND=noninteractive

log() { echo "[docker_setup] $*" >&2; }
die() { echo "[docker_setup] ERROR: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

lock() {
    mkdir -p "$(dirname "$LOCK_FILE")"
    exec 9>"$LOCK_FILE"
    flock -w 900 9 || die "could not acquire $LOCK_FILE within 900s"
}

need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }

apt_install() {
    # apt_install PKG... : install missing packages without recommends and without starting services.
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local t0 created_policy=0
    t0=$(now)
    # Keep maintainer scripts (invoke-rc.d / init.d) from starting dockerd with default options
    # (which would create a docker0 bridge and iptables rules); we start it ourselves below.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    log "apt-get install ${missing[*]}"
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >/tmp/mngr-apt-install.log 2>&1; then
        log "apt-get install failed; running apt-get update and retrying"
        apt-get update >>/tmp/mngr-apt-install.log 2>&1 || true
        if ! apt-get install -y --no-install-recommends "${missing[@]}" >>/tmp/mngr-apt-install.log 2>&1; then
            [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
            tail -n 20 /tmp/mngr-apt-install.log >&2
            die "apt-get install ${missing[*]} failed (see /tmp/mngr-apt-install.log)"
        fi
    fi
    [ "$created_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    log "installed ${missing[*]} in $(elapsed "$t0")"
}

docker_ok() { timeout 20 docker info >/dev/null 2>&1; }

# Is PID alive and running a binary named NAME?
pid_is() {
    local pid="$1" name="$2"
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

running_dockerd_pid() {
    local pid
    pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    if pid_is "$pid" dockerd; then echo "$pid"; return 0; fi
    pid=$(pgrep -x dockerd 2>/dev/null | head -n1 || true)
    [ -n "$pid" ] && echo "$pid"
    return 0
}

clean_stale_pidfiles() {
    # /run is not a tmpfs on these VMs: after a restart the pid files survive and the pid may be reused by an
    # unrelated process, which makes dockerd refuse to start ("pid file found") or believe its managed
    # containerd is still running. Remove them if they don't point at the right binary.
    local f pid
    f=/var/run/docker.pid
    if [ -e "$f" ]; then
        pid=$(cat "$f" 2>/dev/null || true)
        pid_is "$pid" dockerd || rm -f "$f"
    fi
    f=/var/run/docker/containerd/containerd.pid
    if [ -e "$f" ]; then
        pid=$(cat "$f" 2>/dev/null || true)
        pid_is "$pid" containerd || rm -f "$f"
    fi
}

ensure_cgroups() {
    # dockerd needs cgroup hierarchies mounted; normally already there (hybrid v1 + v2 on these VMs).
    if [ -z "$(ls -A /sys/fs/cgroup 2>/dev/null)" ]; then
        log "/sys/fs/cgroup is empty; mounting cgroups with cgroupfs-mount"
        apt_install cgroupfs-mount
        cgroupfs-mount || die "cgroupfs-mount failed; cannot run containers without cgroups"
    fi
}

dockerd_alive() {
    # $! may be a short-lived setsid parent (setsid forks when it is a process-group leader, e.g. under
    # job control), so also look for any dockerd process.
    { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; } || [ -n "$(running_dockerd_pid)" ]
}

wait_for_docker() {
    # wait_for_docker PID DEADLINE_SECONDS -> 0 when `docker info` works, 1 on timeout / daemon death
    local pid="$1" deadline=$(( $(date +%s) + $2 ))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        docker_ok && return 0
        dockerd_alive "$pid" || return 1
        sleep 0.5
    done
    docker_ok
}

start_dockerd() {
    # start_dockerd DRIVER -> echoes pid
    local driver="$1"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    echo "=== $(date -u +%FT%TZ) starting dockerd (storage driver $driver) ===" >>"$DOCKERD_LOG"
    # --storage-driver          overlay2 works on the ext4 root here; vfs is the (slow, disk-hungry) fallback.
    # --iptables=false / --ip-masq=false / --bridge=none
    #                           no docker0 bridge and no host firewall/NAT changes: test containers use
    #                           --network none and no registry is reachable anyway.
    # --exec-opt native.cgroupdriver=cgroupfs
    #                           no systemd here, so the systemd cgroup driver cannot work; make it explicit.
    # containerd is started and supervised by dockerd itself (no separate service needed).
    # setsid+nohup: detach from the caller's session/process group so the daemon outlives this script.
    # 9>&-: do not leak our flock fd into the daemon, or it would hold the setup lock forever.
    setsid nohup dockerd \
        --storage-driver="$driver" \
        --iptables=false --ip-masq=false --bridge=none \
        --exec-opt native.cgroupdriver=cgroupfs \
        >>"$DOCKERD_LOG" 2>&1 </dev/null 9>&- &
    echo $!
}

cmd_engine() {
    need_root
    if docker_ok; then log "engine: docker info already works"; return 0; fi
    lock
    if docker_ok; then log "engine: docker info already works"; return 0; fi
    local t0 pid driver
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v containerd >/dev/null 2>&1 \
        || ! command -v runc >/dev/null 2>&1; then
        apt_install docker.io containerd runc tini iptables
    fi
    command -v docker >/dev/null 2>&1 || die "no docker CLI on PATH after installing docker.io"
    ensure_cgroups

    t0=$(now)
    pid=$(running_dockerd_pid)
    if [ -n "$pid" ]; then
        log "engine: dockerd already running (pid $pid); waiting for it to answer"
        wait_for_docker "$pid" "$START_TIMEOUT" \
            || die "dockerd (pid $pid) is running but 'docker info' failed for ${START_TIMEOUT}s; see $DOCKERD_LOG"
        log "engine: ready after $(elapsed "$t0")"
        return 0
    fi

    clean_stale_pidfiles
    driver="${MNGR_DOCKER_STORAGE_DRIVER:-overlay2}"
    pid=$(start_dockerd "$driver")
    if ! wait_for_docker "$pid" "$START_TIMEOUT"; then
        if [ -z "${MNGR_DOCKER_STORAGE_DRIVER:-}" ] && ! dockerd_alive "$pid" \
            && tail -n 50 "$DOCKERD_LOG" | grep -qiE 'overlay|storage.driver|graphdriver'; then
            log "engine: dockerd failed with overlay2; retrying with the vfs storage driver"
            clean_stale_pidfiles
            driver=vfs
            pid=$(start_dockerd "$driver")
            wait_for_docker "$pid" "$START_TIMEOUT" || true
        fi
    fi
    if ! docker_ok; then
        tail -n 15 "$DOCKERD_LOG" >&2 || true
        if dockerd_alive "$pid"; then
            die "dockerd ($driver) did not answer 'docker info' within ${START_TIMEOUT}s; see $DOCKERD_LOG"
        fi
        die "dockerd ($driver) exited during startup; see $DOCKERD_LOG"
    fi
    log "engine: dockerd pid $(running_dockerd_pid) ($driver) ready after $(elapsed "$t0"); log at $DOCKERD_LOG"
}

detect_mirror() {
    # Print the Debian mirror apt uses for $SUITE (deb822 *.sources first, then one-line *.list).
    # Only files apt itself reads (*.sources, *.list) are considered. Portable awk (Debian ships mawk).
    if [ -n "${MNGR_DEBIAN_MIRROR:-}" ]; then echo "$MNGR_DEBIAN_MIRROR"; return 0; fi
    local f m=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        m=$(awk -v suite="$SUITE" '
            function flush(   n, i, s, u, ok) {
                if (uris != "" && (types == "" || types ~ /(^|[ \t])deb([ \t]|$)/)) {
                    n = split(suites, s, /[ \t]+/); ok = 0
                    for (i = 1; i <= n; i++) if (s[i] == suite) ok = 1
                    if (ok) { split(uris, u, /[ \t]+/); print u[1]; done = 1 }
                }
                types = ""; uris = ""; suites = ""
            }
            done { next }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            { key = tolower($1); $1 = ""; sub(/^[ \t]+/, "") }
            key == "types:"  { types = $0 }
            key == "uris:"   { uris = $0 }
            key == "suites:" { suites = $0 }
            END { if (!done) flush() }
        ' "$f" | head -n1)
        [ -n "$m" ] && break
    done
    if [ -z "$m" ]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [ -f "$f" ] || continue
            m=$(awk -v suite="$SUITE" '
                $1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit }
                }' "$f" | head -n1)
            [ -n "$m" ] && break
        done
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

build_rootfs_tar() {
    # build_rootfs_tar MIRROR OUT_TAR
    local mirror="$1" out="$2" dir t0
    apt_install debootstrap
    mkdir -p "$CACHE_DIR/debs"
    dir=$(mktemp -d /var/tmp/mngr-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$dir'" EXIT
    t0=$(now)
    log "image: debootstrap --variant=minbase --include=$INCLUDE $SUITE $mirror"
    if ! debootstrap --variant=minbase --include="$INCLUDE" --cache-dir="$CACHE_DIR/debs" \
            "$SUITE" "$dir" "$mirror" >/tmp/mngr-debootstrap.log 2>&1; then
        tail -n 20 /tmp/mngr-debootstrap.log >&2
        die "debootstrap failed (see /tmp/mngr-debootstrap.log)"
    fi
    log "image: debootstrap took $(elapsed "$t0")"
    # Slim down: downloaded debs, apt lists, docs/man/locales, logs, and host-specific files that docker
    # bind-mounts anyway (resolv.conf, hostname).
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/* \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/* \
        "$dir"/var/log/* "$dir"/tmp/* "$dir"/etc/resolv.conf "$dir"/etc/hostname
    # Keep future `apt-get install` in derived images from bringing the docs back.
    mkdir -p "$dir/etc/dpkg/dpkg.cfg.d"
    printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\n' \
        > "$dir/etc/dpkg/dpkg.cfg.d/01-mngr-nodoc"
    t0=$(now)
    tar --numeric-owner -C "$dir" -cf "$out.tmp.$$" .
    mv -f "$out.tmp.$$" "$out"
    rm -rf "$dir"
    trap - EXIT
    log "image: rootfs tarball $out ($(du -h "$out" | cut -f1)) written in $(elapsed "$t0")"
}

cmd_image() {
    local tag="${1:-$DEFAULT_TAG}"
    need_root
    cmd_engine
    if image_exists "$tag"; then log "image: $tag already exists"; return 0; fi
    lock
    if image_exists "$tag"; then log "image: $tag already exists"; return 0; fi
    local t_all mirror key tarball t0
    t_all=$(now)
    mirror=$(detect_mirror)
    key=$(printf '%s|%s|%s|minbase|%s' "$SUITE" "$INCLUDE" "$mirror" "$ROOTFS_RECIPE_VERSION" | sha256sum | cut -c1-12)
    mkdir -p "$CACHE_DIR"
    tarball="$CACHE_DIR/rootfs-$SUITE-$key.tar"
    if [ -s "$tarball" ]; then
        log "image: using cached rootfs $tarball"
    else
        build_rootfs_tar "$mirror" "$tarball"
    fi
    t0=$(now)
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap $SUITE minbase +$INCLUDE from $mirror" \
        "$tarball" "$tag" >/dev/null || die "docker import of $tarball as $tag failed"
    log "image: docker import took $(elapsed "$t0")"
    log "image: built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}')) in $(elapsed "$t_all")"
}

cmd_verify() {
    local tag="${1:-$DEFAULT_TAG}"
    need_root
    docker_ok || die "docker engine not running (run: bash $0 engine)"
    image_exists "$tag" || die "image $tag missing (run: bash $0 image $tag)"
    local tmp out cid t0
    # Globals (not locals) because the EXIT trap runs after this function has returned.
    VERIFY_CIDS=() VERIFY_IMGS=()
    VERIFY_TMP=$(mktemp -d /tmp/mngr-docker-verify.XXXXXX)
    tmp="$VERIFY_TMP"
    cleanup_verify() {
        # Only remove what this run created, by id/tag.
        local c
        for c in "${VERIFY_CIDS[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
        for c in "${VERIFY_IMGS[@]}"; do docker rmi -f "$c" >/dev/null 2>&1 || true; done
        rm -rf "$VERIFY_TMP"
    }
    trap cleanup_verify EXIT
    run() { docker run --rm --pull=never --network none "$@"; }
    t0=$(now)

    out=$(run "$tag" python3 -c 'import sys; print(sys.version)') || die "verify: python3 in $tag failed"
    log "verify: python3 -> ${out%%$'\n'*}"
    out=$(run "$tag" tmux -V) || die "verify: tmux -V failed"
    log "verify: tmux -V -> $out"
    out=$(run "$tag" sh -c 'git --version && ps --version') || die "verify: git/ps failed"
    log "verify: ${out//$'\n'/; }"

    cid=$(docker run -d --pull=never --network none "$tag" sleep 600) || die "verify: docker run -d failed"
    VERIFY_CIDS+=("$cid")
    out=$(docker exec "$cid" sh -c 'echo exec-ok') && [ "$out" = exec-ok ] || die "verify: docker exec failed"
    { docker exec "$cid" tmux new-session -d -s verify 'sleep 300' && docker exec "$cid" tmux has-session -t verify; } \
        || die "verify: tmux session inside container failed"
    log "verify: exec ok (incl. tmux session)"
    docker stop -t 1 "$cid" >/dev/null || die "verify: docker stop failed"
    [ "$(docker inspect -f '{{.State.Running}}' "$cid")" = false ] || die "verify: container still running after stop"
    docker start "$cid" >/dev/null || die "verify: docker start failed"
    out=$(docker exec "$cid" echo restarted) && [ "$out" = restarted ] || die "verify: exec after restart failed"
    log "verify: stop/start ok"
    mkdir -p "$tmp/payload/sub" && echo hello-cp > "$tmp/payload/sub/file.txt"
    tar -C "$tmp" -c payload | docker cp - "$cid:/tmp" || die "verify: docker cp of tar stream failed"
    out=$(docker exec "$cid" cat /tmp/payload/sub/file.txt) && [ "$out" = hello-cp ] || die "verify: copied file missing"
    log "verify: docker cp (tar stream) ok"
    docker exec "$cid" sh -c 'echo snapshot > /snapshot-marker' || die "verify: write before commit failed"
    local snap="mngr-verify-snap:$$"
    docker commit "$cid" "$snap" >/dev/null || die "verify: docker commit failed"
    VERIFY_IMGS+=("$snap")
    out=$(run "$snap" cat /snapshot-marker) && [ "$out" = snapshot ] || die "verify: committed image lacks marker"
    log "verify: docker commit ok"
    docker rm -f "$cid" >/dev/null || die "verify: docker rm -f failed"
    VERIFY_CIDS=()
    log "verify: rm -f ok"

    # Classic builder: the docker CLI has no buildx plugin here, so BuildKit is unavailable from a >=23 CLI.
    local built="mngr-verify-build:$$"
    mkdir -p "$tmp/ctx"
    printf 'FROM %s\nRUN echo hi > /x\n' "$tag" > "$tmp/ctx/Dockerfile"
    DOCKER_BUILDKIT=0 docker build --network none -q -t "$built" "$tmp/ctx" >/dev/null 2>"$tmp/build.err" \
        || { cat "$tmp/build.err" >&2; die "verify: DOCKER_BUILDKIT=0 docker build failed"; }
    VERIFY_IMGS+=("$built")
    out=$(run "$built" cat /x) && [ "$out" = hi ] || die "verify: built image lacks /x"
    log "verify: DOCKER_BUILDKIT=0 docker build ok"
    if docker buildx version >/dev/null 2>&1; then
        log "verify: buildx present"
    else
        log "verify: note: buildx missing -> use DOCKER_BUILDKIT=0 (classic builder) for docker build"
    fi
    log "verify: all checks passed in $(elapsed "$t0")"
}

case "${1:-}" in
    engine) cmd_engine ;;
    image) shift; cmd_image "${1:-$DEFAULT_TAG}" ;;
    verify) shift; cmd_verify "${1:-$DEFAULT_TAG}" ;;
    all) shift; cmd_image "${1:-$DEFAULT_TAG}"; cmd_verify "${1:-$DEFAULT_TAG}" ;;
    *) echo "usage: $0 {engine|image [TAG]|verify [TAG]|all [TAG]}" >&2; exit 2 ;;
esac
