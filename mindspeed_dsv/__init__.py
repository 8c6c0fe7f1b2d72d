"""mindspeed_dsv: DeepSeek-V3-class MoE training on Megatron-Core for Ascend NPU, NVIDIA GPU and CPU."""

import warnings

# We run megatron-core without Transformer Engine and Apex on purpose (platform/megatron_compat.py says how);
# its import-time warnings about their absence would otherwise open every log.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed.*", category=UserWarning)
