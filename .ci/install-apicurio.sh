#!/usr/bin/env bash
# Installs Apicurio Registry 3.0.9 (a Schema Registry serving the Confluent REST API under
# /apis/ccompat/v7, in-memory storage) from Maven Central for tests/avro.rs, and prints the
# directory holding its runner jar:
#
#     registry="$(bash .ci/install-apicurio.sh)"
#     export NEUROSTREAM_APICURIO_HOME="$registry"
#
# Why this one: it is the Confluent-compatible registry Maven Central serves (Confluent's own is
# not there; Karapace is not on PyPI). 3.0.9 is the newest that runs on Java 17 (3.3.x needs 21).
# The tests start it as `java -jar DIR/apicurio-registry-app-3.0.9-runner.jar` on a free port.
#
# Destination: ${NEUROSTREAM_APICURIO_CACHE:-$HOME/.cache/neurostream/apicurio}/3.0.9. Idempotent:
# a marker makes a second run a no-op. Measured here: the download is 109 MB (SHA-1 checked);
# start to ready 5-6 s with the tests' JVM flags, 160-175 MB RSS.
set -euo pipefail
VERSION=3.0.9
cache="${NEUROSTREAM_APICURIO_CACHE:-$HOME/.cache/neurostream/apicurio}"
dir="$cache/$VERSION"
jar="$dir/apicurio-registry-app-$VERSION-runner.jar"
url="https://repo1.maven.org/maven2/io/apicurio/apicurio-registry-app/$VERSION/apicurio-registry-app-$VERSION-all.tar.gz"

if [ -f "$dir/.complete" ] && [ -f "$jar" ]; then
    echo "$dir"
    exit 0
fi
echo "install-apicurio: downloading $url" >&2
mkdir -p "$cache"
tmp="$(mktemp -d "$cache/download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
curl -fsSL --retry 3 -o "$tmp/app.tar.gz" "$url"
want="$(curl -fsSL --retry 3 "$url.sha1" | cut -c1-40)"
got="$(sha1sum "$tmp/app.tar.gz" | cut -c1-40)"
if [ "$want" != "$got" ]; then
    echo "install-apicurio: SHA-1 mismatch (want $want, got $got)" >&2
    exit 1
fi
mkdir -p "$tmp/x"
tar xzf "$tmp/app.tar.gz" -C "$tmp/x"
rm -rf "$dir"
mv "$tmp/x" "$dir"
touch "$dir/.complete"
echo "install-apicurio: installed in $dir" >&2
echo "$dir"
