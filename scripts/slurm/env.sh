# shellcheck shell=bash
# Shared by neox_1node.sbatch and neox_multinode.sbatch: hostfile, rendezvous, NCCL, launch, requeue.
# Source it inside a SLURM job, then:  neox_launch [-d CONF_DIR] CONFIG.yml [CONFIG.yml ...]
#
# Variables you may set before sourcing (all optional; docs/cluster.md explains each):
#   NEOX_ROOT          the neox checkout (default: the directory sbatch was run from)
#   NEOX_PYTHON        python of the environment that has neox installed (default: python3)
#   NEOX_LAUNCH        auto | hostfile | srun   (auto: srun when the config sets deepspeed_slurm: true)
#   NEOX_RUN_DIR       shared directory for this job's hostfile, config fragment, STOP file, events.log
#   NEOX_TRAIN_SCRIPT  the per-rank entry point (default: train.py)
#   NEOX_SLOTS         ranks per node (default: GPUs per node from SLURM, else tasks per node, else 1)
#   NEOX_MASTER_ADDR   rendezvous host (default: the job's first node)
#   NEOX_MASTER_PORT   rendezvous port (default: 20000 + job id mod 12000)
#   NEOX_MAX_REQUEUES  stop requeueing after this many restarts (default: 50)
#   NEOX_RESUME        0: never turn a config's load/finetune into a resume from save/latest
#   NEOX_EXPORT_VARS   extra variable names to hand to ranks started over ssh (hostfile path)
#   NEOX_DRY_RUN       set: print deepy.py --dry-run's JSON (config + launch command), start nothing

# ---- NCCL / network. Defaults are safe everywhere; uncomment what your cluster documents. ----------
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"                      # INFO prints topology / transport choices
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a hung rank fails the job
# export NCCL_SOCKET_IFNAME=ib0          # interface for NCCL bootstrap/sockets (e.g. ib0, eth0, ^lo,docker0)
# export GLOO_SOCKET_IFNAME=ib0          # the same for gloo (CPU collectives, some barriers)
# export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use (ibv_devinfo lists them)
# export NCCL_IB_DISABLE=1               # no InfiniBand on this cluster: use TCP sockets
# export NCCL_NET_GDR_LEVEL=PHB          # GPUDirect RDMA distance; leave unset unless told otherwise
# export FI_PROVIDER=efa                 # AWS EFA clusters (with the aws-ofi-nccl plugin)

_NEOX_SLURM_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"  # helpers live next to this file
_NEOX_ENV_VARS="PATH LD_LIBRARY_PATH OMP_NUM_THREADS TORCH_NCCL_ASYNC_ERROR_HANDLING GLOO_SOCKET_IFNAME \
CUDA_DEVICE_MAX_CONNECTIONS HF_HOME HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE WANDB_MODE WANDB_DIR TMPDIR"

neox_log() {
    local line
    line="[neox-slurm $(date -u +%Y-%m-%dT%H:%M:%SZ) job ${SLURM_JOB_ID:-?}] $*"
    echo "$line" >&2
    if [[ -n "${NEOX_RUN_DIR:-}" ]]; then echo "$line" >>"$NEOX_RUN_DIR/events.log"; fi
}

# Hosts, MASTER_ADDR/PORT, hostfile (DLTS_HOSTFILE, as GPT-NeoX reads it) and the ranks' env file.
neox_setup() {
    : "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch (see docs/cluster.md)}"
    : "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is unset}"
    NEOX_ROOT="$(cd "${NEOX_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)"
    NEOX_PYTHON="${NEOX_PYTHON:-python3}"
    NEOX_TRAIN_SCRIPT="${NEOX_TRAIN_SCRIPT:-train.py}"
    NEOX_RUN_DIR="${NEOX_RUN_DIR:-$NEOX_ROOT/runs/slurm/${SLURM_JOB_NAME:-neox}-$SLURM_JOB_ID}"
    mkdir -p "$NEOX_RUN_DIR"
    NEOX_RUN_DIR="$(cd "$NEOX_RUN_DIR" && pwd)"
    local helper="$_NEOX_SLURM_DIR/make_hostfile.py"
    export DLTS_HOSTFILE="$NEOX_RUN_DIR/hostfile"
    "$NEOX_PYTHON" "$helper" --output "$DLTS_HOSTFILE" || return 2
    # Computed, not inherited: sbatch copies the submitting shell's environment into the job.
    MASTER_ADDR="${NEOX_MASTER_ADDR:-$("$NEOX_PYTHON" "$helper" --print master_addr)}" || return 2
    MASTER_PORT="${NEOX_MASTER_PORT:-$("$NEOX_PYTHON" "$helper" --print master_port)}" || return 2
    NEOX_NUM_NODES="$(grep -c . "$DLTS_HOSTFILE")"
    NEOX_SLOTS="$(head -n1 "$DLTS_HOSTFILE" | sed 's/.*slots=//')"
    export MASTER_ADDR MASTER_PORT
    # srun no longer inherits sbatch's --cpus-per-task (Slurm >= 22.05): without this, each srun rank
    # gets one CPU and data loading / host-side work crawl.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"; fi
    # Ranks started over ssh (hostfile path) get a fresh login environment; DeepSpeed's runner
    # exports NCCL_*/PYTHON* itself and everything listed in the file named by DS_ENV_FILE.
    # DeepSpeed reads only this file while DS_ENV_FILE names it, so the user's own files come first.
    export DS_ENV_FILE="$NEOX_RUN_DIR/deepspeed_env"
    cat "$HOME/.deepspeed_env" "$NEOX_ROOT/.deepspeed_env" 2>/dev/null | grep '=' >"$DS_ENV_FILE"
    local name
    for name in $_NEOX_ENV_VARS ${NEOX_EXPORT_VARS:-}; do
        if [[ -n "${!name:-}" ]]; then echo "$name=${!name}" >>"$DS_ENV_FILE"; fi
    done
    neox_log "start: restart ${SLURM_RESTART_COUNT:-0}, $NEOX_NUM_NODES node(s) x $NEOX_SLOTS rank(s):" \
        "$(tr '\n' ' ' <"$DLTS_HOSTFILE")master $MASTER_ADDR:$MASTER_PORT, run dir $NEOX_RUN_DIR"
}

# SLURM's warning (--signal=B:USR1@120) or SIGTERM: ask every rank to save and stop at the next
# iteration boundary. The STOP file reaches ranks on every node, however they were started.
neox_on_signal() {
    _NEOX_INTERRUPTED=1
    if [[ "$1" == USR1 ]]; then _NEOX_REQUEUE=1; fi
    neox_log "got SIG$1: asking ranks to save and stop (touch $NEOX_KILL_SWITCH)"
    touch "$NEOX_KILL_SWITCH"
}

# Wait for the launcher while letting signal traps run (bash runs a trap only between commands).
_neox_wait() {
    local pid=$1 rc
    while :; do
        _NEOX_INTERRUPTED=0
        wait "$pid"
        rc=$?
        if [[ $_NEOX_INTERRUPTED == 0 ]]; then return "$rc"; fi
    done
}

_neox_requeue() {
    local restarts="${SLURM_RESTART_COUNT:-0}" limit="${NEOX_MAX_REQUEUES:-50}"
    if ((restarts >= limit)); then
        neox_log "not requeueing: already restarted $restarts times (NEOX_MAX_REQUEUES=$limit)"
        return 1
    fi
    neox_log "saved after the time-limit warning; requeueing job $SLURM_JOB_ID (resumes from ${NEOX_SAVE:-save}/latest)"
    scontrol requeue "$SLURM_JOB_ID"
}

neox_launch() {
    neox_setup || return 2
    cd "$NEOX_ROOT" || return 2  # relative config paths are relative to the checkout, as for deepy.py
    local plan
    plan="$("$NEOX_PYTHON" "$_NEOX_SLURM_DIR/job_config.py" --run-dir "$NEOX_RUN_DIR" \
        --hostfile "$DLTS_HOSTFILE" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
        --slots "$NEOX_SLOTS" --num-nodes "$NEOX_NUM_NODES" "$@")" || {
        neox_log "could not read the config: see the error above"
        return 2
    }
    eval "$plan"
    rm -f "$NEOX_KILL_SWITCH"  # a STOP left by the previous (requeued) run would end this one at once
    _NEOX_REQUEUE=0
    trap 'neox_on_signal USR1' USR1
    trap 'neox_on_signal TERM' TERM
    local cmd=("$NEOX_PYTHON" deepy.py "$NEOX_TRAIN_SCRIPT" "${NEOX_DEEPY_ARGS[@]}")
    if [[ -n "${NEOX_DRY_RUN:-}" ]]; then  # print the resolved config and launch command only
        cmd=("$NEOX_PYTHON" deepy.py --dry-run "$NEOX_TRAIN_SCRIPT" "${NEOX_DEEPY_ARGS[@]}")
    fi
    neox_log "launch ($NEOX_MODE): ${cmd[*]}"
    "${cmd[@]}" &
    local rc=0
    _neox_wait $! || rc=$?
    trap - USR1 TERM
    neox_log "training exited with code $rc"
    if [[ $_NEOX_REQUEUE == 1 && $rc == 0 ]]; then
        _neox_requeue && return 0
    elif [[ $_NEOX_REQUEUE == 1 ]]; then
        neox_log "not requeueing: training failed after the warning (exit $rc); fix it and resubmit"
    fi
    return "$rc"
}
