#!/usr/bin/env bash
# Runs an experiment on every host of a Cloud TPU VM slice (multi-host), with plain gcloud,
# and keeps it running through preemptions.
#
#   bash xm_launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [extra main.py flags]
#   bash xm_launch/tpu_vm.sh rj-1b us-east5-a v5p-64 configs/paper_1b.py:musicpile-chempile gs://b/1b
#
# Creates the slice if it does not exist, copies this checkout and a run script to every
# host, installs Python >= 3.11 if the image lacks it and the package within the versions
# of xm_launch/constraints.txt, and starts on all hosts at once, detached, the prepare
# step (main.py --only=prepare: the token stores, under WORKDIR) and then main.py
# (setsid nohup), logging to ~/rj/<NAME>.<host>.log on each host. It then polls: when the
# slice is preempted (state PREEMPTED/TERMINATED, or it vanished) it recreates the slice
# and reruns the same command, which resumes (finished nodes are skipped, a killed node
# continues from its last checkpoint). A run that fails on a healthy slice is relaunched
# at most TPU_VM_MAX_FAILURES times (default 2). Before any of this, the config is compiled
# here for ACCELERATOR (main.py --dry_run --topology: every program, deviceless, with
# libtpu from the tpu extra; $PYTHON, default python3): a program that does not compile
# or fit the chips' HBM stops the launch before a VM exists. TPU_VM_DRY_RUN=1 prints the
# run script, the check and the gcloud commands instead of running them. Delete the
# slice afterwards with:
#   gcloud compute tpus tpu-vm delete NAME --zone ZONE
set -euo pipefail
[ $# -ge 5 ] || { sed -n '2,24p' "$0"; exit 2; }
name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5
shift 5
version=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5}
poll_s=${TPU_VM_POLL_S:-120}
max_failures=${TPU_VM_MAX_FAILURES:-2}
dry=${TPU_VM_DRY_RUN:-0}

# gcloud, or its command line printed (each word shell-quoted) in a dry run.
g() {
  if [ "$dry" = 1 ]; then printf '+ gcloud'; printf ' %q' "$@"; printf '\n'; else gcloud "$@"; fi
}

# The deviceless compile of every program for the slice, here, before any VM.
compile_check() {
  local root cmd
  root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  cmd=("${PYTHON:-python3}" main.py --config="$config" --workdir="$workdir" "$@" --dry_run
    --topology="$accelerator")
  if [ "$dry" = 1 ]; then printf '+'; printf ' %q' "${cmd[@]}"; printf '\n'; return; fi
  (cd "$root" && "${cmd[@]}") || {
    echo "$config does not compile or fit on $accelerator (above); no slice created" >&2
    exit 1
  }
}

# The script every host runs. Arguments are spliced in with printf %q, so any override
# (parentheses, quotes, $, ;, spaces) reaches main.py exactly as given here.
run_script() {
  printf '#!/usr/bin/env bash\n'
  printf 'set -euo pipefail\n'
  printf 'args=(--config=%q --workdir=%q' "$config" "$workdir"
  [ $# -gt 0 ] && printf ' %q' "$@"
  printf ')\n'
  cat <<'EOF'
cd "$HOME/rj"
py=$(command -v python3.12 || command -v python3.11 || true)
if [ -z "$py" ]; then  # the image's Python is older than the project supports
  sudo apt-get update -q && sudo apt-get install -y -q software-properties-common
  sudo add-apt-repository -y ppa:deadsnakes/ppa
  sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv
  py=python3.11
fi
if [ ! -x .venv/bin/python ]; then "$py" -m venv .venv; fi
. .venv/bin/activate
pip install -q -U pip
pip install -q -c constraints.txt -e src 'jax[tpu]'
cd src
set +e
# The data first (no devices; every host may run it: shard commits are idempotent).
python main.py "${args[@]}" --only=prepare && python main.py "${args[@]}"
rc=$?
echo "$rc" > "$HOME/rj/rc"
exit "$rc"
EOF
}

# Detached start on every host; the previous run's exit code is cleared first.
LAUNCH='mkdir -p ~/rj && rm -f ~/rj/rc && cd ~/rj && rm -rf src && mkdir src && tar -xzf src.tar.gz -C src && setsid nohup bash ~/rj/run.sh > ~/rj/'"$name"'.$(hostname).log 2>&1 < /dev/null &'
# One line per host: its exit code, or "running" while main.py is still going.
POLL='cat ~/rj/rc 2>/dev/null || echo running'

state() { gcloud compute tpus tpu-vm describe "$name" --zone "$zone" --format='value(state)' 2>/dev/null || echo MISSING; }

ensure_slice() {
  local s
  s=$([ "$dry" = 1 ] && echo MISSING || state)
  case $s in
    READY) return ;;
    PREEMPTED | TERMINATED) g compute tpus tpu-vm delete "$name" --zone "$zone" --quiet ;;
    CREATING | STARTING | RESTARTING | REPAIRING) sleep "$poll_s"; ensure_slice; return ;;
  esac
  g compute tpus tpu-vm create "$name" --zone "$zone" --accelerator-type "$accelerator" \
    --version "$version"
}

stage_files() {
  local dir=$1 root
  shift
  root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  git -C "$root" archive --format=tar.gz -o "$dir/src.tar.gz" HEAD
  run_script "$@" > "$dir/run.sh"
  cp "$root/xm_launch/constraints.txt" "$dir/constraints.txt"
}

launch() {
  local dir=$1
  g compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command 'mkdir -p ~/rj'
  g compute tpus tpu-vm scp "$dir/src.tar.gz" "$dir/run.sh" "$dir/constraints.txt" \
    "$name":rj/ --zone "$zone" --worker=all
  g compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$LAUNCH"
}

stage=$(mktemp -d)
stage_files "$stage" "$@"
if [ "$dry" = 1 ]; then
  echo "--- run.sh"
  cat "$stage/run.sh"
  echo "--- constraints.txt"
  cat "$stage/constraints.txt"
  echo "---"
  compile_check "$@"
  ensure_slice
  launch "$stage"
  exit 0
fi

compile_check "$@"
failures=0
while true; do
  ensure_slice
  launch "$stage"
  while true; do
    sleep "$poll_s"
    [ "$(state)" = READY ] || { echo "slice $name: $(state); recreating and resuming"; break; }
    codes=$(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all \
      --command "$POLL" 2>/dev/null) || continue
    grep -q running <<< "$codes" && continue
    if ! grep -qv '^0$' <<< "$codes"; then echo "finished on every host"; exit 0; fi
    failures=$((failures + 1))
    echo "main.py failed on a healthy slice (exit codes: $(tr "\n" " " <<< "$codes")), failure $failures"
    [ "$failures" -le "$max_failures" ] || { echo "giving up; see ~/rj/$name.*.log"; exit 1; }
    break
  done
done
