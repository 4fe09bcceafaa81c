"""Constants shared by the command line, batch, verification and reports; importing this module
loads nothing else (so `merge-bn --help` needs no numpy)."""

DEFAULT_TOLERANCE = 1e-4  # largest relative error a verified output may have
EXIT_VERIFY_FAILED = 3  # exit status when the merged model fails verification
TABLE_WIDTH = 100  # columns of the tables when not on a terminal and COLUMNS is not set
BENCHMARK_ROUNDS = 20  # interleaved rounds of --benchmark without a number
BACKENDS = ("auto", "caffe", "opencv", "reference")  # engines --verify can run on (merge-bn and merge-bn batch)
MAX_PROTOTXT_MB = 64  # largest prototxt read (--max-prototxt-mb); real deploy nets are under 1 MB
MAX_INPUT_ELEMENTS = 1 << 25  # largest total of --verify input values (--max-input-elements): 128 MB as float32
