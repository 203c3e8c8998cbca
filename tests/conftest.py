"""Settings for the whole test suite.

llama.cpp's worker threads spin at their barriers: with more threads than
free cores (another process busy on this 2-core machine), decoding can stall
from ~85 to under 1 token/s. The tests therefore run the model on one thread,
which a busy machine slows down in proportion instead. Every process the
tests start inherits this; speed is measured by the benchmarks, not here.
"""

import os

os.environ.setdefault("N_THREADS", "1")
