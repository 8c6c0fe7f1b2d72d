# Shared helpers of the DeepSeek-V3 example scripts. Sourced, never run. No training logic lives here:
# argument handling (--dry-run, --layout), input checks, the layout-file loader and the launchers.
#
# Every script:   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"; dsv_init "$@"
# Options every script takes:
#   --dry-run        validate every flag (and run `python -m mindspeed_dsv.plan`) instead of launching; same as DRY_RUN=1
#   --layout NAME    use layouts/NAME.sh instead of the script's default layout (same as LAYOUT=NAME)
#   -h, --help       print the script's header comment
#   anything else    appended to the launched command (e.g. --train-iters 10)

# DSV_COMMON_DIR: this file's directory (dry_run.py lives here). DSV_EXAMPLES_DIR: the running script's
# directory (its layouts/, model and env files): examples/mcore/deepseek4/common.sh sources this file too.
DSV_COMMON_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DSV_EXAMPLES_DIR="$(cd "$(dirname "${BASH_SOURCE[-1]}")" && pwd)"
DSV_ROOT="$(cd "${DSV_COMMON_DIR}/../../.." && pwd)"
DSV_SCRIPT="$(basename "${BASH_SOURCE[-1]}")"
DRY_RUN="${DRY_RUN:-0}"
EXTRA_ARGS=()

if [ -z "${PYTHON:-}" ]; then
    if [ -x "${DSV_ROOT}/.venv/bin/python" ]; then PYTHON="${DSV_ROOT}/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONPATH="${DSV_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

dsv_log() { echo "[${DSV_SCRIPT}] $*"; }
dsv_die() { echo "${DSV_SCRIPT}: error: $*" >&2; exit 2; }

# dsv_init "$@": parse the common options; the rest goes to EXTRA_ARGS.
dsv_init() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --dry-run) DRY_RUN=1 ;;
            --layout) [ $# -ge 2 ] || dsv_die "--layout needs a name (see ${DSV_EXAMPLES_DIR}/layouts/)"
                      LAYOUT="$2"; shift ;;
            --layout=*) LAYOUT="${1#--layout=}" ;;
            -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[1]:-$0}"; exit 0 ;;
            *) EXTRA_ARGS+=("$1") ;;
        esac
        shift
    done
}

# Input checks. A real run stops at the first missing input; a dry run only warns (the 671B paths of a
# template do not exist on the machine you plan on).
dsv_missing() {
    if [ "${DRY_RUN}" = "1" ]; then echo "[${DSV_SCRIPT}] dry-run: warning: $*" >&2; else dsv_die "$*"; fi
}
dsv_need_file() { [ -f "$1" ] || dsv_missing "${2:-file} $1 does not exist"; }
dsv_need_dir()  { [ -d "$1" ] || dsv_missing "${2:-directory} $1 does not exist"; }
dsv_need_tokenizer() {
    if [ ! -f "$1/tokenizer.json" ] && [ ! -f "$1/tokenizer.model" ]; then
        dsv_missing "tokenizer: neither $1/tokenizer.json nor $1/tokenizer.model exists"; return
    fi
    [ -f "$1/tokenizer_config.json" ] || dsv_missing "tokenizer: $1/tokenizer_config.json does not exist"
}
dsv_need_hf_checkpoint() {
    dsv_need_file "$1/config.json" "HF checkpoint: config"
    compgen -G "$1/*.safetensors" > /dev/null || dsv_missing "HF checkpoint: no *.safetensors in $1"
}
dsv_need_mcore_checkpoint() {
    [ -f "$1/layout.json" ] || dsv_missing "Megatron checkpoint $1 has no layout.json (write it with ckpt_convert hf2mcore or training)"
    [ -f "$1/latest_checkpointed_iteration.txt" ] || dsv_missing "Megatron checkpoint $1 has no latest_checkpointed_iteration.txt"
}
# dsv_need_dataset PREFIX pretrain|instruction
dsv_need_dataset() {
    local names=("$1")
    [ "$2" = "instruction" ] && names=("$1_packed_input_ids_document" "$1_packed_labels_document" "$1_packed_attention_mask_document")
    local n
    for n in "${names[@]}"; do
        { [ -f "$n.bin" ] && [ -f "$n.idx" ]; } || { dsv_missing "dataset $n.bin/.idx does not exist (run the data_convert script)"; return; }
    done
}

# dsv_source_layout NAME: load layouts/NAME.sh. It defines LAYOUT_ARGS (training flag names) and may define
# LORA_ARGS, HF2MCORE_ARGS (extra hf2mcore flags, e.g. --allow-unused-weights where the layout drops MTP),
# LAYOUT_NNODES, LAYOUT_DEVICES_PER_NODE and LAYOUT_DEVICE_MEMORY_GB.
dsv_source_layout() {
    local f="${DSV_EXAMPLES_DIR}/layouts/$1.sh"
    [ -f "$f" ] || dsv_die "layout '$1': $f does not exist; available: $(cd "${DSV_EXAMPLES_DIR}/layouts" && ls *.sh | sed 's/\.sh$//' | tr '\n' ' ')"
    LAYOUT_ARGS=(); LORA_ARGS=(); HF2MCORE_ARGS=()
    # shellcheck disable=SC1090
    source "$f"
    [ "${#LAYOUT_ARGS[@]}" -gt 0 ] || dsv_die "layout file $f defines no LAYOUT_ARGS"
    dsv_log "layout ${1}: ${LAYOUT_ARGS[*]} ${LORA_ARGS[*]}"
}

# dsv_convert_layout_args target|source: LAYOUT_ARGS renamed for ckpt_convert (--tensor-model-parallel-size
# -> --target-tensor-parallel-size ...; every other layout flag has the same name) into CONVERT_LAYOUT_ARGS.
dsv_convert_layout_args() {
    local p="$1" a
    CONVERT_LAYOUT_ARGS=()
    for a in "${LAYOUT_ARGS[@]}"; do
        case "$a" in
            --tensor-model-parallel-size)   CONVERT_LAYOUT_ARGS+=("--${p}-tensor-parallel-size") ;;
            --pipeline-model-parallel-size) CONVERT_LAYOUT_ARGS+=("--${p}-pipeline-parallel-size") ;;
            --expert-model-parallel-size)   CONVERT_LAYOUT_ARGS+=("--${p}-expert-parallel-size") ;;
            *) CONVERT_LAYOUT_ARGS+=("$a") ;;
        esac
    done
}

# dsv_plan MODEL_CONFIG [more plan flags]: the dry-run plan of LAYOUT_ARGS (conversion scripts).
dsv_plan() {
    local cfg="$1"; shift
    echo "+ ${PYTHON} -m mindspeed_dsv.plan --model-config ${cfg} ${LAYOUT_ARGS[*]} $*"
    "${PYTHON}" -m mindspeed_dsv.plan --model-config "${cfg}" "${LAYOUT_ARGS[@]}" "$@"
}

# dsv_run CMD...: print and run a command (print only on a dry run).
dsv_run() {
    echo "+ $*"
    if [ "${DRY_RUN}" = "1" ]; then return 0; fi
    "$@"
}

# dsv_train ENTRY FLAGS...: launch ENTRY (pretrain_gpt.py / posttrain_gpt.py) with torchrun, or on a dry run
# parse and check FLAGS with the trainer's own parser and print the plan of the same flags.
# Uses NNODES, NODE_RANK, DEVICES_PER_NODE, MASTER_ADDR, MASTER_PORT, DEVICE_MEMORY_GB, FALLBACK_MODEL_CONFIG,
# DSV_DEVICE (the device the dry run resolves kernel flags for; set by env_ascend.sh / env_gpu.sh).
dsv_train() {
    local entry="$1"; shift
    local world=$(( NNODES * DEVICES_PER_NODE ))
    if [ "${DRY_RUN}" = "1" ]; then
        dsv_log "dry run: world ${world} (${NNODES} nodes x ${DEVICES_PER_NODE})"
        "${PYTHON}" "${DSV_COMMON_DIR}/dry_run.py" --prog "$(basename "${entry}")" --world-size "${world}" \
            ${DEVICE_MEMORY_GB:+--device-memory-gb "${DEVICE_MEMORY_GB}"} \
            ${FALLBACK_MODEL_CONFIG:+--fallback-model-config "${FALLBACK_MODEL_CONFIG}"} \
            ${DSV_DEVICE:+--device "${DSV_DEVICE}"} -- "$@"
        return $?
    fi
    # The trainer's checks that need no process group, in one process first: a bad flag or input is one line
    # and exit 2 here, not that line followed by torchrun's failure report of every rank.
    WORLD_SIZE="${world}" "${PYTHON}" -m mindspeed_dsv.training.preflight "$(basename "${entry}")" "$@" || return $?
    local torchrun=torchrun
    [ -x "$(dirname "${PYTHON}")/torchrun" ] && torchrun="$(dirname "${PYTHON}")/torchrun"
    local cmd=("${torchrun}" --nnodes "${NNODES}" --node-rank "${NODE_RANK}" --nproc-per-node "${DEVICES_PER_NODE}"
               --master-addr "${MASTER_ADDR}" --master-port "${MASTER_PORT}" "${entry}" "$@")
    echo "+ ${cmd[*]}"
    if [ -n "${LOG_FILE:-}" ]; then
        mkdir -p "$(dirname "${LOG_FILE}")"
        "${cmd[@]}" 2>&1 | tee "${LOG_FILE}"
        return "${PIPESTATUS[0]}"
    fi
    "${cmd[@]}"
}
