"""Which of our kernels may start before the kernel ahead of them ends (programmatic dependent launch).

A kernel in DEPENDENT_KERNELS calls `wait_for_earlier_kernels()` before it reads anything an
earlier kernel may write, and before it writes anything; before the wait it only loads constants
(weights). So when a captured graph's edge into it is made programmatic (runtime/forward/dependent_launch.py),
its launch and first weight loads overlap the tail of the kernel ahead, and the wait still orders
every access that matters. Launched the usual way, the wait returns at once.

The instructions exist from sm_90 (Hopper) on, and the Triton interpreter has none, hence
`enabled`, a compile-time flag of each such kernel. The build records DEPENDENT_KERNELS in the
manifest of an artifact whose kernels have the wait; the runtime links only those.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# kernel names (a compiled one may carry a suffix)
DEPENDENT_KERNELS = ("_small_linear_kernel", "_fp8_rows_kernel", "_fp8_tiles_kernel")


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def wait_for_earlier_kernels():
    """Wait until the kernels this one depends on have finished and their writes are visible,
    then let the kernels that depend on this one launch. Returns 0, which the caller adds to the
    address of every input an earlier kernel writes: that data dependence is what keeps those
    loads, and so every store computed from them, after the wait.

    Triton's own gdc_wait is inline assembly marked impure, which torch 2.11's analysis of what
    a kernel writes refuses: it then assumes every argument is written and the export returns the
    weights as outputs. Marked pure, with the dependence above, both torch 2.11 and 2.13 see it."""
    # one line: Inductor copies this source into the file it compiles, where an escaped newline broke the string
    return tl.inline_asm_elementwise("griddepcontrol.wait; griddepcontrol.launch_dependents; mov.u32 $0, 0;",
                                     "=r", [], dtype=tl.int32, is_pure=True, pack=1)
