#!/usr/bin/env bash
# One prepared GPU check (H200, no network): install the carried wheels, run the `gpu`-marked
# tests and the GPU benchmarks, write JSON + log + plot to $OUT (7 files), in under 8 minutes.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # on the GPU machine, from the repo root
#   OUT=/tmp/gc DEVICE=cpu QUICK=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
#                                                       # dry run of the script on a CPU machine
#
# What it measures: all `gpu` tests (NVDEC sessions against the PyAV path on the media zoo and on
# x264/HEVC/VP9 streams, CUDA preprocessing, bf16 towers); natural-looking 60 s corpora (x264
# defaults at 720p and 1080p, HEVC at 720p); per corpus the PyAV bounds, the NVDEC decode-all
# sweep over 1, 2, 4, 7, 14, 21 sessions, the physical limit (engines x per-engine rate), the
# skip-non-reference gain on NVDEC, DALI's batched decoder for comparison; embed at 720p and
# 1080p (each video copied so 14+ sessions have work) with the decoder used per video and NVDEC
# utilisation; full-width bf16 training pairs/s and data wait; serve's query latency (CUDA
# encoding) where the serve extra, httpx2 and faiss are installed; `embed --ray` with one GPU
# actor where ray is installed.
#
# Wheels (Python 3.12, manylinux x86_64) come from .whl/: av, PyNvVideoCodec (its wheel carries
# an FFmpeg source tarball and samples avindex does not use: `zip -d .whl/pynvvideocodec-*.whl
# '*/ffmpeg-*.tar.xz' 'samples/*' 'benchmarks/*'` takes it from 27 to 10 MB), optionally
# faiss-cpu; DALI as the parts .whl/dali.tar.xz.part* of a tar.xz of the unpacked wheel
# (nvidia/ + its dist-info). More than 64 MiB of them travel over several calls to the same warm
# machine (.whl/ stays there between calls). Each section is time-boxed: a failure or time-out
# is logged and the next section still runs.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-check-out}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}              # 1: tiny corpora (for a dry run of the script itself)
BUDGET=${BUDGET:-450}          # seconds for everything; each section gets what is left
SITE=${SITE:-/tmp/avindex-site}
DALI_SITE=${DALI_SITE:-/tmp/avindex-dali}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
START=$(date +%s)
exec > >(tee -a "$LOG") 2>&1

log() { echo "+ [$(( $(date +%s) - START ))s] $*"; }

# section NAME MAX_SECONDS CMD...: run CMD with a timeout of min(MAX, time left - 15 s).
section() {
    local name=$1 max=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) - 15 ))
    local limit=$(( max < left ? max : left ))
    if (( limit < 10 )); then log "SKIP $name: out of time"; echo "$name skipped (time)" >> "$OUT/summary.txt"; return; fi
    log "BEGIN $name (limit ${limit}s): $*"
    local t0=$(date +%s) rc=0
    timeout --kill-after=5 "$limit" "$@" || rc=$?
    local took=$(( $(date +%s) - t0 ))
    if (( rc == 0 )); then status=ok; elif (( rc == 124 || rc == 137 )); then status=TIMEOUT; else status="FAILED rc=$rc"; fi
    log "END $name: $status after ${took}s"
    echo "$name: $status (${took}s)" >> "$OUT/summary.txt"
}

# The CLI without installing the package (timeout needs a command, not a shell function).
AVINDEX=("$PYTHON" -c 'import sys; sys.argv[0] = "avindex"; from avindex.cli import main; main()')

install_wheels() {
    local wheels=()
    for w in .whl/*.whl; do
        case "$w" in *nvidia_dali*) ;; *) [ -e "$w" ] && wheels+=("$w") ;; esac
    done
    if (( ${#wheels[@]} == 0 )); then echo "no wheels in .whl/ (using what is installed)"; return 0; fi
    local pip=("$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
               --upgrade --target "$SITE")
    "${pip[@]}" "${wheels[@]}" && return 0
    echo "installing the wheels together failed; trying one by one"
    for w in "${wheels[@]}"; do "${pip[@]}" "$w" || echo "SKIPPED wheel $w"; done
}

unpack_dali() {
    # Parts in numeric order; a missing or short part fails the xz/tar check, and the GPU DALI
    # parts are then skipped with a clear message (the other sections still run).
    local parts
    parts=$(ls .whl/dali.tar.xz.part* 2>/dev/null | sort -V)
    if [ -z "$parts" ]; then echo "DALI: no .whl/dali.tar.xz.part* here; DALI GPU parts will be skipped"; return 0; fi
    echo "DALI: joining $(echo "$parts" | wc -l) parts"
    # shellcheck disable=SC2086
    "$PYTHON" - "$DALI_SITE" $parts <<'PY'
import io, sys, tarfile, time
site, parts = sys.argv[1], sys.argv[2:]

class Joined(io.RawIOBase):
    """The parts read one after the other, as one stream (no joined copy on disk)."""
    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]
    def readable(self):
        return True
    def readinto(self, buf):
        while self.files:
            n = self.files[0].readinto(buf)
            if n:
                return n
            self.files.pop(0).close()
        return 0

started = time.time()
try:
    with tarfile.open(fileobj=io.BufferedReader(Joined(parts), 1 << 20), mode="r|xz") as tar:
        tar.extractall(site, filter="tar") if sys.version_info >= (3, 12) else tar.extractall(site)
except (EOFError, tarfile.TarError, OSError) as exc:
    sys.exit(f"DALI: could not unpack the parts ({type(exc).__name__}: {exc}); incomplete parts?")
# If the machine's site-packages holds a regular `nvidia` package (an nvidia/__init__.py from the
# CUDA wheels), it would hide this namespace portion: make ours a regular package that extends
# its path over every `nvidia` folder on sys.path, so nvidia.dali and the CUDA libraries both load.
with open(f"{site}/nvidia/__init__.py", "w") as fh:
    fh.write("from pkgutil import extend_path\n\n__path__ = extend_path(__path__, __name__)\n")
print(f"DALI: unpacked into {site} in {time.time() - started:.0f} s")
PY
}

setup() {
    install_wheels
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if unpack_dali && [ -d "$DALI_SITE/nvidia" ]; then export PYTHONPATH="$DALI_SITE:$PYTHONPATH"; fi
    "$PYTHON" - <<'PY'
import importlib
for name in ("torch", "av", "PyNvVideoCodec", "faiss", "nvidia.dali", "h5py", "typer", "rich", "matplotlib"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PY
}

dali_gpu_ok() {
    "$PYTHON" -c 'import torch, nvidia.dali.backend as b; assert torch.cuda.is_available(); b.GetCudaVersion()' 2>/dev/null
}

log "avindex gpu check: OUT=$OUT DEVICE=$DEVICE QUICK=$QUICK BUDGET=${BUDGET}s"
(command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv) || echo "no nvidia-smi"
: > "$OUT/summary.txt"
# setup exports PYTHONPATH, so it runs in this shell (with its own time check).
log "BEGIN setup"
if setup; then echo "setup: ok ($(( $(date +%s) - START ))s)" >> "$OUT/summary.txt"; else echo "setup: FAILED" >> "$OUT/summary.txt"; fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
log "END setup: PYTHONPATH=$PYTHONPATH"

if dali_gpu_ok; then log "DALI GPU: available"; else log "DALI GPU: NOT available: DALI GPU tests skip and the DALI comparison reports an error"; fi
"$PYTHON" -c 'from avindex.nvdec import default_sessions; s, why = default_sessions(); print("NVDEC sessions:", why)' || true

# Corpora: natural-looking (texture, camera motion, moving objects), encoder defaults.
# Copies: embed needs many videos in flight (14 sessions) and enough work that start-up (14 worker
# processes) is a small share of it: 56 x 60 s at 720p, 28 x 60 s at 1080p.
if [ "$QUICK" = 1 ]; then SECS=3; NV=2; HSECS=2; S720=320x180; S1080=480x270; C720=2; C1080=2; TB=16; TRAIN_CORPUS=(--count 2 --seconds 10)
else SECS=60; NV=4; HSECS=30; S720=1280x720; S1080=1920x1080; C720=14; C1080=7; TB=256; TRAIN_CORPUS=(); fi
CORPUS=${CORPUS:-/tmp/avindex-gpu-corpus}
synth() { timeout --kill-after=5 240 "${AVINDEX[@]}" synth "$@" --natural --fps 30 > /dev/null; }
# Encoding is CPU work: it runs beside the GPU tests (the corpora are waited for below).
log "BEGIN corpora (background): ${NV}x${SECS}s $S720 and $S1080 H.264, 2x${HSECS}s $S720 HEVC"
synth "$CORPUS/720p" --videos $NV --seconds $SECS --size $S720 --seed 1 & P720=$!
synth "$CORPUS/1080p" --videos $NV --seconds $SECS --size $S1080 --seed 2 & P1080=$!
synth "$CORPUS/hevc" --videos 2 --seconds $HSECS --size $S720 --codec hevc --seed 3 & PHEVC=$!

section gpu-tests 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests

wait_corpus() {  # wait_corpus NAME PID
    if wait "$2"; then log "corpus $1 ready"; echo "corpus-$1: ok" >> "$OUT/summary.txt"
    else log "corpus $1 FAILED"; echo "corpus-$1: FAILED" >> "$OUT/summary.txt"; fi
}
BENCH=(bench --device "$DEVICE" --repeats 1)
wait_corpus 720p $P720
# 720p: PyAV bounds, NVDEC sweep + physical limit + skip gain, DALI, bf16 towers, embed (each
# video $C720 times, so every session has work) with its decoders and NVDEC utilisation.
section bench-720p 130 "${AVINDEX[@]}" "${BENCH[@]}" --videos "$CORPUS/720p" --copies $C720 \
    --stage decode,model,embed --json "$OUT/bench_720p.json" --plot "$OUT/bench_720p.png"
wait_corpus 1080p $P1080
section bench-1080p 130 "${AVINDEX[@]}" "${BENCH[@]}" --videos "$CORPUS/1080p" --copies $C1080 \
    --stage decode,embed --json "$OUT/bench_1080p.json"
wait_corpus hevc $PHEVC
section bench-hevc 60 "${AVINDEX[@]}" "${BENCH[@]}" --videos "$CORPUS/hevc" --stage decode \
    --json "$OUT/bench_hevc.json"
# Full-width training (the device's preset) at a batch that fills the GPU; TRAIN_BATCH to change.
section bench-train 70 "${AVINDEX[@]}" "${BENCH[@]}" --stage train --train-batch "${TRAIN_BATCH:-$TB}" \
    "${TRAIN_CORPUS[@]}" --json "$OUT/bench_train.json"
# Serve: query latency with the model encoding on CUDA (SearchConfig.device auto), 1 and 8 clients.
SERVE_MISSING=$("$PYTHON" - <<'PY'
import importlib
missing = []
for name in ("avindex.serve.app", "httpx2", "faiss"):
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
PY
)
if [ -z "$SERVE_MISSING" ] && [ -f benchmarks/serve_load.py ]; then
    section serve-latency 90 "$PYTHON" benchmarks/serve_load.py --clips 20000 --seconds 5 \
        --levels 1,8 --baseline-seconds 10 --json "$OUT/serve_load.json"
else
    log "SKIP serve-latency: cannot import ${SERVE_MISSING:-benchmarks/serve_load.py} here (carry the serve extra's wheels, httpx2 and faiss-cpu to measure it); not measured"
    echo "serve-latency: skipped (missing ${SERVE_MISSING:-serve_load.py})" >> "$OUT/summary.txt"
fi

# Ray: `embed --ray` with one GPU actor on the 720p corpus (the ray wheel is ~80 MB: carry it
# over two calls into $SITE to measure this; without it the section says so).
if "$PYTHON" -c 'import ray' 2>/dev/null; then
    section ray-embed 90 sh -c '"$@" > "$0"' "$OUT/ray_embed.json" "${AVINDEX[@]}" embed \
        "$CORPUS/720p" --ray --model random --device "$DEVICE" --store /tmp/avindex-ray-store --json
else
    log "SKIP ray-embed: ray is not importable here (carry its wheel to measure it); not measured"
    echo "ray-embed: skipped (no ray)" >> "$OUT/summary.txt"
fi

log "done in $(( $(date +%s) - START ))s"
cat "$OUT/summary.txt"
