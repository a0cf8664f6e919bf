#!/usr/bin/env bash
# tests/gpu on a host with 3 or more GPUs, in about the time of the 1-GPU tests alone: those on one GPU, and every
# 2-GPU case at once on a pair of GPUs, each pytest with its own MASTER_PORT (a case takes about a minute, mostly
# start-up). Run from the repo root with TE (and the cuBLAS stack under test) set up:
#   bash tools/gpu_tests.sh OUT [ONE_GPU=0] [PAIR=2,3] [PORT=29500]
# ONE_GPU or PAIR "-" leaves that part out (on a 2-GPU host: the 1-GPU tests first, then the pairs on GPUs 0,1).
# OUT gets single.txt, pair_<n>.txt and summary.txt; the exit code is 0 only if every part passed.
set -u
out=${1:?usage: tools/gpu_tests.sh OUT [ONE_GPU] [PAIR] [PORT]}
one=${2:-0}; pair=${3:-2,3}; port=${4:-29500}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
# the 2-GPU cases: every test of test_distributed_gpu.py and the guard's DDP cases
mapfile -t cases < <(python3 -m pytest --collect-only -q -p no:cacheprovider tests/gpu/test_distributed_gpu.py \
  tests/gpu/test_guard_gpu.py -k "sharded_fit or ddp_two_gpus" 2>/dev/null | grep "::")
[ "$pair" = - ] && cases=()
pids=()
if [ "$one" != - ]; then
  CUDA_VISIBLE_DEVICES=$one python3 -m pytest -q -rs tests/gpu -p no:cacheprovider --basetemp "$out/tmp_single" \
    > "$out/single.txt" 2>&1 &
  pids+=($!)
fi
for i in "${!cases[@]}"; do
  CUDA_VISIBLE_DEVICES=$pair MASTER_PORT=$((port + 10 * i)) python3 -m pytest -q -rs "${cases[$i]}" \
    -p no:cacheprovider --basetemp "$out/tmp_pair_$i" > "$out/pair_$i.txt" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
{
  [ "$one" != - ] && echo "1-GPU tests (GPU $one): $(tail -n 1 "$out/single.txt")"
  for i in "${!cases[@]}"; do echo "${cases[$i]} (GPUs $pair): $(tail -n 1 "$out/pair_$i.txt")"; done
} > "$out/summary.txt"
cat "$out/summary.txt"
exit $status
