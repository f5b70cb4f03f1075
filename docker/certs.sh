#!/usr/bin/env bash
# A local CA and the broker's TLS certificate, made with openssl (EC P-256: fast handshakes).
#   docker/certs.sh DIR [NAME ...]          CA (if DIR has none) + server certificate for
#                                           localhost, 127.0.0.1, ::1, mosquitto, this host's
#                                           name and each NAME (a DNS name or an IP address)
#   docker/certs.sh DIR --client ACCOUNT    a client certificate for ACCOUNT (CN = the account;
#                                           the broker's certificate listener takes it as the
#                                           username), signed by DIR's CA
# Keys are written 0600 and never leave DIR. `edgecollab credentials init` runs this when DIR
# has no server certificate; run it again with more names to reissue the server's.
set -euo pipefail
umask 077
dir=${1:?usage: certs.sh DIR [NAME ...] | certs.sh DIR --client ACCOUNT}
shift
mkdir -p "$dir"
cd "$dir"

if [ ! -f ca.key ] || [ ! -f ca.crt ]; then
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=edgecollab local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt 2>/dev/null
fi

sign() {  # sign NAME SUBJECT EXTENSIONS
  openssl ecparam -name prime256v1 -genkey -noout -out "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 825 \
    -extfile <(printf '%s\n' "$3") -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

if [ "${1:-}" = "--client" ]; then
  account=${2:?certs.sh DIR --client ACCOUNT}
  sign "$account" "/CN=$account" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
  echo "certs: $dir/$account.crt and $dir/$account.key (client certificate of $account)" >&2
  exit 0
fi

names=(localhost mosquitto "$(hostname 2>/dev/null || uname -n)" "$@")
san="IP:127.0.0.1,IP:::1"
for name in "${names[@]}"; do
  [ -n "$name" ] || continue
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
done
sign server "/CN=edgecollab broker" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
chmod 644 ca.crt server.crt
echo "certs: $dir/server.crt for $san" >&2
