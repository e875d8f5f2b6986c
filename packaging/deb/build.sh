#!/usr/bin/env bash
# Builds the Debian package from this checkout with dpkg-deb:
#   packaging/deb/build.sh [--no-build]   ->  target/debian/luks-agent_<version>_<arch>.deb
# Installs the binary, systemd units, udev rules, example configuration,
# man pages and shell completions generated from the command line itself,
# and the os-brick plug-in (python3 module luks_agent_os_brick).
# Shared library dependencies come from dpkg-shlibdeps.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" != "--no-build" ]; then
    cargo build --release --locked
fi
bin=target/release/luks-agent
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
debversion="$version-1"
arch=$(dpkg --print-architecture)
out=target/debian
root=$out/root
rm -rf "$root"
mkdir -p "$root/DEBIAN" "$out"

install -D -m 0755 "$bin" "$root/usr/bin/luks-agent"
strip --strip-debug "$root/usr/bin/luks-agent"
install -D -m 0644 packaging/systemd/luks-agent.service "$root/lib/systemd/system/luks-agent.service"
install -D -m 0644 packaging/systemd/luks-agent.socket "$root/lib/systemd/system/luks-agent.socket"
install -D -m 0644 udev/61-luks-agent.rules "$root/lib/udev/rules.d/61-luks-agent.rules"
install -D -m 0600 packaging/agent.toml "$root/etc/luks-agent/agent.toml"
install -D -m 0644 packaging/agent.toml "$root/usr/share/doc/luks-agent/examples/agent.toml"
install -D -m 0644 README.md "$root/usr/share/doc/luks-agent/README.md"
# The os-brick plug-in that nova-compute and cinder-volume import, and its
# settings.
for f in integrations/os_brick/luks_agent_os_brick/*.py; do
    install -D -m 0644 "$f" "$root/usr/lib/python3/dist-packages/luks_agent_os_brick/$(basename "$f")"
done
install -D -m 0644 packaging/os-brick.conf "$root/etc/luks-agent/os-brick.conf"
install -D -m 0644 integrations/os_brick/README.md "$root/usr/share/doc/luks-agent/os-brick-plugin.md"
install -D -m 0644 packaging/deb/copyright "$root/usr/share/doc/luks-agent/copyright"
printf 'luks-agent (%s) unstable; urgency=medium\n\n  * Package built from the source tree.\n\n -- luks-agent maintainers <luks-agent@localhost>  %s\n' \
    "$debversion" "$(date -R -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")" |
    gzip -9n >"$root/usr/share/doc/luks-agent/changelog.Debian.gz"

mkdir -p "$root/usr/share/man/man1"
"$bin" generate man "$root/usr/share/man/man1"
gzip -9n "$root"/usr/share/man/man1/*.1
"$bin" generate completions bash | install -D -m 0644 /dev/stdin "$root/usr/share/bash-completion/completions/luks-agent"
"$bin" generate completions zsh | install -D -m 0644 /dev/stdin "$root/usr/share/zsh/vendor-completions/_luks-agent"
"$bin" generate completions fish | install -D -m 0644 /dev/stdin "$root/usr/share/fish/vendor_completions.d/luks-agent.fish"

# dpkg-shlibdeps reads debian/control from the current directory.
shlib=$out/shlibdeps
rm -rf "$shlib" && mkdir -p "$shlib/debian"
printf 'Source: luks-agent\n\nPackage: luks-agent\nArchitecture: any\n' >"$shlib/debian/control"
depends=$(cd "$shlib" && dpkg-shlibdeps -O "$OLDPWD/$root/usr/bin/luks-agent" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')

installed_kib=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$debversion/" -e "s/@ARCH@/$arch/" -e "s/@DEPENDS@/$depends/" \
    -e "s/@SIZE@/$installed_kib/" packaging/deb/control.in >"$root/DEBIAN/control"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$root/DEBIAN/"
printf '%s\n' /etc/luks-agent/agent.toml /etc/luks-agent/os-brick.conf >"$root/DEBIAN/conffiles"

deb="$out/luks-agent_${debversion}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
