"""Under pytest-xdist (scripts/test.sh runs two workers) each worker gets its own MASTER_PORT: the tests that
initialise torch.distributed in the test process, and the one-rank command lines they start, would otherwise
all bind megatron's default 29500. Ranks started by tests.dist_utils get a free port of their own anyway."""

import os

if os.environ.get("PYTEST_XDIST_WORKER") and "MASTER_PORT" not in os.environ:
    from mindspeed_dsv.platform.spawn import free_port

    os.environ["MASTER_PORT"] = str(free_port())
