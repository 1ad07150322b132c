#!/usr/bin/env bash
# The GPU table of training from caches vs online encoding (bench/RESULTS.md), in one script of at most
# ~8 minutes on one H100/H200, printed at the end (and written to $OUT/device_table.md when $OUT is set).
#
#   Here, once, with a package registry (the device has none):  bash bench/device_check.sh --fetch-wheels
#     downloads into ./.whl (kept out of git) the wheels of what the device image lacks.
#   On the device (carry .whl):                                 bash bench/device_check.sh
#   Dry run on a CPU with tiny sizes (tests the Python parts):  DEVICE_CHECK_CPU=1 bash bench/device_check.sh
#     As the device image has no webdataset, obstore or s3fs (nothing here needs them), a faithful dry run hides
#     them: a folder of webdataset.py/obstore.py/s3fs.py that raise ImportError, on PYTHONPATH, and a fresh
#     DEVICE_CHECK_WORK (else the caches of an earlier run are reused and the encoders never run).
#
# Runs (all `paper` preset with a random Qwen3-VL-4B-sized LLM and FLUX-sized VAE at 256x256 on the GPU):
#   1. 120-token captions, batch 8, eager: (c) compute, (a) cached, (b) online pad-512, (b') online dynamic,
#      torch.profiler summary of (a) and (c), which SDPA backends take the masked cross-attention
#   2. 24-token captions, batch 8, eager: the same without the profiler
#   3. 120-token captions, batch 8, --compile: (a)/(c), MFU, profiler summary (reuses run 1's caches)
#   4. 120-token captions, the largest batch of 8/16/24/32 that fits, --compile: (a)/(c), MFU
#   then, if time is left: the loader's host work per batch at paper-sized captions (bench_data.py --only feed)
# Each run has its own time limit, so one that fails or hangs leaves the others' rows.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=(diffusers==0.42.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
        crc32c==2.9.post0 importlib-metadata==10.2.0 gguf==0.19.0)

if [ "${1:-}" = "--fetch-wheels" ]; then
  grep -qxF '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
    || echo '/.whl/' >> "$(git rev-parse --git-common-dir)/info/exclude"
  mkdir -p .whl
  for p in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$p" \
      || { echo "could not fetch $p" >&2; exit 1; }
  done
  du -sh .whl
  exit 0
fi

CPU=${DEVICE_CHECK_CPU:-0}
RESULTS=${OUT:-/tmp/device-check}
WORK=${DEVICE_CHECK_WORK:-/tmp/device-check-work}
mkdir -p "$RESULTS" "$WORK"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false

# 1. What the device lacks, from the carried wheels; `semroute` importable from this checkout.
SITE=/tmp/device-check-site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
fi
mkdir -p /tmp/device-check-pkg && ln -sfn "$ROOT" /tmp/device-check-pkg/semroute
export PYTHONPATH="/tmp/device-check-pkg:$SITE${PYTHONPATH:+:$PYTHONPATH}"
PY=${DEVICE_CHECK_PYTHON:-python3}
$PY - <<'EOF' || { echo "missing packages: run 'bash bench/device_check.sh --fetch-wheels' where pip works and carry .whl" >&2; exit 1; }
import importlib, torch
for m in ("diffusers", "zarr", "crc32c", "transformers", "accelerate", "pyarrow", "semroute.stage2_train.feed"):
    importlib.import_module(m)
print("torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF

if [ "$CPU" = "1" ]; then
  SIZE=(--llm random-qwen3-tiny --preset tiny --vae random-flux-tiny --size 32 --model '{"num_blocks": 1}')
  N=(--samples 48 --steps 2 --warmup 1 --online-steps 1)
  PROFILE=2; MAXB=8; LIMIT=(600 300 600 600)
else
  SIZE=(--llm random-qwen3-4b --preset paper --vae random-flux --size 256)
  N=(--samples 256 --steps 10 --warmup 3 --online-steps 6)
  PROFILE=4; MAXB=max; LIMIT=(100 80 170 130)
fi
COMMON=(bench/bench_train.py "${SIZE[@]}" --workers 2 --loader thread)
START=$SECONDS

run() {  # run NAME LIMIT ARGS...: one bench_train.py run, its JSON into $RESULTS/NAME.json, its log beside it
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, at $((SECONDS - START))s)"
  timeout --kill-after=10 "$limit" $PY "${COMMON[@]}" "$@" --out "$RESULTS/$name.json" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] || { echo "$name failed (exit $rc):"; tail -n 25 "$RESULTS/$name.log"; }
  grep -E "^(caches ready|timed|round|warmed|batch [0-9])" "$RESULTS/$name.log" || true
}

run c120_b8_eager "${LIMIT[0]}" "${N[@]}" --caption-tokens 120 --batch-size 8 --workdir "$WORK/c120" \
    --profile $PROFILE --probe-attention
run c24_b8_eager "${LIMIT[1]}" "${N[@]}" --caption-tokens 24 --batch-size 8 --workdir "$WORK/c24"
# Compiled runs: captions padded to multiples of 128 (2-3 shapes to compile for these lengths).
run c120_b8_compile "${LIMIT[2]}" "${N[@]}" --caption-tokens 120 --batch-size 8 --workdir "$WORK/c120" \
    --skip-online --compile --text-buckets 128 --profile $PROFILE
run c120_bmax_compile "${LIMIT[3]}" "${N[@]}" --caption-tokens 120 --batch-size $MAXB --workdir "$WORK/c120" \
    --skip-online --compile --text-buckets 128 --steps 5 --warmup 1 --workers 3
echo "=== all runs: $((SECONDS - START))s"
# The host side of the loader at the paper preset's caption size (bench/RESULTS.md, "Reads of paper-sized
# captions": on the 2-core VM, first-touch page faults were most of it), if the runs left the time for it.
if [ $((SECONDS - START)) -lt 400 ]; then
  FEED=(--size paper --captions 80); [ "$CPU" = "1" ] && FEED=(--size toy --captions 100)
  echo "=== host feed (limit 80s)"
  timeout --kill-after=5 80 $PY bench/bench_data.py --only feed "${FEED[@]}" > "$RESULTS/feed.json" 2> "$RESULTS/feed.log" \
    && grep "^feed" "$RESULTS/feed.log" || echo "host feed: no result (see feed.log)"
fi

$PY - "$RESULTS" <<'EOF' | tee "$RESULTS/device_table.md"
import json, sys
from pathlib import Path

folder = Path(sys.argv[1])
rows = []
for name in ("c120_b8_eager", "c24_b8_eager", "c120_b8_compile", "c120_bmax_compile"):
    path = folder / f"{name}.json"
    if not path.exists():
        rows.append(f"| {name} | (no result: see {name}.log) |" + " |" * 12)
        continue
    r = json.loads(path.read_text())
    s = r["seconds_per_step"]
    mfu = r.get("mfu") or {}
    def f(x, d=4):
        return "-" if x is None else f"{x:.{d}f}"
    rows.append(" | ".join([
        f"| {name}", f"{r['caption_tokens_median']:.0f} / {r['text_tokens_padded_mean']:.0f}", str(r["batch_size"]),
        "yes" if r["compile"] else "no", f(s.get("c_compute")), f(s.get("a_cached")), f(r["a_over_c_time"], 3),
        f(mfu.get("c_compute"), 3), f(mfu.get("a_cached"), 3), f(s.get("b_online_pad512")),
        f(s.get("b2_online_dynamic")), f(r.get("b_over_a_time"), 2), f(r.get("b2_over_a_time"), 2),
        f(r.get("compiled_over_eager_time"), 3), f(r.get("a_loader_wait_s_per_step"), 4) + " |"]))
machines = {json.loads(p.read_text())["machine"] for p in folder.glob("c*.json")}
print(f"machine: {', '.join(sorted(machines)) or '?'}")
print("| run | caption tokens median / padded | batch | compile | (c) s/step | (a) s/step | (a)/(c) | MFU (c) "
      "| MFU (a) | (b) pad-512 s/step | (b') dynamic s/step | (b)/(a) | (b')/(a) | (c) compiled/eager "
      "| (a) loader wait s/step |")
print("|" + "---|" * 15)
print("\n".join(rows))
for name in ("c120_b8_eager", "c120_b8_compile"):
    path = folder / f"{name}.json"
    if path.exists():
        r = json.loads(path.read_text())
        print(f"\nprofile {name}: " + json.dumps(r.get("profile"), indent=1))
        if r.get("sdpa_backends_cross_attention"):
            print("sdpa backends: " + json.dumps(r["sdpa_backends_cross_attention"]))
EOF
