import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run under Triton's interpreter on CPU; the switch must be set before triton is
# first imported (it decides how triton's own library functions are made)
os.environ.setdefault("TRITON_INTERPRET", "1")
