# Sourced by scripts/setup.sh and scripts/container-setup.sh: stop early, and say so, when a disk is too full.
# A full disk otherwise surfaces as an unrelated failure (ensurepip "exit status 1", a truncated image layer).
#   need_space DIR GIB WHAT   -> returns non-zero after printing one line naming DIR, what is free and what for
need_space() {
  local dir="$1" want_gib="$2" what="$3" free_kib
  while [ ! -d "$dir" ]; do dir="$(dirname "$dir")"; done
  free_kib="$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 { print $4 }')"
  [ -n "$free_kib" ] || return 0  # df cannot tell (unusual filesystem): go on rather than guess
  if [ "$free_kib" -lt $((want_gib * 1024 * 1024)) ]; then
    echo "$(basename "$0"): only $((free_kib / 1024)) MiB free on the disk holding $dir; $what needs about ${want_gib} GiB. Free some space and rerun." >&2
    return 1
  fi
}
