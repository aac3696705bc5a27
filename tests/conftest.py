import os

import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. Must be set before any
# kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    # bf16 tl.dot is wrong in Triton's interpreter (see the function); spawned workers that run
    # 16-bit kernels call it again (they do not run this conftest)
    from mdn_kernels.mdn.testing import patch_interpreter_bf16_dot
    patch_interpreter_bf16_dot()
