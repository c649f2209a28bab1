#!/usr/bin/env bash
# Cross-compiles the torch-free aarch64 kernel units (isa_neon*.cpp, isa_portable.cpp) with the test
# driver tests/arm/driver.cpp and runs it under qemu-aarch64 on several CPU models: `max` (dotprod and
# i8mm: every variant is tested and auto-detection must pick i8mm), `cortex-a76` (dotprod only) and
# `cortex-a53` (baseline NEON only), which checks the runtime detection as well as the kernels.
# Exit 0 when every run passes, 1 on a failure; exit 0 with a "skipped: ..." line when the tool-chain
# (Debian packages g++-aarch64-linux-gnu, qemu-user) is missing.
# Env: CXX_AARCH64 (default aarch64-linux-gnu-g++), QEMU_AARCH64 (default qemu-aarch64), ARM_BUILD_DIR.
set -euo pipefail

CXX=${CXX_AARCH64:-aarch64-linux-gnu-g++}
QEMU=${QEMU_AARCH64:-qemu-aarch64}
for tool in "$CXX" "$QEMU"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "skipped: no aarch64 tool-chain ($tool not found; apt-get install g++-aarch64-linux-gnu qemu-user)"
    exit 0
  fi
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CSRC=$ROOT/src/mobilemoe/kernels/csrc
OUT=${ARM_BUILD_DIR:-$(mktemp -d)}
mkdir -p "$OUT"
# The flags setup.py gives every ISA unit (minus OpenMP, which the kernels do not use).
FLAGS=(-O3 -fno-math-errno -Wall -Wno-unused-function -std=c++17 -I"$CSRC")
STRICT=(-Wextra -Werror)  # for the units this test owns (isa_portable.cpp is not -Wextra clean)

compile() {  # unit, -march, extra flags...
  local unit=$1 march=$2
  shift 2
  "$CXX" "${FLAGS[@]}" "$@" -march="$march" -c "$unit" -o "$OUT/$(basename "${unit%.cpp}").o"
}
compile "$CSRC/isa_portable.cpp" armv8-a
compile "$CSRC/isa_neon.cpp" armv8-a "${STRICT[@]}"
compile "$CSRC/isa_neon_dotprod.cpp" armv8.2-a+dotprod "${STRICT[@]}"
compile "$CSRC/isa_neon_i8mm.cpp" armv8.2-a+dotprod+i8mm "${STRICT[@]}"
compile "$ROOT/tests/arm/driver.cpp" armv8-a "${STRICT[@]}"
"$CXX" -static -o "$OUT/arm_driver" "$OUT"/isa_portable.o "$OUT"/isa_neon.o "$OUT"/isa_neon_dotprod.o \
  "$OUT"/isa_neon_i8mm.o "$OUT"/driver.o

status=0 passed=0 failed=0
for cpu_expect in max:i8mm cortex-a76:dotprod cortex-a53:neon; do
  cpu=${cpu_expect%%:*}
  expect=${cpu_expect##*:}
  echo "== qemu-aarch64 -cpu $cpu (expect $expect)"
  log=$OUT/run-$cpu.log
  if ! "$QEMU" -cpu "$cpu" "$OUT/arm_driver" --expect "$expect" >"$log" 2>&1; then
    status=1
  fi
  cat "$log"
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" || echo "0 passed, 1 failed")  # a crash counts as a failure
  read -r p _ f _ <<<"$line"
  passed=$((passed + p)) failed=$((failed + f))
done
echo "test_arm: $passed passed, $failed failed"
exit $status
