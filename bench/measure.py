"""Peak RSS of the tools the benchmarks run, shared by ingest.py and download.py (both import it from
their own folder)."""
import os


def peak_rss_mib(pid):
    """The peak RSS of a live process (VmHWM). A child's ru_maxrss starts from this script's own RSS when it
    is forked, so for a small tool it reports this script, not the tool."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measured(argv):
    """argv under GNU time, which reports the tool's own peak RSS (time itself is too small to hide it);
    returns the command and the file the figure lands in."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench-rss-{os.getpid()}")
    return ["/usr/bin/time", "-f", "%M", "-o", out] + list(argv), out


def read_rss(out):
    with open(out) as f:
        return int(f.read().split()[-1]) / 1024
