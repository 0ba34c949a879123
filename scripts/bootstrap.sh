#!/usr/bin/env bash
# Builds the whole stack into .venv from nothing, and does nothing on a ready machine.
#
#   1. system tools: MPI (runtime and headers), cmake, g++, Fashion-MNIST's IDX files
#      (dataset-fashion-mnist), and with --test Chromium, SLURM with munge and an SSH
#      server (the TensorBoard browser test, the sbatch recipes' test, the simulated
#      cluster's hosts); installed with apt when root or
#      passwordless sudo allows it, otherwise named exactly;
#   2. .venv with everything in requirements.txt except Horovod;
#   3. Horovod built from its source archive with scripts/horovod-keras3.patch applied,
#      against that TensorFlow (TensorFlow, MPI, Gloo; NCCL when HOROVOD_GPU_OPERATIONS=NCCL),
#      cached as a wheel keyed by what it was built against and by the patch;
#   4. the project itself, editable, for its console scripts;
#   5. `horovodrun --check-build` must list TensorFlow, MPI and Gloo as built.
# BUILD.md explains each step and the two fixes Horovod 0.28.1 needs on TensorFlow 2.21.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
WHEEL_CACHE=${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvd-keras/wheels}
GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-}
STAMP=$VENV/.bootstrap-stamp

say() { echo "bootstrap: $*"; }
die() { echo "bootstrap: error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' \
  || die "Python >= 3.10 is needed (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11"

# --- 1. system tools ---------------------------------------------------------------------
missing_packages=()
command -v mpirun >/dev/null || missing_packages+=(openmpi-bin)
command -v mpicxx >/dev/null || missing_packages+=(libopenmpi-dev)
command -v cmake >/dev/null || missing_packages+=(cmake)
command -v g++ >/dev/null || missing_packages+=(g++)
command -v patch >/dev/null || missing_packages+=(patch)  # applies scripts/horovod-keras3.patch
if [ "${1:-}" = --test ]; then  # the TensorBoard browser test; the one-node SLURM cluster
  command -v chromium >/dev/null || missing_packages+=(chromium)
  command -v slurmctld >/dev/null || missing_packages+=(slurm-wlm)
  command -v munged >/dev/null || missing_packages+=(munge)
  # the simulated cluster's hosts (scripts/simulated_cluster.sh)
  [ -x /usr/sbin/sshd ] || missing_packages+=(openssh-server)
  command -v ip >/dev/null || missing_packages+=(iproute2)
fi
if [ "$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi
# Fashion-MNIST's IDX files (the fashion_mnist experiments read them there): installed where
# apt may be used, otherwise named; only the tests cannot do without them.
FASHION_MNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION_MNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$SUDO" != none ] && command -v apt-get >/dev/null; then
    missing_packages+=(dataset-fashion-mnist)
  elif [ "${1:-}" = --test ]; then
    die "missing $FASHION_MNIST: install Debian's dataset-fashion-mnist (as root: apt-get install dataset-fashion-mnist)"
  else
    say "note: no $FASHION_MNIST; the fashion_mnist experiments need Debian's dataset-fashion-mnist (as root: apt-get install dataset-fashion-mnist) or --data_dir=FOLDER with its IDX files"
  fi
fi
if [ ${#missing_packages[@]} -gt 0 ]; then
  if [ "$SUDO" = none ] || ! command -v apt-get >/dev/null; then
    die "missing system packages: ${missing_packages[*]} (on a cluster: module load an MPI with its mpicxx, cmake >= 3.13 and a C++17 g++; see BUILD.md)"
  fi
  say "installing ${missing_packages[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_packages[@]}" >/dev/null
fi

# Everything the result depends on; when it is unchanged the machine is ready.
PATCH=$ROOT/scripts/horovod-keras3.patch
stamp_key=$(cat "$ROOT/requirements.txt" "$ROOT/setup.cfg" "$ROOT/scripts/bootstrap.sh" "$ROOT"/scripts/compat_include/tensorflow/compiler/xla/client/xla_builder.h "$PATCH" \
  | { cat; echo "gpu=$GPU_OPERATIONS python=$("$PYTHON" --version 2>&1)"; } | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp_key" ] && [ -x "$VENV/bin/horovodrun" ]; then
  say "ready ($VENV)"; exit 0
fi

# --- 2. the Python environment -------------------------------------------------------------
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
say "installing requirements.txt (without Horovod)"
grep -v '^horovod' "$ROOT/requirements.txt" > "$VENV/requirements-no-horovod.txt"
"${PIP[@]}" install -r "$VENV/requirements-no-horovod.txt"

# --- 3. Horovod from source ------------------------------------------------------------------
horovod_pin=$(grep '^horovod==' "$ROOT/requirements.txt")
tf_include=$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.sysconfig.get_include())' 2>/dev/null)
tf_version=$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)
# TensorFlow's public headers include farmhash.h and highwayhash/*.h, which the wheel ships
# under include/external/ but not on the include path; the forwarding header restores the
# pre-2.16 xla_builder.h location that Horovod 0.28.1 includes.
export CPLUS_INCLUDE_PATH="$ROOT/scripts/compat_include:$tf_include/external/farmhash_archive/src:$tf_include/external/highwayhash${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
if [ -n "$GPU_OPERATIONS" ]; then export HOROVOD_GPU_OPERATIONS=$GPU_OPERATIONS; fi
export MAKEFLAGS="-j$(nproc)"

mpi_version=$(mpirun --version 2>/dev/null | head -1)
python_abi=$("$VENV/bin/python" -c 'import sys; print(sys.implementation.cache_tag)')
build_key=$(echo "$horovod_pin tf=$tf_version gpu=$GPU_OPERATIONS mpi=$mpi_version $python_abi" \
  | cat - "$ROOT"/scripts/compat_include/tensorflow/compiler/xla/client/xla_builder.h "$PATCH" \
  | sha256sum | cut -c1-16)
wheel_dir=$WHEEL_CACHE/$build_key
if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  say "building $horovod_pin against TensorFlow $tf_version (about 5 minutes on 2 cores)"
  mkdir -p "$wheel_dir" 2>/dev/null \
    || die "cannot write the wheel cache $WHEEL_CACHE; set HOROVOD_WHEEL_CACHE to a writable folder"
  # The source archive with the project's patch (Horovod's Keras layer on Keras 3, BUILD.md).
  src_dir=$(mktemp -d)
  "${PIP[@]}" download --no-cache-dir --no-binary :all: --no-deps -d "$src_dir" "$horovod_pin" \
    || die "cannot download the $horovod_pin source archive"
  tar xzf "$src_dir"/horovod-*.tar.gz --no-same-owner -C "$src_dir"
  patch -d "$src_dir"/horovod-*/ -p1 --quiet --no-backup-if-mismatch < "$PATCH" \
    || die "scripts/horovod-keras3.patch does not apply to the $horovod_pin source archive"
  # --no-build-isolation: Horovod's build must see the TensorFlow it will run with.
  # --no-cache-dir: pip's wheel cache is keyed by the source archive alone and would hand
  # back a wheel built against another TensorFlow or without NCCL; the cache above is keyed
  # by all of that, and by the patch.
  "${PIP[@]}" wheel --no-cache-dir --no-build-isolation --no-deps \
    -w "$wheel_dir" "$src_dir"/horovod-*/ \
    > "$wheel_dir/build.log" 2>&1 || { tail -40 "$wheel_dir/build.log" >&2; rm -f "$wheel_dir"/*.whl;
      die "the Horovod build failed; full log: $wheel_dir/build.log"; }
  rm -rf "$src_dir"
else
  say "using the cached Horovod wheel in $wheel_dir"
fi
"${PIP[@]}" install --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
# The project itself, editable: its console scripts (hvd-train, hvd-launch, ...) in .venv/bin.
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"

# --- 5. check the build ----------------------------------------------------------------------
check=$("$VENV/bin/horovodrun" --check-build 2>/dev/null)
echo "$check"
for part in TensorFlow MPI Gloo; do
  echo "$check" | grep -q "\[X\] $part" || die "horovodrun --check-build does not list $part as built"
done
echo "$stamp_key" > "$STAMP"
say "ready ($VENV)"
