"""Suite-wide settings.

The tests run tiny models, for which thread start-up and synchronisation cost more than the arithmetic they
parallelise; on a shared 2-core machine one intra-op thread made small convolutions and attention calls several
times faster (measured up to 40x for the VAE tests under load). Benchmarks set their own thread counts.
"""

import torch

torch.set_num_threads(1)
