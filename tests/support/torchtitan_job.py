"""torchtitan 0.3.0's own Trainer on CPU/gloo, checkpointing through ShardckptCheckpointManager.

Run under torchrun from tests/integrations/test_torchtitan.py:

    torchrun --nproc_per_node 2 tests/support/torchtitan_job.py --module torchtitan_job \
        --config debugmodel_cpu --dump_folder OUT --hf_assets_path TOK --dataloader.dataset_path DATA

torchtitan 0.3.0 targets accelerators; its CPU path fails as shipped, each for a reason
``cpu_shim`` works around (before torchtitan is imported):

1. ``import torchtitan.trainer`` needs triton (``ModuleNotFoundError: No module named
   'triton'``): .ci/torchtitan installs the wheel, it imports without a GPU.
2. ``torchtitan.tools.utils.get_device_info`` falls back to "cuda" when no accelerator
   is found (``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'`` in
   ``Trainer.__init__``); the shim makes torch report "cpu", and gives ``torch.cpu`` the
   memory-stat calls torchtitan's ``DeviceMemoryMonitor`` makes (``get_device_name``...).
3. FSDP2 reduce-scatters with ``ReduceOp.PREMUL_SUM`` once torchtitan sets the gradient
   divide factor (``RuntimeError: Cannot use ReduceOp.PREMUL_SUM with Gloo``): the shim
   also forces FSDP's sum reduction (FSDP divides afterwards).
4. ``set_pg_timeouts`` after step 1 calls ``torch.distributed.set_timeout``, which torch
   2.13 lacks (``AttributeError``): skipped (it only lowers the timeout).

The model config (``debugmodel_cpu``) swaps llama3's FlexAttention for SDPA ("FlexAttention
does not support backward on CPU") and uses the ``partial_dtensor`` SPMD backend (the
default ``spmd_types`` rejects FSDP's plain parameters here).

Test hooks (environment): ``TT_LOSSES`` (a file: each rank appends ``rank step loss`` with
the loss's exact ``repr``), ``TT_KILL_AT_STEP`` (every rank SIGKILLs itself right after
logging that step). The test resumes with a second torchrun, not ``--max-restarts``: on
torch 2.13 a restarted round fails in torch's own ``init_process_group`` (``Gloo
connectFullMesh failed ... Connection refused``), static or c10d rendezvous alike.
"""

from __future__ import annotations

import faulthandler
import os
import runpy
import signal
import types
from typing import Any

import torch
import torch._utils
import torch.cpu


def cpu_shim() -> None:
    torch._utils._get_available_device_type = lambda: "cpu"
    cpu: Any = torch.cpu
    cpu.get_device_name = lambda *a: "cpu"
    cpu.get_device_properties = lambda *a: types.SimpleNamespace(total_memory=16 << 30)
    cpu.reset_peak_memory_stats = lambda *a: None
    cpu.memory_stats = lambda *a: {}
    cpu.current_device = lambda: 0
    if not hasattr(cpu, "empty_cache"):
        cpu.empty_cache = lambda: None

    from torch.distributed.fsdp import FSDPModule

    set_divide = FSDPModule.set_gradient_divide_factor

    def divide_by_sum(self: Any, factor: float) -> None:
        set_divide(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    FSDPModule.set_gradient_divide_factor = divide_by_sum  # type: ignore[method-assign]

    import torchtitan.distributed.utils as dist_utils

    dist_utils.set_pg_timeouts = lambda *a, **k: None


def install_test_hooks() -> None:
    from torchtitan.components.metrics import MetricsProcessor

    losses = os.environ.get("TT_LOSSES")
    kill_at = int(os.environ.get("TT_KILL_AT_STEP", "0"))
    log = MetricsProcessor.log

    def record(self: Any, step: int, global_avg_loss: float, *args: Any, **kwargs: Any) -> None:
        log(self, step, global_avg_loss, *args, **kwargs)
        if losses:
            with open(losses, "a") as f:
                f.write(f"{os.environ['RANK']} {step} {global_avg_loss!r}\n")
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    MetricsProcessor.log = record  # type: ignore[method-assign]


def debugmodel_cpu() -> Any:
    """llama3's debug model on CPU, checkpointing through shardckpt every 2 steps."""
    from torchtitan.config import DebugConfig
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    from shardckpt.integrations.torchtitan import ShardckptCheckpointManager

    config = llama3_debugmodel()
    for layer in config.model_spec.model.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config.parallelism.spmd_backend = "partial_dtensor"
    config.validator.enable = False
    config.debug = DebugConfig(seed=7, deterministic=True)
    config.training.seq_len = 32
    config.training.local_batch_size = 2
    config.training.steps = 4
    config.checkpoint = ShardckptCheckpointManager.Config(
        enable=True, interval=2, keep_latest_k=2, last_save_model_only=False
    )
    return config


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <rank pid>` prints its stacks
    cpu_shim()
    install_test_hooks()
    runpy.run_module("torchtitan.train", run_name="__main__")
