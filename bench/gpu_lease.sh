#!/usr/bin/env bash
# Every GPU figure of docs/BENCHMARKS.md in one command, for a lent GPU machine (15 minutes a
# session, all tries together): inference cold / --exact / standard MONAI pipeline / warm worker
# and the training step (bench/run.py), the same inference with a trained bundle when one is
# given, and the device's busy share during real training rounds (bench/bench_data_path.py busy).
#
#   bench/gpu_lease.sh OUT_DIR [CT] [TRAINED_BUNDLE]
#
# On the lent machine, where the image lacks MONAI, nibabel, SimpleITK and cryptography, ship them as
# wheels in .whl/ (../shared/tools/device-wheels.sh) or as .whl/site.tar.xz (the wheels unpacked into
# one folder, `tar -cJf`); they are installed into /tmp/site first. Each step has
# its own time limit and a failed step does not stop the next: every step's JSON and log go to
# OUT_DIR, and the exit status is the number of steps that failed. SEGVIZ_LEASE_DRY_RUN=1 runs the
# same steps on the CPU at toy sizes: check the script here before spending device time on it.
set -uo pipefail
out=${1:?usage: bench/gpu_lease.sh OUT_DIR [CT] [TRAINED_BUNDLE]}
ct=${2:-../shared/data/real/totalseg_example/example_ct.nii.gz}
trained=${3:-}
mkdir -p "$out"
device=cuda size=full epochs=10 workers="0 4 8" quick=()
if [ "${SEGVIZ_LEASE_DRY_RUN:-0}" = 1 ]; then
  device=cpu size=small epochs=1 workers="0 1" quick=(--quick)
fi
export PYTHONUNBUFFERED=1 FLWR_DISABLE_UPDATE_CHECK=1
if compgen -G ".whl/*.whl" >/dev/null || [ -f .whl/site.tar.xz ]; then
  mkdir -p /tmp/site
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || exit 99
  fi
  # The same wheels unpacked and packed with xz: SimpleITK's wheel alone is 53 MB of the 64 MiB a lease carries.
  if [ -f .whl/site.tar.xz ]; then tar -C /tmp/site -xJf .whl/site.tar.xz || exit 99; fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, its output to OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "== $name: exit $status after $((SECONDS - start)) s"
  tail -n 25 "$out/$name.log"
  [ "$status" -eq 0 ] || failed=$((failed + 1))
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  lscpu | grep -E 'Model name|^CPU\(s\)'
  python3 -c "import sys, torch, monai; print(sys.version.split()[0], torch.__version__, monai.__version__)"
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"
step import-time 60 python3 -c "
import time; t = time.perf_counter()
import SegVizLogic.inference  # torch + MONAI as segviz infer imports them
import sys; print(f'import SegVizLogic.inference: {time.perf_counter() - t:.2f} s;',
'transformers imported:', 'transformers' in sys.modules, '; torchvision imported:', 'torchvision' in sys.modules)"
step bench-random 300 python3 bench/run.py --device "$device" "${quick[@]}" --only inference,training --ct "$ct" \
  --json "$out/bench-random.json"
if [ -n "$trained" ]; then
  step infer-trained 150 python3 bench/bench_inference.py --device "$device" --ct "$ct" --model "$trained" --repeats 3 \
    --json "$out/infer-trained.json"
fi
# shellcheck disable=SC2086 # the worker counts are words
step busy 300 python3 bench/bench_data_path.py busy --device "$device" --size "$size" --cases 6 --local-epochs "$epochs" \
  --workers $workers --json "$out/busy.json"
echo "== steps failed: $failed"
exit "$failed"
