# Ascend NPU environment of the A2/A3 templates. Sourced by them; every value can be overridden from the
# caller's environment.
for f in "${ASCEND_TOOLKIT_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}" \
         "${ASCEND_NNAL_SET_ENV:-/usr/local/Ascend/nnal/atb/set_env.sh}"; do
    # shellcheck disable=SC1090
    if [ -f "$f" ]; then source "$f"; fi
done
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # ordered kernel launch for TP/SP overlap
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1800}              # seconds; 512-rank startup is slow
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}
export HCCL_IF_BASE_PORT=${HCCL_IF_BASE_PORT:-64000}                   # HCCL host ports start here
export HCCL_BUFFSIZE=${HCCL_BUFFSIZE:-400}                             # MB per communicator (all-to-all of EP)
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}                       # torch_npu two-level task queue
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}                       # bind each rank to its NUMA cores
export STREAMS_PER_DEVICE=${STREAMS_PER_DEVICE:-32}
DSV_DEVICE=${DSV_DEVICE:-npu}   # the device --dry-run resolves the kernel flags for
