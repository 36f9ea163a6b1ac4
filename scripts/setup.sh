#!/usr/bin/env bash
# Installs what building and testing ztfhook needs on Debian/Ubuntu:
# - cmake, a C/C++ compiler, and the headers librdkafka (bundled, built by the
#   rdkafka crate) needs: OpenSSL for TLS, Cyrus SASL for SCRAM and Kerberos
#   (GSSAPI), curl's headers (librdkafka 2.11+ wants them even with curl off);
# - kinit (krb5-user) and the GSSAPI SASL plugin, which ZTF's Kerberos login uses,
#   and an MIT KDC (krb5-kdc, krb5-admin-server) for the Kerberos tests;
# - python3 (free ports) and a Java runtime for Google's Pub/Sub emulator;
# - the tansu broker, built once into ~/.cache/ztfhook (scripts/services.sh install).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake build-essential pkg-config libssl-dev libsasl2-dev libsasl2-modules
  libsasl2-modules-gssapi-mit libcurl4-openssl-dev krb5-user krb5-kdc krb5-admin-server python3 python3-venv curl time)
command -v java >/dev/null || packages+=(default-jre-headless)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  echo "setup: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo is needed (https://rustup.rs)" >&2; exit 1; }
scripts/services.sh install
