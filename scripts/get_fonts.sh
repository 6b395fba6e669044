#!/usr/bin/env bash
# Install the Debian font packages whose typefaces the embedded glyph benchmark renders (about 250 Latin fonts).
set -u
PKGS="fonts-noto-core fonts-dejavu-extra fonts-liberation fonts-liberation2 fonts-freefont-ttf fonts-urw-base35
fonts-texgyre fonts-cmu fonts-lato fonts-roboto-unhinted fonts-croscore fonts-linuxlibertine fonts-ebgaramond
fonts-crosextra-carlito fonts-crosextra-caladea fonts-open-sans fonts-firacode fonts-hack fonts-sil-gentium
fonts-sil-charis"
# installed = dpkg's status "install ok installed" (a removed package whose config files remain is not)
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=$(for p in $PKGS; do installed "$p" || echo "$p"; done)
if [ -z "$missing" ]; then echo "fonts: all $(echo $PKGS | wc -w) Debian font packages present"; exit 0; fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "fonts: installing $(echo $missing | wc -w) Debian font packages"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1
  fi
  missing=$(for p in $PKGS; do installed "$p" || echo "$p"; done)
  [ -z "$missing" ] && { echo "fonts: installed"; exit 0; }
fi
echo "fonts: missing Debian packages: $(echo $missing) — install them (as root: apt-get install ...), or point" \
     "data.glyphs.font_dirs at a folder of .ttf/.otf files" >&2
exit 0
