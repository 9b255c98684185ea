#!/usr/bin/env bash
# Runs mastsub's benchmarks and prints Markdown tables for bench/RESULTS.md.
# Usage: bench/run.sh [REPEAT]   (from anywhere; builds the release binary first)
# BENCH_BEFORE=<another mastsub binary> adds its rows beside the current build's (before and after).
# BENCH_ONLY=cluster runs only the cluster set (bench/cluster.py: members on one PostgreSQL database;
# BENCH_CLUSTER, BENCH_PG_FSYNC and the other switches at the top of that file); any other BENCH_ONLY
# (download.py's sets) leaves the cluster set out. The cluster set needs PostgreSQL (apt-get install
# postgresql) and `unshare`, and root for the PID namespaces that stand for other hosts.
# Sets up what it compares against: nginx, curl, aria2c and GNU time from Debian's packages (apt-get, as root or
# with sudo) and the astroquery release from pip, in a virtualenv under bench/work. Needs about 4 GiB
# free under bench/work.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=${1:-3}
work=bench/work
mkdir -p "$work"
missing=()
for tool in nginx:nginx curl:curl aria2c:aria2; do
    command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool##*:}")
done
# GNU time reports each tool's own peak RSS.
[ -x /usr/bin/time ] || missing+=(time)
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >&2
fi
export PATH="$PATH:/usr/sbin"
if [ ! -x "$work/venv/bin/python" ]; then
    python3 -m venv "$work/venv" >&2
fi
"$work/venv/bin/python" -c "import astroquery" 2>/dev/null ||
    "$work/venv/bin/pip" install -q "astroquery==0.4.11" >&2 ||
    echo "astroquery could not be installed: its rows are left out" >&2
cargo build --release --locked --bin mastsub --example download_floor --example s3_digests --example claims >&2
echo "## Machine"
echo
echo "- $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM"
echo "- $(uname -sr); disk: $(df -h "$work" | awk 'NR==2{print $1}'); mastsub $(target/release/mastsub --version | cut -d' ' -f2), $(rustc --version)"
echo "- $(date -u +%Y-%m-%d)"
if [ "${BENCH_ONLY:-}" != cluster ]; then
    echo
    echo "## Ingest"
    echo
    python3 bench/ingest.py target/release/mastsub "$work" "$repeat"
    echo
    echo "## HTTP endpoint"
    echo
    python3 bench/endpoint.py target/release/mastsub "$work"
    echo
    echo "## Downloads"
    echo
    "$work/venv/bin/python" bench/download.py target/release/mastsub "$work" "$repeat"
fi
if [ -z "${BENCH_ONLY:-}" ] || [ "${BENCH_ONLY}" = cluster ]; then
    echo
    echo "## Cluster (PostgreSQL)"
    echo
    python3 bench/cluster.py target/release/mastsub "$work" "$repeat"
fi
