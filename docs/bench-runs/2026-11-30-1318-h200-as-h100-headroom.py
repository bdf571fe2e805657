# Run a mistral-qlora command on the H200 as if it had an H100 80GB's memory: `auto` plans with an
# H100's budget, and PyTorch's allocator may take no more than an H100 leaves after its context.
# FAST_PATH_HEADROOM=<share> in the environment sets auto's head-room for the fast path's estimate
# (the A/B of the old 10% against the new 4%).
import atexit, os, sys
import torch
H100_TOTAL = 81559 * 2**20  # nvidia-smi's total on an H100 80GB HBM3 (79.65 GiB)
CONTEXT = int(0.75 * 2**30)  # CUDA context and libraries, outside PyTorch's allocator
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction((H100_TOTAL - CONTEXT) / total)
from mistral_qlora import distributed
from mistral_qlora.modeling import speed
distributed.gpu_budget = lambda device_index=0: H100_TOTAL - max(2**30, int(0.08 * H100_TOTAL))
if os.environ.get("FAST_PATH_HEADROOM"):
    speed.FAST_PATH_HEADROOM = float(os.environ["FAST_PATH_HEADROOM"])
atexit.register(lambda: print(f"h100cap: head-room {speed.FAST_PATH_HEADROOM:.0%}; allocator cap "
                              f"{(H100_TOTAL - CONTEXT) / 2**30:.2f} GiB; peak allocated "
                              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, peak reserved "
                              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB", flush=True))
from mistral_qlora.cli import main
main(sys.argv[1:])
