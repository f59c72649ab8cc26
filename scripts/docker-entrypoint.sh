#!/bin/sh
# The images' entrypoint: make the mounted run and cache folders writable, then run ftdeploy unprivileged.
#
# Docker creates a missing bind-mount source (./runs) owned by root, which an unprivileged process cannot
# write: the classic failure of a non-root image. Started as root, this script picks the user to run as
# (FTDEPLOY_UID/FTDEPLOY_GID if set, else the owner of the mounted ./runs, ./configs or ./data when that is
# not root, so files on the host belong to whoever owns the project; else uid 10001, `ftdeploy`), hands that
# user what root created in /work/runs and the cache, and drops root for good. Started with --user, it
# changes nothing.
set -eu

if [ "$(id -u)" != 0 ]; then
  exec ftdeploy "$@"
fi

uid="${FTDEPLOY_UID:-}"
gid="${FTDEPLOY_GID:-}"
if [ -z "$uid" ]; then
  for dir in /work/runs /work/configs /data; do
    owner="$(stat -c %u "$dir" 2>/dev/null || echo 0)"
    if [ "$owner" != 0 ]; then
      uid="$owner"
      gid="${gid:-$(stat -c %g "$dir")}"
      break
    fi
  done
fi
if [ -z "$uid" ] || [ "$uid" = 0 ]; then
  uid=10001
fi
gid="${gid:-$uid}"

# Only what root owns in ./runs changes hands (a folder Docker just made, or a root run's output); the
# cache is the image's own volume and follows the user.
mkdir -p /work/runs "$HOME/.cache"
find /work/runs -xdev -user 0 -exec chown "$uid:$gid" {} +
find "$HOME/.cache" -xdev \( ! -user "$uid" -o ! -group "$gid" \) -exec chown "$uid:$gid" {} +
chown "$uid:$gid" "$HOME"

exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- ftdeploy "$@"
