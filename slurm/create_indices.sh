#!/usr/bin/env bash
# Map every bucket of a phase folder to its row ids (`sd3 create-indices`) as a CPU job, one reader per CPU.
#
#   sbatch slurm/create_indices.sh [PHASE_FOLDER] [OUT.npz]     (defaults: the sd3-1b-256 preset's paths)
#
# Submit from the directory the relative paths refer to. Re-run it whenever the phase folder changes: training
# refuses an index whose manifest no longer matches the shards.
#SBATCH --job-name=sd3-indices
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=02:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

FOLDER=${1:-data/phase_256}
OUT=${2:-data/bucket_indices_256.npz}
if [ -n "${SD3_VENV:-}" ]; then
    # shellcheck disable=SC1091
    source "$SD3_VENV/bin/activate"
fi
PYTHON=${SD3_PYTHON:-python3}

exec "$PYTHON" -m sd3 create-indices --data-parquet-folder "$FOLDER" --bucket-indices-path "$OUT" \
    --n-proc "${SLURM_CPUS_PER_TASK:-$(nproc)}"
