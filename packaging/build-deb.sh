#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (metadata: [package.metadata.deb] in Cargo.toml) and checks
# it: every file listed, the conffile, the maintainer scripts; then unpacked into a scratch root, its
# unit passes systemd-analyze verify, its binary runs on the installed configuration (as the service
# would, from a working directory of its own), its man pages render and its bash completion parses;
# then a real dpkg install and purge into a scratch root (only where no systemd runs, so that the
# maintainer scripts cannot touch this system). Installs nothing: it needs cargo-deb, dpkg-dev,
# systemd (systemd-analyze), man-db and groff-base, and says which one is missing.
#
#   bash packaging/build-deb.sh      # prints the package's path and size at the end
# shellcheck disable=SC2012,SC2015 # ls of folders made here; `A && B || fail` fails when A or B does
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
started=$SECONDS

fail() {
    echo "build-deb.sh: $*" >&2
    exit 1
}

need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null || fail "$1 is missing: install $2"
}
need cargo-deb "cargo-deb (cargo install cargo-deb --locked)"
need dpkg-deb dpkg
need dpkg-shlibdeps "dpkg-dev (cargo-deb's \$auto dependencies)"
need systemd-analyze systemd
need man man-db
need groff groff-base

out=target/packaging
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. The generated files: man pages and completions from the command line, and the packaged unit, which
#    runs the packaged binary (the committed unit runs /usr/local/bin/mastsub, where a hand install
#    puts it).
rm -rf "$out"
cargo run --locked --quiet --example gen_docs -- "$out" >/dev/null
# shellcheck disable=SC2016 # the backquotes are the unit comment's
sed -e 's|/usr/local/bin/mastsub|/usr/bin/mastsub|g' \
    -e 's|^# mastsub as a system service\..*|# mastsub as a system service, installed by the mastsub package. Change it with `systemctl edit mastsub`.|' \
    systemd/mastsub.service >"$out/mastsub.service"
grep -q '^ExecStart=/usr/bin/mastsub ' "$out/mastsub.service" ||
    fail "systemd/mastsub.service: no ExecStart=/usr/local/bin/mastsub line to point at /usr/bin/mastsub"

# 2. The package (a release build).
version=$(cargo pkgid | sed 's/.*[#@]//')
arch=$(dpkg --print-architecture)
rm -f target/debian/mastsub_*.deb target/debian/mastsub-dbgsym_*.ddeb
cargo deb --locked >"$tmp/cargo-deb.out"
deb=$(grep '\.deb$' "$tmp/cargo-deb.out" | tail -1) || true
[ -f "$deb" ] || fail "cargo deb printed no package path: $(cat "$tmp/cargo-deb.out")"
[ "$(basename "$deb")" = "mastsub_${version}_${arch}.deb" ] ||
    fail "the package is $(basename "$deb"), not mastsub_${version}_${arch}.deb"

# 3. What it holds.
dpkg-deb --info "$deb" | tee "$tmp/info.txt"
for field in "Package: mastsub" "Version: $version" "Architecture: $arch" "Section: science" \
    "Depends: .*libc6" "Maintainer: ." "Description: ."; do
    grep -q "^ $field" "$tmp/info.txt" || fail "dpkg-deb --info: no '$field'"
done
dpkg-deb --contents "$deb" | tee "$tmp/contents.txt"
expected=(
    usr/bin/mastsub
    usr/lib/systemd/system/mastsub.service
    usr/lib/sysusers.d/mastsub.conf
    usr/lib/tmpfiles.d/mastsub.conf
    etc/mastsub/mastsub.toml
    usr/share/bash-completion/completions/mastsub
    usr/share/zsh/vendor-completions/_mastsub
    usr/share/fish/vendor_completions.d/mastsub.fish
    usr/share/doc/mastsub/README.md
    usr/share/doc/mastsub/copyright
)
for page in "$out"/*.1; do
    expected+=("usr/share/man/man1/$(basename "$page").gz")
done
[ -f "$out/mastsub.1" ] || fail "gen_docs wrote no mastsub.1"
for path in "${expected[@]}"; do
    grep -q " \./$path\$" "$tmp/contents.txt" || fail "the package lacks /$path"
done
grep -Eq '^-rwxr-xr-x (root/root|0/0) .* \./usr/bin/mastsub$' "$tmp/contents.txt" ||
    fail "/usr/bin/mastsub is not an executable owned by root"

dpkg-deb --control "$deb" "$tmp/control"
[ "$(cat "$tmp/control/conffiles")" = /etc/mastsub/mastsub.toml ] ||
    fail "conffiles is not /etc/mastsub/mastsub.toml: $(cat "$tmp/control/conffiles" 2>&1)"
for script in postinst prerm postrm; do
    [ -f "$tmp/control/$script" ] || fail "the package has no $script"
    sh -n "$tmp/control/$script" || fail "$script: syntax error"
done
for want in "systemd-sysusers .*mastsub.conf" "systemd-tmpfiles --create mastsub.conf" \
    "daemon-reload" "deb-systemd-helper update-state mastsub.service"; do
    grep -q -- "$want" "$tmp/control/postinst" || fail "postinst does not run '$want'"
done
# Neither enabled nor started on install (enable = false, start = false); restarted on upgrade only if
# it runs.
grep -q "deb-systemd-helper debian-installed mastsub.service" "$tmp/control/postinst" &&
    grep -q "deb-systemd-invoke try-restart mastsub.service" "$tmp/control/postinst" &&
    ! grep -q "_dh_action=start\|deb-systemd-invoke start" "$tmp/control/postinst" ||
    fail "postinst enables or starts mastsub.service on install"

# 4. Unpacked into a scratch root: the unit, the binary, the configuration, the pages, the completions.
root="$tmp/root"
dpkg-deb -x "$deb" "$root"
unit="$root/usr/lib/systemd/system/mastsub.service"
grep -q '^ExecStart=/usr/bin/mastsub --config /etc/mastsub/mastsub.toml run$' "$unit" ||
    fail "the installed unit does not run /usr/bin/mastsub on /etc/mastsub/mastsub.toml"
# verify needs ExecStart's binary to exist: the scratch root's.
mkdir "$tmp/unit"
sed "s|/usr/bin/mastsub|$root/usr/bin/mastsub|" "$unit" >"$tmp/unit/mastsub.service"
systemd-analyze verify "$tmp/unit/mastsub.service"
if ! systemd-analyze security --offline=true --threshold=20 "$tmp/unit/mastsub.service" >"$tmp/security.txt"; then
    cat "$tmp/security.txt"
    fail "the installed unit: exposure above 2.0"
fi
echo "installed unit: $(tail -1 "$tmp/security.txt")"

"$root/usr/bin/mastsub" --version | tee "$tmp/version.txt"
grep -qx "mastsub $version" "$tmp/version.txt" || fail "mastsub --version does not say $version"
"$root/usr/bin/mastsub" check-config --config "$root/etc/mastsub/mastsub.toml" >"$tmp/check-config.txt" ||
    fail "check-config refuses the installed /etc/mastsub/mastsub.toml: $(cat "$tmp/check-config.txt")"
grep -q '^# configuration is valid' "$tmp/check-config.txt" || fail "check-config did not say valid"

# The service as the unit runs it, on the installed configuration, from a working directory of its
# own (WorkingDirectory=/var/lib/mastsub), with UMask=0027 and, when this runs as root, as an
# unprivileged user (nobody) as the unit's User=mastsub: it starts, lays out its relative paths there,
# stops on SIGTERM with exit 0. No notice is given to it, so it makes no request.
mkdir "$tmp/state"
as_user=()
if [ "$(id -u)" -eq 0 ] && id nobody >/dev/null 2>&1 && command -v setpriv >/dev/null; then
    chmod 0755 "$tmp"
    chown nobody "$tmp/state"
    as_user=(setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups)
fi
(cd "$tmp/state" && umask 0027 && exec env -u NOTIFY_SOCKET -u MAST_API_TOKEN "${as_user[@]}" \
    "$root/usr/bin/mastsub" --config "$root/etc/mastsub/mastsub.toml" run) >"$tmp/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do
    [ -e "$tmp/state/mastsub.db" ] && [ -d "$tmp/state/inbox" ] && break
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.2
done
sleep 1
kill -TERM "$daemon" 2>/dev/null || true
status=0
wait "$daemon" || status=$?
if [ "$status" -ne 0 ] || [ ! -e "$tmp/state/mastsub.db" ] || [ ! -d "$tmp/state/inbox" ]; then
    cat "$tmp/daemon.log"
    fail "mastsub run on the installed configuration: exit $status, state: $(ls -A "$tmp/state" | tr '\n' ' ')"
fi
echo "mastsub run on the installed configuration${as_user[*]:+ as nobody}: started, made $(ls "$tmp/state" | tr '\n' ' ')in its working directory, stopped on SIGTERM"

for page in "$root"/usr/share/man/man1/*.1.gz; do
    # --warnings: groff's complaints about the page are errors here.
    MANWIDTH=80 man --warnings -l "$page" >"$tmp/page.txt" 2>"$tmp/page.err" ||
        fail "man -l $page failed: $(cat "$tmp/page.err")"
    [ ! -s "$tmp/page.err" ] || fail "man -l $page: $(cat "$tmp/page.err")"
    grep -q '^SYNOPSIS' "$tmp/page.txt" || fail "man -l $page: no SYNOPSIS"
done
MANWIDTH=80 man -l "$root/usr/share/man/man1/mastsub.1.gz" >"$tmp/page.txt"
for want in '^NAME' 'mastsub - ' '^SUBCOMMANDS' 'mastsub-run(1)' '--config' '^FILES' '/etc/mastsub/mastsub.toml'; do
    grep -q -- "$want" "$tmp/page.txt" || fail "man mastsub: no '$want'"
done
echo "man pages: $(cd "$root/usr/share/man/man1" && echo *.1.gz) render"

completion="$root/usr/share/bash-completion/completions/mastsub"
bash -n "$completion" || fail "the bash completion does not parse"
# shellcheck disable=SC2016 # expanded by the inner bash
bash -c 'source "$1" && complete -p mastsub' _ "$completion" >/dev/null ||
    fail "the bash completion does not register itself for mastsub"
if command -v zsh >/dev/null; then zsh -n "$root/usr/share/zsh/vendor-completions/_mastsub"; fi
if command -v fish >/dev/null; then fish --no-execute "$root/usr/share/fish/vendor_completions.d/mastsub.fish"; fi

# 5. A real dpkg install into a scratch root, maintainer scripts included: run outside a chroot (the
#    scratch root has no shell) with DPKG_ROOT set, which systemd-sysusers and deb-systemd-helper
#    honour; systemd-tmpfiles and systemctl run only where systemd runs, and they would act on this
#    system, so this step runs only where it does not.
if [ -d /run/systemd/system ]; then
    echo "dpkg --root install: skipped, systemd runs here (the postinst's systemctl would act on this system)"
else
    inst="$tmp/inst"
    mkdir -p "$inst/var/lib/dpkg/info" "$inst/var/lib/dpkg/updates" "$inst/var/lib/dpkg/triggers"
    touch "$inst/var/lib/dpkg/status"
    dpkg_root=(dpkg --root="$inst" --log="$tmp/dpkg.log" --force-script-chrootless --force-depends
        --force-not-root)
    "${dpkg_root[@]}" --install "$deb" >"$tmp/dpkg-install.txt" 2>&1 ||
        fail "dpkg --root --install: $(cat "$tmp/dpkg-install.txt")"
    "${dpkg_root[@]}" --status mastsub | grep -q '^Status: install ok installed' ||
        fail "dpkg --root: mastsub is not 'install ok installed': $(cat "$tmp/dpkg-install.txt")"
    grep -q '^mastsub:x:[0-9]*:[0-9]*:mastsub daemon:/var/lib/mastsub:' "$inst/etc/passwd" ||
        fail "postinst created no mastsub user (systemd-sysusers): $(cat "$inst/etc/passwd" 2>&1)"
    grep -q '^mastsub:' "$inst/etc/group" || fail "postinst created no mastsub group"
    [ -x "$inst/usr/bin/mastsub" ] && [ -f "$inst/etc/mastsub/mastsub.toml" ] ||
        fail "dpkg --root installed no /usr/bin/mastsub or /etc/mastsub/mastsub.toml"
    [ ! -e "$inst/etc/systemd/system/multi-user.target.wants/mastsub.service" ] ||
        fail "the install enabled mastsub.service"
    "${dpkg_root[@]}" --purge mastsub >"$tmp/dpkg-purge.txt" 2>&1 ||
        fail "dpkg --root --purge: $(cat "$tmp/dpkg-purge.txt")"
    [ ! -e "$inst/usr/bin/mastsub" ] && [ ! -e "$inst/etc/mastsub/mastsub.toml" ] ||
        fail "dpkg --root --purge left /usr/bin/mastsub or the conffile"
    echo "dpkg --root: installed (user mastsub created, unit not enabled) and purged"
fi

echo "package: $deb ($(stat -c %s "$deb") bytes, $(du -h "$deb" | cut -f1)); $((SECONDS - started)) s"
