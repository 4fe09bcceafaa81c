#!/bin/bash
# Convert a fleet of Caffe deployments on shared storage with a Slurm job array.
#
# Every task walks the same SRC folder, so every task computes the same sorted work list;
# `--shard auto` keeps this task's 1/N of it (from SLURM_ARRAY_TASK_ID, _MIN, _STEP, _COUNT), and the
# N tasks together convert each deployment exactly once. Each task writes its own report.
#
#   sbatch examples/slurm_array.sh                    # the array below: 64 tasks
#   sbatch --array=1-16 examples/slurm_array.sh       # any contiguous (or evenly stepped) range
#   # when all tasks are done, one report for the fleet (says which shards are missing):
#   merge-bn batch-report "$REPORTS"/shard-*.json -o fleet.json
#   # a task failed or timed out? re-submit the same array: --skip-existing keeps what is done.
#
# Exit status of a task: 0 all converted or skipped, 1 some deployment failed or some file or folder
# could not be read (see its report), 2 usage error.
#SBATCH --job-name=merge-bn
#SBATCH --array=0-63
#SBATCH --cpus-per-task=2
#SBATCH --mem=2G
#SBATCH --time=01:00:00
#SBATCH --output=merge-bn-%A_%a.log

set -euo pipefail
FLEET=${FLEET:-/shared/models}          # SRC: the deployments (never written)
OUT=${OUT:-/shared/models_merged}       # OUTDIR: the merged models, same folder layout
REPORTS=${REPORTS:-/shared/merge-bn-reports}
MERGE_BN=${MERGE_BN:-merge-bn}          # e.g. "python -m caffe_bn_merge"

mkdir -p "$REPORTS"
$MERGE_BN batch "$FLEET" --out "$OUT" --shard auto --jobs "${SLURM_CPUS_PER_TASK:-1}" --skip-existing --report "$REPORTS/shard-${SLURM_ARRAY_TASK_ID}.json" -q
