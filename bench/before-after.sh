#!/usr/bin/env bash
# Compares this daemon at two revisions, side by side in one run: builds each in a scratch worktree, then
# alternates `vhost-blk bench` between them ROUNDS times (so machine noise hits both alike) and prints,
# per workload and target, the median IOPS and backend CPU per I/O of each revision and their ratio.
#
#   bench/before-after.sh BEFORE_REV [AFTER_REV] [ROUNDS] [-- extra bench options]
#   bench/before-after.sh 21c8f23 HEAD 3 -- --preset issue4 --targets vhost-blk,vhost-blk-null
#
# AFTER_REV defaults to the working tree as it is (built in place), ROUNDS to 3, the bench options to
# `--preset issue4 --targets vhost-blk,vhost-blk-null --runtime 3`.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
before=${1:?usage: bench/before-after.sh BEFORE_REV [AFTER_REV] [ROUNDS] [-- bench options]}
after=${2:-WORKTREE}
rounds=${3:-3}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
opts=("$@")
[ ${#opts[@]} -eq 0 ] && opts=(--preset issue4 --targets vhost-blk,vhost-blk-null --runtime 3)
scratch=$(mktemp -d /tmp/vhost-blk-before-after.XXXXXX)
cleanup() {
  for d in "$scratch"/rev-*; do [ -d "$d" ] && git -C "$top" worktree remove --force "$d" >/dev/null 2>&1 || true; done
  rm -rf "$scratch"
}
trap cleanup EXIT

# Builds revision $1 into a worktree; prints its directory.
build() {
  local rev=$1 name=$2
  if [ "$rev" = WORKTREE ]; then (cd "$top" && npx tsc -p . >&2); echo "$top"; return; fi
  local dir="$scratch/rev-$name"
  git -C "$top" worktree add --detach "$dir" "$rev" >/dev/null 2>&1
  ln -s "$top/node_modules" "$dir/node_modules"
  (cd "$dir" && npx tsc -p . >&2)
  echo "$dir"
}
dir_before=$(build "$before" before)
dir_after=$(build "$after" after)
echo "before: $before ($(git -C "$dir_before" rev-parse --short HEAD))  after: $after ($(git -C "$dir_after" rev-parse --short HEAD)$( [ "$after" = WORKTREE ] && echo ' + working tree'))" >&2
for ((i = 1; i <= rounds; i++)); do
  for side in before after; do
    dir_var="dir_$side"
    echo "round $i/$rounds: $side" >&2
    (cd "${!dir_var}" && ./bin/vhost-blk bench "${opts[@]}" --json "$scratch/$side-$i.json" --svg "$scratch/$side-$i.svg" >/dev/null)
  done
done
node --input-type=module - "$scratch" "$rounds" <<'JS'
import { readFileSync } from 'node:fs';
const [dir, rounds] = [process.argv[2], Number(process.argv[3])];
const load = (side) => Array.from({ length: rounds }, (_, i) => JSON.parse(readFileSync(`${dir}/${side}-${i + 1}.json`, 'utf8')));
const runs = { before: load('before'), after: load('after') };
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const pick = (side, w, target, key) => median(runs[side].map((r) => r.workloads[w].results.find((x) => x.target === target)?.[key]).filter((v) => typeof v === 'number'));
const fmt = (n, d = 0) => n.toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d });
console.log(`| workload | target | IOPS before | IOPS after | after/before | CPU µs/IO before | CPU µs/IO after | after/before |`);
console.log(`|---|---|---:|---:|---:|---:|---:|---:|`);
runs.before[0].workloads.forEach((w, i) => {
  for (const r of w.results) {
    const ib = pick('before', i, r.target, 'iops'), ia = pick('after', i, r.target, 'iops');
    const cb = pick('before', i, r.target, 'backendCpuUsPerIo'), ca = pick('after', i, r.target, 'backendCpuUsPerIo');
    console.log(`| ${w.workload.name} | ${r.target} | ${fmt(ib)} | ${fmt(ia)} | **${fmt(ia / ib, 2)}x** | ${fmt(cb, 2)} | ${fmt(ca, 2)} | ${fmt(ca / cb, 2)}x |`);
  }
});
console.log(`\nmedians of ${rounds} alternating rounds per revision`);
JS
