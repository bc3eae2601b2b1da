# jobs/common.sh: the setup every job script shares; sourced, never run.
#
# Reads (all optional):
#   DLLAMA_HOME          the project's directory (default: the directory sbatch was run from,
#                        $SLURM_SUBMIT_DIR); job scripts source $DLLAMA_HOME/jobs/common.sh
#   DLLAMA_VENV          the venv to run, by absolute path (default: $DLLAMA_HOME/.venv, as the
#                        README's install makes it)
#   DLLAMA_NUMBA_CACHE   numba's compiled-kernel cache (default: node-local
#                        ${TMPDIR:-/tmp}/dllama-numba-$USER): each node compiles once, on its
#                        first job, instead of every rank writing to a shared filesystem
#   DLLAMA_BUDGETS       one budget per task, ratios ("3 2 2 1") or sizes ("6GiB 2GiB 2GiB
#                        1GiB": ratio and hard cap); or "memory": each node's available memory
#                        (MemAvailable, or less where the job's cgroup, e.g. its --mem, leaves
#                        less), split evenly over the tasks Slurm put on it, as sizes in MiB; or
#                        "auto" (optionally "auto 6GiB 2GiB ...", caps): every rank measures
#                        its speed at the start and the job splits by it, within memory
#   DLLAMA_BUDGETS_FILE  a file of budgets, one per task (whitespace or lines; '#' comments);
#                        used when DLLAMA_BUDGETS is unset. Neither: equal shares.
#   DLLAMA_LAUNCHER      srun (default: srun --mpi=pmi2) or mpirun (MPICH's mpirun inside the
#                        allocation; it starts its proxies through Slurm)
# Sets: DLLAMA_BUDGET_ARGS (an array: --memory-budget ... or nothing), DLLAMA_THREAD_ARGS
# (--nthreads $SLURM_CPUS_PER_TASK when Slurm gives one), and the function `dllama_launch`.

set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

DLLAMA_HOME=${DLLAMA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
DLLAMA_VENV=${DLLAMA_VENV:-$DLLAMA_HOME/.venv}
[[ $DLLAMA_VENV == /* ]] || die "DLLAMA_VENV must be an absolute path, got '$DLLAMA_VENV'"
[[ -x $DLLAMA_VENV/bin/python ]] || die "no venv at $DLLAMA_VENV (install it as the README says, or set DLLAMA_VENV)"
# shellcheck disable=SC1091
source "$DLLAMA_VENV/bin/activate"

export NUMBA_CACHE_DIR=${DLLAMA_NUMBA_CACHE:-${TMPDIR:-/tmp}/dllama-numba-${USER:-$(id -un)}}
mkdir -p "$NUMBA_CACHE_DIR"

DLLAMA_THREAD_ARGS=()
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  DLLAMA_THREAD_ARGS=(--nthreads "$SLURM_CPUS_PER_TASK")
fi

# "2(x3),1" -> "2 2 2 1": tasks on each node of the allocation, in node order
tasks_per_node() {
  local part out=()
  IFS=, read -ra parts <<<"${SLURM_TASKS_PER_NODE:?not inside a Slurm allocation}"
  for part in "${parts[@]}"; do
    if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      for ((i = 0; i < BASH_REMATCH[2]; i++)); do out+=("${BASH_REMATCH[1]}"); done
    else
      out+=("$part")
    fi
  done
  echo "${out[@]}"
}

# one budget per task from each node's available memory (sizes in MiB), the node's share split
# evenly over its tasks; tasks are numbered node by node (Slurm's default block distribution)
budgets_from_memory() {
  local counts mem budgets=() n i
  read -ra counts <<<"$(tasks_per_node)"
  mapfile -t mem < <(srun --ntasks="${#counts[@]}" --ntasks-per-node=1 --label \
    python -c 'from dllama_mpi.parallel.budgets import available_memory as a; m = a(); m is None or print(m // 2**20)' |
    sort -n | cut -d: -f2 | tr -d ' ')
  ((${#mem[@]} == ${#counts[@]})) || die "read the memory of ${#mem[@]} node(s), expected ${#counts[@]}"
  for ((n = 0; n < ${#counts[@]}; n++)); do
    for ((i = 0; i < counts[n]; i++)); do budgets+=("$((mem[n] / counts[n]))MiB"); done
  done
  echo "${budgets[@]}"
}

DLLAMA_BUDGET_ARGS=()
if [[ ${DLLAMA_BUDGETS:-} == memory ]]; then
  read -ra DLLAMA_BUDGET_ARGS <<<"--memory-budget $(budgets_from_memory)"
elif [[ -n ${DLLAMA_BUDGETS:-} ]]; then
  read -ra DLLAMA_BUDGET_ARGS <<<"--memory-budget $DLLAMA_BUDGETS"
elif [[ -n ${DLLAMA_BUDGETS_FILE:-} ]]; then
  [[ -r $DLLAMA_BUDGETS_FILE ]] || die "can't read DLLAMA_BUDGETS_FILE=$DLLAMA_BUDGETS_FILE"
  read -ra DLLAMA_BUDGET_ARGS <<<"--memory-budget $(sed 's/#.*//' "$DLLAMA_BUDGETS_FILE" | xargs)"
fi

# dllama_launch [-n N] CMD...: CMD on N tasks of the allocation (default: all of them)
dllama_launch() {
  local n=${SLURM_NTASKS:?not inside a Slurm allocation}
  if [[ ${1:-} == -n ]]; then n=$2; shift 2; fi
  case ${DLLAMA_LAUNCHER:-srun} in
    srun) srun --mpi=pmi2 --ntasks="$n" --kill-on-bad-exit=1 "$@" ;;
    mpirun) mpirun -n "$n" "$@" ;;
    *) die "DLLAMA_LAUNCHER is '$DLLAMA_LAUNCHER'; use srun or mpirun" ;;
  esac
}

echo "job ${SLURM_JOB_ID:-?}: ${SLURM_NTASKS:-?} task(s) on ${SLURM_JOB_NODELIST:-?}; venv $DLLAMA_VENV;" \
  "budgets ${DLLAMA_BUDGET_ARGS[*]:-equal}; numba cache $NUMBA_CACHE_DIR" >&2
