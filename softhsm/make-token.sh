#!/usr/bin/env bash
# Creates a private SoftHSM2 token in a directory (no global state) and prints lkm's keystore settings.
#
#   softhsm/make-token.sh [-d DIR] [-l LABEL] [--so-pin PIN] [--pin PIN] [--json FILE] [--quiet]
#
# --json FILE writes the settings as JSON for programs (lkm's --dev mode): softhsm2_conf, and the keystore
# settings module, token_label, pin and pool_size.
# Environment equivalents: LKM_SOFTHSM_DIR (default ./softhsm-data), LKM_SOFTHSM_LABEL (default lkm),
# LKM_SOFTHSM_SO_PIN and LKM_SOFTHSM_PIN (default: random, 16 hex digits each).
# Writes DIR/softhsm2.conf, DIR/tokens/, DIR/user.pin (mode 0600) and DIR/so.pin (mode 0600).
# One token per directory: refuses a DIR that already holds one.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

dir=${LKM_SOFTHSM_DIR:-./softhsm-data}
label=${LKM_SOFTHSM_LABEL:-lkm}
so_pin=${LKM_SOFTHSM_SO_PIN:-}
user_pin=${LKM_SOFTHSM_PIN:-}
quiet=0
json_out=""

while [ $# -gt 0 ]; do
  case "$1" in
    -d|--dir) dir=$2; shift 2 ;;
    -l|--label) label=$2; shift 2 ;;
    --so-pin) so_pin=$2; shift 2 ;;
    --pin) user_pin=$2; shift 2 ;;
    --json) json_out=$2; shift 2 ;;
    -q|--quiet) quiet=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "make-token.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

if ! command -v softhsm2-util >/dev/null 2>&1; then
  echo "make-token.sh: softhsm2-util not found; install SoftHSM2 (Debian/Ubuntu: apt-get install softhsm2)" >&2
  exit 1
fi

random_pin() { od -An -N8 -tx1 /dev/urandom | tr -d ' \n'; }
[ -n "$so_pin" ] || so_pin=$(random_pin)
[ -n "$user_pin" ] || user_pin=$(random_pin)

here=$(cd "$(dirname "$0")" && pwd)
template="$here/softhsm2.conf.template"

umask 077
mkdir -p "$dir/tokens"
dir=$(cd "$dir" && pwd)
conf="$dir/softhsm2.conf"
tokendir_sed=$(printf '%s' "$dir/tokens" | sed 's/[&|\\]/\\&/g')
sed "s|@TOKENDIR@|$tokendir_sed|" "$template" > "$conf"

export SOFTHSM2_CONF="$conf"
if [ -e "$dir/user.pin" ] || [ -n "$(ls -A "$dir/tokens")" ]; then
  echo "make-token.sh: $dir already holds a token (one token per directory); choose another directory" >&2
  exit 1
fi
softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$user_pin" >/dev/null

printf '%s\n' "$user_pin" > "$dir/user.pin"
printf '%s\n' "$so_pin" > "$dir/so.pin"
chmod 600 "$dir/user.pin" "$dir/so.pin"

module=""
for candidate in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
                 /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/lib64/pkcs11/libsofthsm2.so \
                 /usr/lib/pkcs11/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so \
                 /opt/homebrew/lib/softhsm/libsofthsm2.so /usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so; do
  if [ -f "$candidate" ]; then module=$candidate; break; fi
done
if [ -z "$module" ]; then
  echo "make-token.sh: token created, but libsofthsm2.so was not found in the usual places; set keystore.module" >&2
  module=/path/to/libsofthsm2.so
fi

json_string() { local v=${1//\\/\\\\}; printf '"%s"' "${v//\"/\\\"}"; }
if [ -n "$json_out" ]; then
  {
    printf '{"softhsm2_conf": %s, "module": %s, "token_label": %s, "pin": {"file": %s}, "pool_size": 2}\n' \
      "$(json_string "$conf")" "$(json_string "$module")" "$(json_string "$label")" "$(json_string "$dir/user.pin")"
  } > "$json_out"
  echo "SoftHSM2 token '$label' created in $dir/tokens (SOFTHSM2_CONF=$conf)"
  exit 0
fi

if [ "$quiet" = 1 ]; then
  printf 'conf=%s\nmodule=%s\nlabel=%s\npin_file=%s\n' "$conf" "$module" "$label" "$dir/user.pin"
  exit 0
fi

cat <<TXT
SoftHSM2 token '$label' created in $dir/tokens (user PIN in $dir/user.pin, SO PIN in $dir/so.pin).

Tools that use this token (softhsm2-util, pkcs11-tool) need:

export SOFTHSM2_CONF=$conf

lkm configuration (module_env hands SOFTHSM2_CONF to lkm's HSM worker processes):

keystore:
  type: pkcs11
  module: $module
  token_label: $label
  pin: {file: $dir/user.pin}
  pool_size: 2
  module_env: {SOFTHSM2_CONF: $conf}
TXT
