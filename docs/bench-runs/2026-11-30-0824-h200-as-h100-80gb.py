# Run a mistral-qlora command on the H200 as if it had an H100 80GB's memory: `auto` plans with an
# H100's budget, and PyTorch's allocator may take no more than an H100 leaves after its context.
import atexit, sys
import torch
H100_TOTAL = 81559 * 2**20  # nvidia-smi's total on an H100 80GB HBM3 (79.65 GiB)
CONTEXT = int(0.75 * 2**30)  # CUDA context and libraries, outside PyTorch's allocator
total = torch.cuda.get_device_properties(0).total_memory
torch.cuda.set_per_process_memory_fraction((H100_TOTAL - CONTEXT) / total)
from mistral_qlora import distributed
distributed.gpu_budget = lambda device_index=0: H100_TOTAL - max(2**30, int(0.08 * H100_TOTAL))
atexit.register(lambda: print(f"h100cap: allocator cap {(H100_TOTAL - CONTEXT) / 2**30:.2f} GiB; peak allocated "
                              f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, peak reserved "
                              f"{torch.cuda.max_memory_reserved() / 2**30:.2f} GiB", flush=True))
from mistral_qlora.cli import main
main(sys.argv[1:])
