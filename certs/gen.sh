#!/usr/bin/env bash
# Generates Portico's development CA and certificates (ECDSA P-256) into a folder
# (default: certs/dev, which git ignores). Nothing generated here is ever committed.
#
#   bash certs/gen.sh [OUT_DIR]
#
# Makes: ca.crt/ca.key (the development CA), localhost.crt/.key (localhost, 127.0.0.1,
# ::1), wildcard.crt/.key (*.portico.test), client.crt/.key (a client certificate for
# mTLS, CN=portico-dev-client).
set -euo pipefail
out="${1:-$(dirname "$0")/dev}"
mkdir -p "$out"
cd "$out"
days=825
openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=Portico Dev CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.crt 2>/dev/null
leaf() { # name cn san [extended key usage]
  local name=$1 cn=$2 san=$3 eku=${4:-serverAuth}
  openssl ecparam -name prime256v1 -genkey -noout -out "$name.key" 2>/dev/null
  openssl req -new -key "$name.key" -subj "/CN=$cn/O=Portico Dev" -out "$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$san" "$eku" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days $days \
    -sha256 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
leaf localhost localhost "DNS:localhost,IP:127.0.0.1,IP:::1"
leaf wildcard "*.portico.test" "DNS:*.portico.test"
leaf client portico-dev-client "DNS:portico-dev-client" clientAuth
rm -f ca.srl
echo "certificates written to $out"
