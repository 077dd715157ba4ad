#!/usr/bin/env bash
# Runs an experiment on every host of a Cloud TPU VM slice (multi-host), with plain gcloud.
#
#   bash xm_launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra main.py flags]
#   bash xm_launch/tpu_vm.sh rj-1b us-east5-a v5p-64 configs/paper_1b.py:musicpile-chempile gs://b/1b
#
# Creates the slice if it does not exist, copies this checkout to every host, installs
# the package and runs main.py on all hosts at once; JAX joins the processes. Rerunning
# the same command resumes: finished nodes are skipped, a killed node continues from
# its last checkpoint. Delete the slice with: gcloud compute tpus tpu-vm delete NAME --zone ZONE
set -euo pipefail
[ $# -ge 5 ] || { sed -n '2,11p' "$0"; exit 2; }
name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5
shift 5
version=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5}

if ! gcloud compute tpus tpu-vm describe "$name" --zone "$zone" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$name" --zone "$zone" \
    --accelerator-type "$accelerator" --version "$version"
fi
root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
archive=$(mktemp --suffix=.tar.gz)
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
gcloud compute tpus tpu-vm scp "$archive" "$name":retention_jax.tar.gz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "
  set -e
  mkdir -p retention_jax && tar -xzf retention_jax.tar.gz -C retention_jax && cd retention_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip && pip install -q -e . 'jax[tpu]'
  python main.py --config=$config --workdir=$workdir $*
"
