"""Suite-wide settings."""

import torch

# The suite runs training children, Celery workers and uvicorn beside the test process on a 2-core machine;
# a second intra-op thread in the test process then fights them for the cores (measured: the overfit test
# took 5x longer with 2 threads than with 1 on a loaded machine). Subprocesses keep their own defaults.
torch.set_num_threads(1)
