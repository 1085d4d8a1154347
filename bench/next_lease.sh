#!/usr/bin/env bash
# The next GPU lease, prepared as one command (device tool: carry [".tcache"], timeout_s 570,
# then give_back). Here first: `make tcache` (kernels changed since the last archive; it
# also holds the weight-only and Gluon probes' and GPU tests' forced configs) and `make wheels`.
#
#   bash bench/next_lease.sh "$OUT"
#
# What it measures, in order (the predictions it checks: bench/README.md NOTES, the entries
# dated 2026-11-27 and 2026-11-28):
#   1. bench/probes/decode_fq_probe.py --parts prefill,decode: every weight-only tile forced,
#      plain and transposed (W_A) at m = 2048, and the decode tiles (deep pipelines, GEMV)
#      at m = 1, against F.linear bf16 -> $OUT/wo_probe.txt (its kernels are in the prebuilt
#      cache: well under a minute expected; capped at 140 s);
#   2. bench/probes/gluon_int8_wgmma.py: the sm_90 Gluon main loop (gemm_sm90.py: the int8
#      wgmma kept in flight, which Triton's tl.dot never does), each tile forced, exact
#      against torch._int_mm and timed beside the Triton bare GEMM at issue 6's and 12's
#      shapes, the W8A8 GEMM on both paths at m = 2048, and resnet50's 3x3 layers on the
#      Triton conv and each Gluon conv tile (conv_sm90.py) -> $OUT/gluon_probe.txt (110 s;
#      its Gluon kernels, and the Gluon GPU tests', are in the prebuilt cache: warm.py
#      gluon_tiles; quick tuning, as the suites: the Triton kernels' picks are warmed);
#   3. the lease runner (what is left of 555 s: ~6-7 min): linear_dynamic (issue 12's
#      rows); a profile of its prefill rows (`--what linear_prefill`: the W8A8 row's
#      quantize kernel, GEMM and the gap between them, the ~13 us of the m = 2048 row
#      outside its GEMM); models and conv (issue 6's network and "all" targets, after the
#      folded requantization; conv also with the Gluon main loops' graph row: the GEMM's
#      for the 1x1 layers, the implicit-GEMM conv's for the 3x3 and strided ones); the
#      gpu-marked tests of the weight-only and dynamic kernels and the forced conv / GEMM
#      configs and Gluon GEMM / conv tiles against the NumPy oracle, and of the compiled fake-quant,
#      LSQ and BN-fold rounding (cvt.rni / cvt.rn.bf16, which the interpreter never runs:
#      every half value against torch), and replayed QAT steps against generic ones byte
#      for byte (launch.replays: never run on a GPU yet), and the activation tables and nearest
#      resizes (QAT on CUDA against the CPU-built tables; no host sync once warm) (8 pytest
#      workers); qat_step (issue
#      5: the eager row is the first GPU timing of the replays, predicted ~1.5-1.7x float
#      from 2.20x; the graph rows should not move); then, if the budget still allows one (the runner skips
#      a stage it cannot start), fake_quant (the cvt.rni bf16 kernels) and gemm (with the
#      Gluon bare rows) -> $OUT/lease.tar.gz, $OUT/summary.md.
# Back here: tar -xzf lease.tar.gz -C bench; python -m gpuquant.bench.readme_table --write
# README.md; a NOTES entry against the predictions.
set -u
OUT=${1:?usage: bash bench/next_lease.sh OUT_DIR}
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
TC=$(mktemp -d)
python -c "import glob, sys; from gpuquant.bench.tcache import unpack
a = sorted(glob.glob('.tcache/*.tar.gz'))
print(unpack(a[-1], sys.argv[1])[1] if a else 'no prebuilt Triton cache')" "$TC" \
    > "$OUT/wo_probe.txt" 2>&1
TRITON_CACHE_DIR=$TC timeout 140 python bench/probes/decode_fq_probe.py \
    --parts prefill,decode --reps 30 >> "$OUT/wo_probe.txt" 2>&1
echo "probe exit $?" >> "$OUT/wo_probe.txt"
TRITON_CACHE_DIR=$TC GPUQUANT_TRITON_TUNE=quick timeout 110 \
    python bench/probes/gluon_int8_wgmma.py --reps 40 \
    > "$OUT/gluon_probe.txt" 2>&1
echo "probe exit $?" >> "$OUT/gluon_probe.txt"
BUDGET=$((555 - SECONDS))
TESTS="tests/transformers/test_dynamic_gpu.py tests/backends/test_triton_forced_configs.py"
TESTS="$TESTS tests/backends/test_triton_gemm_sm90.py tests/backends/test_triton_conv_sm90.py"
TESTS="$TESTS tests/backends/test_triton_fake_quant.py"
TESTS="$TESTS tests/backends/test_triton_bn_fold.py tests/quantization/test_quant_fake_quant.py"
TESTS="$TESTS tests/backends/test_triton_layer_plans.py"
TESTS="$TESTS tests/backends/test_triton_activation_models.py"
python -m gpuquant.bench.lease --out "$OUT" --budget $BUDGET \
    --stages linear_dynamic,profile,models,tests,qat_step,conv,fake_quant,gemm \
    --cap tests=120 --cap profile=60 \
    --profile-args "--what linear_prefill" \
    --pytest-args "-q -m gpu -n 8 $TESTS -p no:cacheprovider -o faulthandler_timeout=60"
