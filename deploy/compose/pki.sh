#!/bin/sh
# The quick start's certificates: a throw-away CA and the stand-in backend's
# certificate for api2.cursor.sh, in the `pki` volume. The gateway trusts
# this CA for upstream connections (tls.extra_upstream_cas); the job trusts
# only the gateway's CA. Also the stand-in identity provider's signing key
# and the console's client secret at it (idp.py).
set -eu
cd /pki
if [ -s server.pem ] && [ -s idp.key ]; then exit 0; fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=ci-gateway demo CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=api2.cursor.sh" -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:api2.cursor.sh\nextendedKeyUsage=serverAuth\n' > ext.cnf
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
  -extfile ext.cnf -out server.pem 2>/dev/null
rm -f ca.key server.csr ext.cnf ca.srl
openssl genrsa -out idp.key 2048 2>/dev/null
od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > console-oidc-secret
chmod 0644 ca.pem server.pem server.key
chmod 0600 idp.key console-oidc-secret
echo "pki: CA, api2.cursor.sh certificate and identity provider key ready"
