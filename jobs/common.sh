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
#   DLLAMA_LAUNCHER      srun or mpirun; unset: chosen for the MPI library mpi4py loads (see
#                        "The launcher" below). srun: Slurm starts the ranks, with the plugin the
#                        library speaks (--mpi=pmi2 for MPICH and Intel MPI, --mpi=pmix for Open
#                        MPI). mpirun: the runtime's own mpirun inside the allocation (it takes
#                        hosts and slots from Slurm and starts its daemons or proxies through it)
# Sets: DLLAMA_BUDGET_ARGS (an array: --memory-budget ... or nothing), DLLAMA_THREAD_ARGS
# (--nthreads $SLURM_CPUS_PER_TASK when Slurm gives one), DLLAMA_MPI_FAMILY (mpich, openmpi,
# impi or other), and the function `dllama_launch`.

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

# The launcher. One mpi4py runs on MPICH, Open MPI and Intel MPI, and each joins a job only
# through the plumbing it speaks: the MPICH and Intel MPI wheels speak PMI-2 (srun --mpi=pmi2,
# their Hydra mpirun); Open MPI 5 speaks only PMIx (srun --mpi=pmix, its own mpirun); a site's
# MPICH or Intel MPI speaks what the site built it for, which its MpiDefault knows.
# which-mpi says both, for the library mpi4py loads (dllama_mpi/parallel/mpi_runtime.py decides)
mapfile -t which < <(python -m dllama_mpi which-mpi --family --srun-mpi) && ((${#which[@]} == 2)) ||
  die "can't tell which MPI library mpi4py loads in $DLLAMA_VENV (python -m dllama_mpi which-mpi says why)"
DLLAMA_MPI_FAMILY=${which[0]}
srun_mpi=${which[1]}  # empty: the site's MpiDefault
declare -A MPI_NAMES=([mpich]=MPICH [openmpi]="Open MPI" [impi]="Intel MPI" [other]="of an unknown family")

# srun's first error line when this Slurm can't start a step with --mpi=pmix; nothing when it
# can. A one-task step tells for sure: Debian's slurm-wlm lists its pmix_v4 plugin (srun
# --mpi=list) even without the PMIx library it loads (the libpmix2 package), and srun then
# stops with "mpi/pmix_v4: init: ... can not load PMIx library".
pmix_problem() {
  local out
  if ! out=$(timeout 60 srun --mpi=pmix --ntasks=1 true 2>&1); then
    echo "srun --mpi=pmix fails here: ${out%%$'\n'*}"
  fi
}

# the runtime's own mpirun: beside the library when MPI4PY_LIBMPI forces one (a runtime wheel
# in the venv would otherwise come first on PATH with its own mpirun), else the first on PATH
own_mpirun() {
  local prefix
  if [[ ${MPI4PY_LIBMPI:-} == /* ]]; then
    prefix=$(dirname "$(dirname "$MPI4PY_LIBMPI")")
    [[ -x $prefix/bin/mpirun ]] && { echo "$prefix/bin/mpirun"; return; }
  fi
  command -v mpirun || die "DLLAMA_LAUNCHER=mpirun but no mpirun is on PATH (nor beside MPI4PY_LIBMPI)"
}

dllama_launcher=${DLLAMA_LAUNCHER:-}
launcher_why=""
if [[ -z $dllama_launcher ]]; then
  dllama_launcher=srun
  if [[ $DLLAMA_MPI_FAMILY == openmpi ]]; then
    launcher_why=$(pmix_problem)
    [[ -z $launcher_why ]] || dllama_launcher=mpirun
  fi
fi
case $dllama_launcher in
  srun)
    DLLAMA_LAUNCH_CMD=(srun ${srun_mpi:+--mpi=$srun_mpi} --kill-on-bad-exit=1) ;;
  mpirun)
    mpirun=$(own_mpirun)
    DLLAMA_LAUNCH_CMD=("$mpirun")
    # Open MPI's mpirun binds each rank to one core by default, even with --cpus-per-task > 1,
    # which would pile a rank's threads onto that core; srun and Hydra leave placement to the OS
    [[ $DLLAMA_MPI_FAMILY != openmpi ]] || DLLAMA_LAUNCH_CMD+=(--bind-to none) ;;
  *) die "DLLAMA_LAUNCHER is '$dllama_launcher'; use srun or mpirun, or leave it unset for the MPI library's own choice" ;;
esac

# dllama_launch [-n N] CMD...: CMD on N tasks of the allocation (default: all of them)
dllama_launch() {
  local n=${SLURM_NTASKS:?not inside a Slurm allocation}
  if [[ ${1:-} == -n ]]; then n=$2; shift 2; fi
  if [[ $dllama_launcher == srun ]]; then
    "${DLLAMA_LAUNCH_CMD[@]}" --ntasks="$n" "$@"
  else
    "${DLLAMA_LAUNCH_CMD[@]}" -n "$n" "$@"
  fi
}

echo "job ${SLURM_JOB_ID:-?}: ${SLURM_NTASKS:-?} task(s) on ${SLURM_JOB_NODELIST:-?}; venv $DLLAMA_VENV;" \
  "budgets ${DLLAMA_BUDGET_ARGS[*]:-equal}; numba cache $NUMBA_CACHE_DIR;" \
  "MPI ${MPI_NAMES[$DLLAMA_MPI_FAMILY]:-$DLLAMA_MPI_FAMILY}, launcher ${DLLAMA_LAUNCH_CMD[*]}${launcher_why:+ ($launcher_why)}" >&2
