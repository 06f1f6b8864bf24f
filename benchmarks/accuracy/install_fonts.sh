#!/usr/bin/env bash
# Install the Debian font packages of the glyph benchmark (CJK ideographs: character = identity,
# font file = one image of it). Only `make bench-accuracy` needs them; `make test` never does.
# The list is the one in shared/reference/offline-data-and-models.md, section 3.1.
#
#   bash benchmarks/accuracy/install_fonts.sh          # apt-get install what is missing (needs root)
#   bash benchmarks/accuracy/install_fonts.sh --check  # exit 1 if any package is missing, install nothing
set -euo pipefail

PACKAGES=(
  fonts-arphic-ukai fonts-arphic-uming fonts-wqy-zenhei fonts-wqy-microhei fonts-ipafont-gothic
  fonts-ipafont-mincho fonts-ipaexfont-gothic fonts-ipaexfont-mincho fonts-vlgothic fonts-hanazono fonts-seto
  fonts-aoyagi-kouzan-t fonts-kouzan-mouhitsu fonts-motoya-l-cedar fonts-motoya-l-maruberi fonts-droid-fallback
  fonts-arphic-gkai00mp fonts-arphic-gbsn00lp fonts-arphic-bkai00mp fonts-arphic-bsmi00lp fonts-noto-cjk
  fonts-klee fonts-lxgw-wenkai fonts-unifont
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "glyph fonts: all ${#PACKAGES[@]} packages installed (/usr/share/fonts)"
  exit 0
fi
if [ "${1:-}" = "--check" ]; then
  echo "glyph fonts: missing ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "glyph fonts: missing ${missing[*]} and no apt-get here; install them with your package manager" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "glyph fonts: installing ${#missing[@]} package(s): ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
