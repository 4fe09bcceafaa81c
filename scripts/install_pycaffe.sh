#!/usr/bin/env bash
# Build a real CPU-only pycaffe (BVLC Caffe plus the SSD fork's layers: PriorBox, Permute, Normalize,
# DetectionOutput, ...) from the `brocolli-caffe` source package on PyPI, into a virtualenv of its own.
#
#   bash scripts/install_pycaffe.sh        # idempotent: exits at once when that venv already imports caffe
#
# Debian 12 (bookworm), root (or sudo) for apt-get. The package's own setup.py wants conda and
# Python <= 3.9, so its CMake is driven directly: CPU_ONLY, no OpenCV / LMDB / LevelDB / snappy,
# OpenBLAS, Python layer on, this machine's Python 3. The generated caffe_pb2.py needs protobuf 4.21.x
# and the extension is built against numpy 1.x, hence the dedicated venv.
#
# Environment:
#   CAFFE_BN_MERGE_PYCAFFE_HOME         where everything goes (default ~/.cache/caffe-bn-merge/pycaffe):
#                                         venv/ (the interpreter: venv/bin/python), python/caffe (the
#                                         package, put on the venv's path by a .pth file), build/ (removed
#                                         after a successful build unless CAFFE_BN_MERGE_PYCAFFE_KEEP_BUILD=1)
#   CAFFE_BN_MERGE_PYCAFFE_BASE_PYTHON  the Python 3 to build for (default /usr/bin/python3)
#   CAFFE_BN_MERGE_PYCAFFE_JOBS         parallel compile jobs (default: nproc)
#
# caffe_bn_merge.caffe_backend finds the result at the same default place, or through
# CAFFE_BN_MERGE_PYCAFFE=<path to venv/bin/python>.
set -euo pipefail

SRC_NAME=brocolli-caffe
SRC_VERSION=9.0.2
PYCAFFE_HOME="${CAFFE_BN_MERGE_PYCAFFE_HOME:-$HOME/.cache/caffe-bn-merge/pycaffe}"
BASE_PYTHON="${CAFFE_BN_MERGE_PYCAFFE_BASE_PYTHON:-/usr/bin/python3}"
JOBS="${CAFFE_BN_MERGE_PYCAFFE_JOBS:-$(nproc 2>/dev/null || echo 2)}"
VENV="$PYCAFFE_HOME/venv"
PKG_ROOT="$PYCAFFE_HOME/python"
BUILD="$PYCAFFE_HOME/build"
SRC="$BUILD/$SRC_NAME-$SRC_VERSION"
CMAKE_BUILD="$BUILD/cmake"

APT_PACKAGES=(
  build-essential cmake python3-dev python3-venv
  libboost-python-dev libboost-system-dev libboost-filesystem-dev libboost-thread-dev libboost-regex-dev
  libprotobuf-dev protobuf-compiler libgoogle-glog-dev libgflags-dev libhdf5-dev libopenblas-dev libgtest-dev
)
# What pycaffe imports when `import caffe` runs (caffe.io: numpy, scikit-image, scipy; pycaffe: six),
# with the versions the generated protobuf code and the extension need.
PIP_PACKAGES=("protobuf==4.21.*" "numpy<2" scipy scikit-image six)

STEP="start"
START=$SECONDS
say() { printf 'install_pycaffe: %s\n' "$*"; }
step() {
  STEP="$1"
  say "[$((SECONDS - START))s] $1"
}
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    printf 'install_pycaffe: FAILED at step "%s" (exit %s); see the output above\n' "$STEP" "$rc" >&2
  fi
}
trap on_exit EXIT

imports_caffe() {
  # caffe.io only prints (does not raise) when caffe_pb2 fails to import: import it explicitly too
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -W error::UserWarning -c "import caffe, caffe.proto.caffe_pb2" >/dev/null 2>&1
}

# ---- 0. already there?
if imports_caffe; then
  say "pycaffe already installed: $("$VENV/bin/python" -c 'import caffe; print(caffe.__file__)')"
  say "python: $VENV/bin/python"
  exit 0
fi

# ---- 1. Debian build dependencies
step "apt build dependencies"
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { say "need root (or sudo) to apt-get install: ${missing[*]}" >&2; exit 1; }
    SUDO=(sudo -n)
  fi
  say "installing: ${missing[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  say "all present"
fi

# ---- 2. the base Python and its Boost.Python
step "base python"
[ -x "$BASE_PYTHON" ] || { say "no Python at $BASE_PYTHON (set CAFFE_BN_MERGE_PYCAFFE_BASE_PYTHON)" >&2; exit 1; }
PYVER="$("$BASE_PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PY_INCLUDE="$("$BASE_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
BOOST_PYTHON="boost_python${PYVER//./}"
MULTIARCH="$(gcc -print-multiarch)"
[ -f "$PY_INCLUDE/Python.h" ] || { say "no Python.h in $PY_INCLUDE (python$PYVER-dev missing?)" >&2; exit 1; }
ls "/usr/lib/$MULTIARCH/lib$BOOST_PYTHON.so" >/dev/null \
  || { say "no lib$BOOST_PYTHON.so: Debian's libboost-python-dev is not built for Python $PYVER" >&2; exit 1; }
say "Python $PYVER ($BASE_PYTHON), $BOOST_PYTHON"

# ---- 3. the venv
step "virtualenv $VENV"
mkdir -p "$PYCAFFE_HOME"
if [ ! -x "$VENV/bin/python" ] || [ "$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" != "$PYVER" ]; then
  rm -rf "$VENV"
  "$BASE_PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PIP_PACKAGES[@]}"
NUMPY_INCLUDE="$("$VENV/bin/python" -c 'import numpy; print(numpy.get_include())')"
"$VENV/bin/python" -c 'import google.protobuf as p, numpy as n; print("install_pycaffe: protobuf", p.__version__, "numpy", n.__version__)'

# ---- 4. the source
step "source $SRC_NAME $SRC_VERSION"
mkdir -p "$BUILD"
if [ ! -f "$SRC/.extracted" ]; then
  rm -rf "$SRC" "$BUILD/dl"
  "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    -d "$BUILD/dl" "$SRC_NAME==$SRC_VERSION"
  tar -xzf "$BUILD/dl/$SRC_NAME-$SRC_VERSION.tar.gz" -C "$BUILD"
  touch "$SRC/.extracted"
fi

# ---- 5. patches (build tree only)
step "patch sources"
if [ ! -f "$SRC/.patched" ]; then
  # python/CMakeLists.txt links `-lboost_python`; Debian ships only the versioned name (boost_python311).
  # gflags is used by common.cpp but only reached through glog: link it explicitly.
  sed -i "s/-lboost_python /-l$BOOST_PYTHON -lgflags /" "$SRC/python/CMakeLists.txt"
  grep -q -- "-l$BOOST_PYTHON -lgflags" "$SRC/python/CMakeLists.txt"
  # A caffe.pb.h generated by an old protoc ships in include/: it must never shadow the one generated
  # now by Debian's protoc 3.21 (and the stale caffe_pb2.py is replaced by the fresh one after the build).
  rm -f "$SRC/include/caffe/proto/caffe.pb.h" "$SRC/python/caffe/proto/caffe_pb2.py"
  touch "$SRC/.patched"
fi

# ---- 6. configure
step "cmake configure"
# Includes and the HDF5 serial library folder the conda-centric CMake does not look for itself;
# WITH_PYTHON_LAYER is how that CMake's BUILD_python_layer would have reached the sources.
HDF5_INC="/usr/include/hdf5/serial"
HDF5_LIB="/usr/lib/$MULTIARCH/hdf5/serial"
cmake -S "$SRC" -B "$CMAKE_BUILD" -DCMAKE_BUILD_TYPE=Release \
  -DCPU_ONLY=ON -DUSE_CUDNN=OFF -DUSE_NCCL=OFF -DUSE_OPENCV=OFF -DUSE_LMDB=OFF -DUSE_LEVELDB=OFF \
  -DUSE_HDF5=OFF -DBLAS=open -DBUILD_python=ON -DBUILD_python_layer=ON -Dpython_version=3 \
  -DANACONDA_HOME="$BUILD/no-conda" -DPYTHON_VERSION="python$PYVER" \
  -DPYTHON_INCLUDE_DIRS="$PY_INCLUDE" -DNUMPY_INCLUDE_DIR="$NUMPY_INCLUDE" \
  -DCMAKE_CXX_FLAGS="-DWITH_PYTHON_LAYER -I$HDF5_INC" \
  -DCMAKE_SHARED_LINKER_FLAGS="-L$HDF5_LIB" \
  >"$BUILD/cmake-configure.log" 2>&1 || { tail -n 30 "$BUILD/cmake-configure.log"; say "full log: $BUILD/cmake-configure.log" >&2; exit 1; }

# ---- 7. build
step "build (make -j$JOBS pycaffe; 6 to 10 minutes on 2 cores)"
if ! cmake --build "$CMAKE_BUILD" --target pycaffe -j "$JOBS" >"$BUILD/build.log" 2>&1; then
  { grep -E "error|Error" "$BUILD/build.log" || true; } | head -n 30
  tail -n 15 "$BUILD/build.log"
  say "full log: $BUILD/build.log" >&2
  exit 1
fi
say "built $(grep -c 'Building CXX' "$BUILD/build.log" || true) objects this run"

# ---- 8. install into $PKG_ROOT and put it on the venv's path
step "install python/caffe"
rm -rf "$PKG_ROOT.new"
mkdir -p "$PKG_ROOT.new/caffe/proto"
(cd "$SRC/python/caffe" && find . -name '*.py' -not -path './test/*' -exec cp --parents {} "$PKG_ROOT.new/caffe/" \;)
cp "$CMAKE_BUILD/include/caffe/proto/caffe_pb2.py" "$PKG_ROOT.new/caffe/proto/"
touch "$PKG_ROOT.new/caffe/proto/__init__.py"
[ -f "$SRC/python/caffe/imagenet/ilsvrc_2012_mean.npy" ] \
  && mkdir -p "$PKG_ROOT.new/caffe/imagenet" && cp "$SRC/python/caffe/imagenet/ilsvrc_2012_mean.npy" "$PKG_ROOT.new/caffe/imagenet/"
cp -L "$CMAKE_BUILD/lib/_caffe.so" "$PKG_ROOT.new/caffe/_caffe.so"
rm -rf "$PKG_ROOT"
mv "$PKG_ROOT.new" "$PKG_ROOT"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
printf '%s\n' "$PKG_ROOT" >"$SITE/pycaffe.pth"

# ---- 9. check
step "check import"
unresolved="$(ldd "$PKG_ROOT/caffe/_caffe.so" | grep "not found" || true)"
[ -z "$unresolved" ] || { say "_caffe.so needs libraries not found: $unresolved" >&2; exit 1; }
"$VENV/bin/python" -W error::UserWarning -c 'import caffe, caffe.proto.caffe_pb2; caffe.set_mode_cpu(); print("install_pycaffe: import caffe OK:", caffe.__file__)'
"$VENV/bin/python" - <<'EOF'
import caffe
want = {"PriorBox", "Permute", "Normalize", "DetectionOutput", "BatchNorm", "Scale", "Python"}
missing = want - set(caffe.layer_type_list())
if missing:
    raise SystemExit(f"install_pycaffe: layers missing from this build: {sorted(missing)}")
print(f"install_pycaffe: {len(caffe.layer_type_list())} layer types, SSD layers and Python layer included")
EOF

if [ "${CAFFE_BN_MERGE_PYCAFFE_KEEP_BUILD:-0}" != 1 ]; then
  rm -rf "$BUILD"
fi
STEP="done"
say "[$((SECONDS - START))s] done: $VENV/bin/python imports caffe from $PKG_ROOT/caffe"
