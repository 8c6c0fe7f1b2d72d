# NVIDIA GPU environment of the GPU templates. Sourced by them; every value can be overridden.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}        # NVLink multicast off
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
DSV_DEVICE=${DSV_DEVICE:-cuda}   # the device --dry-run resolves the kernel flags for
