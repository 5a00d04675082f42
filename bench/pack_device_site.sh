#!/usr/bin/env bash
# Pack what a lent GPU machine's Python 3.12 image lacks for bench/gpu_lease.sh into .whl/site.tar.xz:
# the wheels of MONAI, nibabel, SimpleITK and cryptography (with cffi, pycparser), unpacked into one
# folder and packed with xz (62 MB of wheels become about 36 MB: a lease carries 64 MiB in all), plus
# the benchmark CT. Run from the repository root; then, in a lease:
#   bench/gpu_lease.sh "$OUT" .whl/example_ct.nii.gz [TRAINED_BUNDLE]   (carry: .whl)
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
mkdir -p .whl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_34_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$work/wheels" "monai==1.6.1" nibabel SimpleITK "cryptography>=46,<47" cffi pycparser
mkdir "$work/site"
for wheel in "$work"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$work/site"; done
tar -C "$work/site" -cJf .whl/site.tar.xz .
cp -n ../shared/data/real/totalseg_example/example_ct.nii.gz .whl/ 2>/dev/null || true
du -sh .whl/site.tar.xz
