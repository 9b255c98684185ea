#!/usr/bin/env bash
# Runs mastsub's benchmarks and prints Markdown tables for bench/RESULTS.md.
# Usage: bench/run.sh [REPEAT]   (from anywhere; builds the release binary first)
# Needs nginx, curl and aria2c (apt-get install nginx curl aria2) and, optionally, astroquery
# (pip install astroquery); about 4 GiB free under bench/work.
set -euo pipefail
cd "$(dirname "$0")/.."
repeat=${1:-3}
cargo build --release --locked --bin mastsub --example download_floor >&2
work=bench/work
mkdir -p "$work"
echo "## Machine"
echo
echo "- $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM"
echo "- $(uname -sr); disk: $(df -h "$work" | awk 'NR==2{print $1}'); mastsub $(target/release/mastsub --version | cut -d' ' -f2), $(rustc --version)"
echo "- $(date -u +%Y-%m-%d)"
echo
echo "## Ingest"
echo
python3 bench/ingest.py target/release/mastsub "$work" "$repeat"
echo
echo "## Downloads"
echo
python3 bench/download.py target/release/mastsub "$work" "$repeat"
