#!/bin/sh
# Fill in a cloud-init template of this directory for one GPU host, on standard output:
#
#   deploy/cloud-init/render.sh TEMPLATE NODE CERTS_DIR SERVERS BINARY_URL BINARY_SHA256
#
#   TEMPLATE       aws-p5.48xlarge.yaml or azure-nd-h100-v5.yaml
#   NODE           the node's name, as given to `tessera certs agent NODE`
#   CERTS_DIR      the `tessera certs --dir`: ca.pem, agent-NODE.pem, agent-NODE-key.pem
#   SERVERS        the servers' HOST:PORT, comma-separated
#   BINARY_URL     where the host downloads the tessera binary from
#   BINARY_SHA256  the binary's SHA-256 (sha256sum prints it); the host refuses another
#
# The agent's unit is copied in from ../systemd/tessera-agent.service. The output holds the
# host's private key: hand it to the cloud as user data and do not keep it around.
set -eu

fail() { echo "render.sh: $*" >&2; exit 2; }
[ $# -eq 6 ] || fail "usage: render.sh TEMPLATE NODE CERTS_DIR SERVERS BINARY_URL BINARY_SHA256"
template=$1 node=$2 certs=$3 servers=$4 url=$5 sha=$6
unit=$(dirname "$0")/../systemd/tessera-agent.service

# Each value lands in a file name, a YAML string or a shell word: keep them to safe characters.
printf '%s' "$node" | grep -Eqx '[A-Za-z0-9][A-Za-z0-9._-]{0,62}' || fail "NODE '$node': letters, digits, '.', '_' and '-' only"
printf '%s' "$servers" | grep -Eqx '[][A-Za-z0-9.:_,-]+' || fail "SERVERS '$servers': HOST:PORT,HOST:PORT,..."
printf '%s' "$url" | grep -Eqx "[a-z0-9+.-]+://[^[:space:]\"'\`\$\\\\]+" || fail "BINARY_URL '$url' is not a URL (no spaces, quotes, \$ or \\)"
printf '%s' "$sha" | grep -Eqx '[0-9a-f]{64}' || fail "BINARY_SHA256: 64 lowercase hex digits"
for f in "$template" "$certs/ca.pem" "$certs/agent-$node.pem" "$certs/agent-$node-key.pem" "$unit"; do
    [ -r "$f" ] || fail "cannot read $f"
done

NODE=$node SERVERS=$servers URL=$url SHA=$sha CA=$certs/ca.pem CERT=$certs/agent-$node.pem \
KEY=$certs/agent-$node-key.pem UNIT=$unit awk '
    # Replace every `from` in s by `to`, literally (gsub would read & and \ in `to`).
    function repl(s, from, to,    i, out) {
        out = ""
        while ((i = index(s, from)) > 0) {
            out = out substr(s, 1, i - 1) to
            s = substr(s, i + length(from))
        }
        return out s
    }
    # A line that is only @NAME@ becomes the lines of a file, at the same indentation.
    function embed(file, line,    indent, text, n) {
        match(line, /^ */)
        indent = substr(line, 1, RLENGTH)
        n = 0
        while ((getline text < file) > 0) {
            print indent text
            n++
        }
        close(file)
        if (n == 0) {
            print "render.sh: " file " is empty" > "/dev/stderr"
            exit 1
        }
    }
    /^ *@CA_PEM@$/ { embed(ENVIRON["CA"], $0); next }
    /^ *@CERT_PEM@$/ { embed(ENVIRON["CERT"], $0); next }
    /^ *@KEY_PEM@$/ { embed(ENVIRON["KEY"], $0); next }
    /^ *@AGENT_UNIT@$/ { embed(ENVIRON["UNIT"], $0); next }
    {
        s = repl($0, "@NODE@", ENVIRON["NODE"])
        s = repl(s, "@SERVERS@", ENVIRON["SERVERS"])
        s = repl(s, "@BINARY_URL@", ENVIRON["URL"])
        s = repl(s, "@BINARY_SHA256@", ENVIRON["SHA"])
        print s
    }
' "$template"
