"""Test-only: accelerate 1.15 enables FSDP only for GPU-like processes (AcceleratorState leaves CPU processes as
MULTI_CPU = DDP, silently). After the state is built as MULTI_CPU over gloo, switch it to FSDP with the plugin accelerate
built from the launch config, so FSDP2 can be tested on CPU ranks. Needs ACCELERATE_USE_CPU=true and
ACCELERATE_USE_FSDP=true (the latter set by `accelerate launch` with an FSDP config)."""

import os

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_original_init = AcceleratorState.__init__


def _init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()


AcceleratorState.__init__ = _init
