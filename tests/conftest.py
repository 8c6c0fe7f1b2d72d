"""Under pytest-xdist (scripts/test.sh runs two workers) each worker gets its own MASTER_PORT for the tests that
initialise torch.distributed in the test process: otherwise both workers would bind megatron's default 29500.

It is set once collection is over, as init_distributed's setdefault sets 29500 in a serial run: the module-level
environments that example tests capture at import (and pass to the command lines they start) stay without it,
and a command started later inherits the worker's port as it would inherit 29500. Ranks started by
tests.dist_utils get a free port of their own anyway."""

import os


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER") and "MASTER_PORT" not in os.environ:
        from mindspeed_dsv.platform.spawn import free_port

        os.environ["MASTER_PORT"] = str(free_port())
