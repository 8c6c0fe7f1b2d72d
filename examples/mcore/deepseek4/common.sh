# Shared helpers of the DeepSeek-V4 example scripts: the DeepSeek-V3 scripts' helpers (../deepseek3/common.sh:
# --dry-run, --layout, input checks, layout loader, launchers), with this directory's layouts/. Sourced, never run.
# shellcheck disable=SC1091
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../deepseek3" && pwd)/common.sh"
