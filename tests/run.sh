#!/usr/bin/env bash
# The dsfleet test suite on a fresh Debian/Ubuntu machine. Installs everything it needs: apt packages (as root),
# the controller venv with Ansible, molecule, pytest and linters (.venv), and, through the real setup.yml, the
# training venv (~/.dsfleet/venv).
#   tests/run.sh                 lint, then every tier: unit and e2e, with cluster beside them (what CI runs)
#   tests/run.sh unit            pure code only: no root, no DeepSpeed, seconds
#   tests/run.sh e2e             real setup.yml and DeepSpeed training on this machine
#   tests/run.sh cluster         network-namespace hosts with their own sshd (root)
#   tests/run.sh lint            yamllint, ansible-lint, ruff
#   tests/run.sh tests/unit/test_plan.py -k pdsh     any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."

tier=""
case "${1:-}" in
  unit|e2e|cluster|lint) tier=$1; shift ;;
esac

apt_packages=(openssh-server openssh-client pdsh iproute2 iputils-ping python3-venv python3-dev g++ make
              slurmctld slurmd slurm-client munge)  # a real SLURM on the rig (tests/rig/slurm.py)
if [ "$tier" != unit ] && [ "$tier" != lint ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${apt_packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
      echo "tests/run.sh: missing packages ${missing[*]}; install them (sudo apt-get install ${missing[*]})" >&2
      exit 2
    fi
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
fi

# The controller environment, with the test tools (the same wrapper users run). molecule 26 and
# ansible-lint 26 need Python >= 3.12 on the controller (the hosts' Python may be older).
DSFLEET_CONTROLLER_MIN=3.12 DSFLEET_EXTRA_REQUIREMENTS=requirements-test.txt ./dsfleet --version >/dev/null
export PATH="$PWD/.venv/bin:$PATH"

lint() {
  echo "== lint"
  yamllint -s .
  ansible-lint -q
  ruff check .
}

case "$tier" in
  lint) lint; exit 0 ;;
  unit|e2e|cluster) set -- "tests/$tier" "$@" ;;
  *) if [ "$#" -eq 0 ]; then lint; set -- all; fi ;;
esac
if [ "$*" != all ]; then
  echo "== pytest $*"
  exec python -m pytest -ra --durations=40 "$@"
fi

# Every tier. The cluster tier's hosts are network namespaces with their own sshd, homes and /tmp, so it runs beside
# unit and e2e (this machine's ~/.dsfleet): a run is mostly waiting (SSH rounds, imports, polls), and one tier after
# the other left half of a 2-core machine idle. DSFLEET_TEST_JOBS=1 runs them one after the other.
if [ "${DSFLEET_TEST_JOBS:-2}" = 1 ]; then
  echo "== pytest tests/unit tests/e2e tests/cluster"
  exec python -m pytest -ra --durations=40 tests/unit tests/e2e tests/cluster
fi
mkdir -p tests/.work/logs
log=tests/.work/logs/cluster.log
echo "== pytest tests/cluster, beside the others: its output at the end (meanwhile: tail -f $log)"
# a short base (unix socket paths under it: ssh control sockets), not the other session's numbered pytest-of-<user>
base=$(mktemp -d /tmp/dsft-XXXXXX)
python -m pytest -ra --durations=25 --basetemp="$base" tests/cluster >"$log" 2>&1 &
cluster=$!
# pytest tears its rigs down on SIGTERM (tests/conftest.py); a background job ignores SIGINT
trap 'kill -TERM "$cluster" 2>/dev/null; wait "$cluster"' INT TERM
echo "== pytest tests/unit tests/e2e"
rc=0
python -m pytest -ra --durations=25 tests/unit tests/e2e || rc=$?
cluster_rc=0
wait "$cluster" || cluster_rc=$?
trap - INT TERM
rm -rf "$base"
echo "== tests/cluster (exit $cluster_rc)"
cat "$log"
echo "== tests/unit tests/e2e: exit $rc; tests/cluster: exit $cluster_rc"
[ "$rc" = 0 ] && [ "$cluster_rc" = 0 ]
