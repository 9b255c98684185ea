#!/usr/bin/env bash
# Puts Debian's Cyrus IMAP (cyrus-imapd + cyrus-common, 3.6 on Debian 12) where the integration tests
# (tests/common/cyrus.rs) start it, without installing it: the package conflicts with dovecot-imapd, which
# the other IMAP tests need. So the two .debs are downloaded into a cache and unpacked with dpkg-deb -x
# into a fixed folder; only their library dependencies (and sasl2-bin, for saslpasswd2) are installed.
#
#   $MASTSUB_CYRUS_ROOT   where the tree goes (default /opt/mastsub-test/cyrus; outside the repo, so
#                         `cargo clean` keeps it and every checkout shares it; the tests read the same
#                         variable). The .debs are cached in $MASTSUB_CYRUS_ROOT.cache.
#
# Also:
#   - creates the system user `cyrus` (group `mail`), as Debian's package would: Cyrus drops root to it;
#   - compiles a small LD_PRELOAD library (syslog-to-file.so, in the tree) that sends Cyrus's syslog() to
#     the file named by $MASTSUB_SYSLOG_FILE, since Cyrus logs only to syslog (/dev/log) and the tests
#     want each server's own log;
#   - checks with ldd that the binaries find all their libraries.
#
# Idempotent: each step is skipped when its result is there already; a second run does nothing.
# Needs root (apt-get, useradd) unless all of that is in place already.
set -euo pipefail

root=${MASTSUB_CYRUS_ROOT:-/opt/mastsub-test/cyrus}
cache=${root}.cache
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

# 1. Libraries of cyrus-common and cyrus-imapd (read with `apt-cache depends`; only the lib* ones, never
# the packages themselves, whose Conflicts would remove Dovecot), libsasl2-modules-db for the sasldb
# auxprop plugin, sasl2-bin for saslpasswd2, and a C compiler for the syslog shim.
packages=(libsasl2-2 libsasl2-modules libsasl2-modules-db libical3 libicu72 libjansson4 libkrb5-3
    libldap-2.5-0 libpcre3 libpq5 libsqlite3-0 libssl3 libwrap0 libxapian30 libxml2 libzephyr4
    libclamav12 zlib1g libcom-err2 libgcc-s1 libstdc++6 sasl2-bin gcc libc6-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
updated=""
apt_update() {
    [ -n "$updated" ] || $sudo apt-get update -qq
    updated=1
}
if ((${#missing[@]})); then
    echo "install-cyrus: installing ${missing[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 2. The user Cyrus runs as (Debian's package: adduser --system --ingroup mail cyrus).
if ! getent passwd cyrus >/dev/null; then
    echo "install-cyrus: creating the system user cyrus"
    $sudo useradd --system --gid mail --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin --comment "Cyrus IMAP test server" cyrus
fi

# 3. The unpacked packages, unpacked beside and moved into place, so that a broken run leaves no tree.
if [ ! -x "$root/usr/lib/cyrus/bin/master" ]; then
    echo "install-cyrus: unpacking cyrus-common and cyrus-imapd into $root"
    $sudo mkdir -p "$cache" "$(dirname "$root")"
    $sudo chmod 777 "$cache" # apt-get download runs as _apt when it can
    apt_update
    (cd "$cache" && rm -f ./*.deb && apt-get download -q cyrus-common cyrus-imapd)
    staging=$($sudo mktemp -d "${root}.XXXXXX")
    for deb in "$cache"/cyrus-common_*.deb "$cache"/cyrus-imapd_*.deb; do
        $sudo dpkg-deb -x "$deb" "$staging"
    done
    $sudo chmod 755 "$staging"
    $sudo rm -rf "$root"
    $sudo mv "$staging" "$root"
fi

# 4. The syslog shim: syslog(), vsyslog() and their _FORTIFY_SOURCE forms append one line per message
# ("<pid> <ident>[pid]: message") to $MASTSUB_SYSLOG_FILE; without that variable, messages are dropped.
shim=$root/syslog-to-file.so
if [ ! -f "$shim" ]; then
    echo "install-cyrus: building $shim"
    src=$(mktemp --suffix=.c)
    cat >"$src" <<'EOF'
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static char ident[64] = "cyrus";

void openlog(const char *id, int option, int facility) {
    (void)option; (void)facility;
    if (id) { strncpy(ident, id, sizeof ident - 1); ident[sizeof ident - 1] = 0; }
}
void closelog(void) {}
int setlogmask(int mask) { return mask; }

void vsyslog(int priority, const char *format, va_list ap) {
    const char *path = getenv("MASTSUB_SYSLOG_FILE");
    if (!path) return;
    char msg[8192];
    int n = snprintf(msg, sizeof msg, "%ld %s[%d] <%d>: ", (long)time(NULL), ident, (int)getpid(),
                     priority & 7);
    if (n < 0 || n >= (int)sizeof msg) return;
    /* %m is glibc's own: vsnprintf does it too. */
    int m = vsnprintf(msg + n, sizeof msg - n - 1, format, ap);
    if (m < 0) return;
    n += m < (int)(sizeof msg - n - 1) ? m : (int)(sizeof msg - n - 2);
    while (n > 0 && msg[n - 1] == '\n') n--;
    msg[n++] = '\n';
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) return;
    ssize_t w = write(fd, msg, n);
    (void)w;
    close(fd);
}
void syslog(int priority, const char *format, ...) {
    va_list ap; va_start(ap, format); vsyslog(priority, format, ap); va_end(ap);
}
void __vsyslog_chk(int priority, int flag, const char *format, va_list ap) {
    (void)flag; vsyslog(priority, format, ap);
}
void __syslog_chk(int priority, int flag, const char *format, ...) {
    (void)flag; va_list ap; va_start(ap, format); vsyslog(priority, format, ap); va_end(ap);
}
EOF
    $sudo gcc -shared -fPIC -O2 -Wall -o "$shim.tmp" "$src"
    rm -f "$src"
    $sudo mv "$shim.tmp" "$shim"
fi

# 5. Every binary finds its libraries (libcyrus*.so.0 come from the tree, so the tests set
# LD_LIBRARY_PATH to $root/usr/lib/x86_64-linux-gnu).
export LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu
unresolved=$(for b in "$root"/usr/lib/cyrus/bin/*; do
    if [ "$(head -c4 "$b" | tail -c3)" = ELF ]; then
        ldd "$b" | sed -n "s|^\s*\(\S*\) => not found|$(basename "$b"): \1|p"
    fi
done)
if [ -n "$unresolved" ]; then
    echo "install-cyrus: unresolved libraries:" >&2
    echo "$unresolved" >&2
    exit 1
fi
echo "install-cyrus: Cyrus $(sed -n 's/^PACKAGE_VERSION //p' "$root/usr/lib/cyrus/cyrus-hardwired-config.txt") in $root"
