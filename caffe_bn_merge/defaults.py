"""Constants shared by the command line, batch, verification and reports; importing this module
loads nothing else (so `merge-bn --help` needs no numpy)."""

DEFAULT_TOLERANCE = 1e-4  # largest relative error a verified output may have
EXIT_VERIFY_FAILED = 3  # exit status when the merged model fails verification
TABLE_WIDTH = 100  # columns of the tables merge-bn and merge-bn batch print
BENCHMARK_ROUNDS = 20  # interleaved rounds of --benchmark without a number
