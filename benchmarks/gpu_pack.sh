#!/usr/bin/env bash
# Packs what benchmarks/gpu_session.sh needs on a bare GPU machine that has Python 3.12 and torch but nothing else
# and cannot reach a package index: the project's other dependencies for CPython 3.12 (wheels unpacked, tests
# dropped), a redis-server with its libraries, and the head-and-neck cases that the session uses. Written to
# gpu_data/ (git-ignored), xz-compressed to fit a 64 MiB transfer beside the working tree.
#
#     bash benchmarks/gpu_pack.sh ../shared/data/headneck_ct
#     PROFILE=engine bash benchmarks/gpu_pack.sh ../shared/data/headneck_ct
#
# PROFILE=engine packs only what `isl train` and `isl evaluate` need (steps 3 and 4 of gpu_session.sh) and no
# redis-server: about 10 MB less, for when the working tree and the full pack together exceed a call's 64 MiB.
#
# The cases: the training and validation cases of models/headneck_ct (its atlases among them) and the first 5 of
# its 15 test cases. `isl train --holdout 5` on that folder therefore splits exactly as `--holdout 15` did on the
# whole dataset (the held-out cases are the first in sorted order; validation is a seeded sample of the rest).
set -euo pipefail
DATA=${1:?usage: gpu_pack.sh HEADNECK_CT_DATASET}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$ROOT/gpu_data
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUTDIR"

# 1. dependencies the GPU image lacks (pins from the CI environment; pystrum has no wheel: built here)
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_24_x86_64"
PROFILE=${PROFILE:-service}
PKGS="annotated-types monai neurite nibabel pydantic pydantic-settings pydantic_core pydicom python-dotenv simpleitk
      typing-inspection voxelmorph typing_extensions"
case $PROFILE in
    engine) rm -f "$OUTDIR/redis.tar.xz" ;;
    service) PKGS="$PKGS alembic amqp billiard celery click-didyoumean click-plugins click-repl fastapi highdicom kombu
                   Mako opentelemetry-api pynetdicom python-multipart redis SQLAlchemy greenlet starlette tzlocal
                   uvicorn vine prompt_toolkit wcwidth" ;;
    *) echo "PROFILE is service or engine, not $PROFILE" >&2; exit 2 ;;
esac
PINNED=$(for p in $PKGS; do grep -i "^${p//_/[-_]}==" "$ROOT/constraints.txt" || { echo "no pin for $p" >&2; exit 1; }; done)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
    -d "$TMP/whl" $PINNED
python3 -m pip wheel -q --no-deps -w "$TMP/whl" "$(grep -i '^pystrum==' "$ROOT/constraints.txt")"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$TMP/site" --python-version 3.12 \
    --implementation cp --only-binary=:all: $PLAT "$TMP"/whl/*.whl
find "$TMP/site" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
rm -rf "$TMP/site/bin" "$TMP/site/include"
# optional compiled speed-ups, dropped for size: SQLAlchemy's Cython modules and wcwidth's C module (both fall back
# to pure Python); pyjpegls is not taken at all (JPEG-LS, which the service neither reads nor writes)
[ -d "$TMP/site/sqlalchemy" ] && find "$TMP/site/sqlalchemy" -name '*_cy*.so' -delete
rm -f "$TMP"/site/wcwidth/_wcwidth_c*.so
tar cf - -C "$TMP/site" . | xz -9e --lzma2=dict=256MiB -T1 > "$OUTDIR/site.tar.xz"

# 2. redis-server (Debian's) with the libraries it links beyond glibc, behind a wrapper that points at them
if [ "$PROFILE" = service ]; then
mkdir -p "$TMP/redis/lib"
cp "$(command -v redis-server)" "$TMP/redis/redis-server.bin"
for lib in $(ldd "$TMP/redis/redis-server.bin" | awk '/=>/ {print $3}'); do
    case $(basename "$lib") in libc.so*|libm.so*|libstdc++*|libgcc_s*) ;; *) cp -L "$lib" "$TMP/redis/lib/";; esac
done
printf '#!/bin/sh\nhere=$(dirname "$(readlink -f "$0")")\nLD_LIBRARY_PATH="$here/lib" exec "$here/redis-server.bin" "$@"\n' \
    > "$TMP/redis/redis-server"
chmod +x "$TMP/redis/redis-server"
tar cf - -C "$TMP" redis | xz -9 > "$OUTDIR/redis.tar.xz"
fi

# 3. the cases, decompressed (xz packs the voxels better than gzip; the session gzips them back)
python3 - "$DATA" "$TMP/headneck_ct" "$ROOT/models/headneck_ct/bundle.json" <<'EOF'
import gzip, json, shutil, sys
from pathlib import Path
src, dst, meta = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
keep = set(meta["train_cases"]) | set(meta["validation_cases"]) | set(meta["atlases"]) | set(meta["holdout_cases"][:5])
for sub in ("imagesTr", "labelsTr"):
    (dst / sub).mkdir(parents=True)
for name in ("dataset.json", "cases.json", "README.md"):
    shutil.copy(src / name, dst / name)
for case in sorted(keep):
    for sub in ("imagesTr", "labelsTr"):
        for p in (src / sub).glob(case + "*.nii.gz"):
            (dst / sub / p.name[:-3]).write_bytes(gzip.decompress(p.read_bytes()))
print(f"{len(keep)} cases")
EOF
tar cf - -C "$TMP" headneck_ct | xz -9 -T2 > "$OUTDIR/headneck_ct.tar.xz"
du -b "$OUTDIR"/*.tar.xz
