#!/usr/bin/env bash
# A cluster of N hosts on this machine, for trying and testing multi-node runs (root only):
#
#   scripts/simulated_cluster.sh start 2          # hosts node1 and node2
#   scripts/simulated_cluster.sh run node1 -- .venv/bin/python -m app.launch -np 4 \
#       --hosts=node1:2,node2:2 --flagfile=configs/digits_cnn.cfg
#   scripts/simulated_cluster.sh stop             # removes everything start made
#
# Each host is a network namespace (hvdsim-nodeK) with its own hostname (a UTS namespace
# for each process started in it), its own address 10.210.0.K on a private bridge, its own
# share of this machine's cores (the processes started on it inherit that affinity: with
# fewer cores than hosts, one core each in turn), and an SSH server that lets root in with a
# key made for the cluster, so that mpirun, horovodrun and app.launch reach the other hosts
# by ssh as on a real cluster, and size and bind their ranks to the host's cores. Inside the hosts, the
# names node1..nodeN resolve (/etc/netns/hvdsim-nodeK/hosts) and ssh uses the cluster's
# key and host keys (/etc/netns/hvdsim-nodeK/ssh, which `ip netns exec` mounts over
# /etc/ssh). The file system is this machine's, shared by every host, as a cluster's
# shared file system would be. The bridge lives in a namespace of its own (hvdsim-switch):
# no link of the cluster reaches this machine's own interfaces, nothing is routed, and the
# hosts have no route but to each other.
#
#   run HOST -- COMMAND...   runs COMMAND on HOST (as a job's first node would)
#   down HOST                a lost node: takes HOST's link down, then kills every process
#                            on it (stop still removes it)
set -euo pipefail

PREFIX=hvdsim
SUBNET=10.210.0
STATE=${SIMULATED_CLUSTER_STATE:-/run/$PREFIX}
SWITCH=$PREFIX-switch

say() { echo "simulated_cluster: $*"; }
die() { echo "simulated_cluster: error: $*" >&2; exit 1; }

namespaces() { ip netns list | awk -v prefix="$PREFIX-" 'index($1, prefix) == 1 {print $1}'; }

kill_processes_in() {  # every process of namespace $1, until none is left
  local pids
  for _ in $(seq 50); do
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -z "$pids" ] && return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  die "processes left in $1: $pids"
}

stop() {
  for namespace in $(namespaces); do
    kill_processes_in "$namespace"
    ip netns delete "$namespace"
    rm -rf "/etc/netns/$namespace"
  done
  if [ -f "$STATE/made-run-sshd" ]; then rmdir /run/sshd 2>/dev/null || true; fi
  rm -rf "$STATE"
}

host_config() {  # the files /etc/netns/hvdsim-node$1 puts over /etc on host node$1 of $2
  local node=$1 nodes=$2 etc=/etc/netns/$PREFIX-node$1
  mkdir -p "$etc/ssh"
  {
    echo "127.0.0.1 localhost"
    for k in $(seq "$nodes"); do echo "$SUBNET.$k node$k"; done
  } > "$etc/hosts"
  echo "node$node" > "$etc/hostname"
  cat > "$etc/ssh/sshd_config" <<EOF
ListenAddress $SUBNET.$node
HostKey $STATE/ssh_host_ed25519_key
PidFile $STATE/node$node.sshd.pid
PermitRootLogin prohibit-password
AuthorizedKeysFile $STATE/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PrintMotd no
# mpirun and horovodrun open a connection per host and per probe at once
MaxStartups 200
MaxSessions 200
EOF
  cat > "$etc/ssh/ssh_config" <<EOF
Host *
  IdentityFile $STATE/id_ed25519
  UserKnownHostsFile $STATE/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  LogLevel ERROR
EOF
}

cores_of() {  # the cores of host node$1 of $2: an equal share, or one in turn when too few
  local node=$1 nodes=$2 cores share
  cores=$(nproc)
  share=$(( cores / nodes ))
  if [ "$share" -ge 1 ]; then
    echo "$(( (node - 1) * share ))-$(( node * share - 1 ))"
  else
    echo "$(( (node - 1) % cores ))"
  fi
}

# `ip netns exec` mounts a /sys of the host's own, without this machine's control groups
# (SLURM's slurmd needs them): each host mounts them again as this machine has them.
cgroup_mounts() { awk '$2 ~ "^/sys/fs/cgroup" {print $3, $4, $2}' /proc/self/mounts; }

in_host() {  # in_host NODE COMMAND...: COMMAND on NODE, under its hostname, on its cores
  local node=$1; shift
  ip netns exec "$PREFIX-$node" unshare --uts \
    taskset -c "$(cores_of "${node#node}" "$(cat "$STATE/nodes")")" \
    sh -c 'printf "%s\n" "$1" | while read -r type options point; do
             mkdir -p "$point" && mount -t "$type" -o "$options" "$type" "$point"
           done 2>/dev/null
           shift; hostname "$0" && exec "$@"' "$node" "$(cgroup_mounts)" "$@"
}

start() {
  local nodes=$1
  [[ $nodes =~ ^[1-9][0-9]?$ ]] && [ "$nodes" -le 250 ] || die "start N: N hosts, 1 to 250 (got '$nodes')"
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces and an SSH server)"
  for tool in ip unshare taskset ssh ssh-keygen /usr/sbin/sshd; do
    command -v "$tool" >/dev/null || die "$tool missing: install Debian's iproute2, util-linux and openssh-server (make test does)"
  done
  stop
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  echo "$nodes" > "$STATE/nodes"
  trap 'stop' ERR
  ssh-keygen -q -t ed25519 -N '' -C simulated-cluster -f "$STATE/id_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C simulated-cluster-host -f "$STATE/ssh_host_ed25519_key"
  cp "$STATE/id_ed25519.pub" "$STATE/authorized_keys"
  if [ ! -d /run/sshd ]; then mkdir -p /run/sshd; touch "$STATE/made-run-sshd"; fi

  ip netns add "$SWITCH"
  ip -n "$SWITCH" link set lo up
  ip -n "$SWITCH" link add bridge0 type bridge
  ip -n "$SWITCH" link set bridge0 up
  for node in $(seq "$nodes"); do
    local namespace=$PREFIX-node$node
    ip netns add "$namespace"
    ip -n "$namespace" link set lo up
    ip -n "$SWITCH" link add "node$node" type veth peer name cluster0 netns "$namespace"
    ip -n "$SWITCH" link set "node$node" master bridge0 up
    ip -n "$namespace" address add "$SUBNET.$node/24" dev cluster0
    ip -n "$namespace" link set cluster0 up
    echo "node$node,$SUBNET.$node $(cut -d' ' -f1,2 "$STATE/ssh_host_ed25519_key.pub")" \
      >> "$STATE/known_hosts"
    host_config "$node" "$nodes"
  done
  for node in $(seq "$nodes"); do
    in_host "node$node" /usr/sbin/sshd -f /etc/ssh/sshd_config -E "$STATE/node$node.sshd.log"
  done
  for node in $(seq "$nodes"); do  # every host reaches every host by name
    for _ in $(seq 100); do
      in_host node1 ssh "node$node" true 2>/dev/null && break
      sleep 0.1
    done
    in_host node1 ssh "node$node" true || die "node1 cannot ssh to node$node (see $STATE/node$node.sshd.log)"
  done
  trap - ERR
  say "started $nodes hosts: $(seq -s ' ' -f 'node%g' "$nodes") ($SUBNET.1-$nodes, interface cluster0; cores: $(for k in $(seq "$nodes"); do printf 'node%s %s ' "$k" "$(cores_of "$k" "$nodes")"; done))"
  say "run a command on one:  $0 run node1 -- COMMAND"
  say "for example:           $0 run node1 -- mpirun --allow-run-as-root -H $(seq -s , -f 'node%g:1' "$nodes") hostname"
  say "stop and remove all:   $0 stop"
}

down() {
  local namespace=$PREFIX-$1
  ip netns list | grep -qx "$namespace\( .*\)\?" || die "down $1: no such host"
  ip -n "$namespace" link set cluster0 down  # first: a lost node says no goodbye
  kill_processes_in "$namespace"
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop; say "stopped" ;;
  run)
    node=${2:-}; [ "${3:-}" = -- ] || die "usage: $0 run HOST -- COMMAND..."
    ip netns list | grep -q "^$PREFIX-$node\b" || die "run $node: no such host (start the cluster first)"
    shift 3
    in_host "$node" "$@" ;;
  down) down "${2:-}" ;;
  *) die "usage: $0 start [N] | run HOST -- COMMAND... | down HOST | stop" ;;
esac
