"""Raw VMs: configuration, builder, handle and lifecycle states."""

from capsa.vm.builder import VMBuilder, vm
from capsa.vm.config import DiskSpec, VMConfig
from capsa.vm.handle import VM
from capsa.vm.runstate import RunState

__all__ = ["VM", "DiskSpec", "RunState", "VMBuilder", "VMConfig", "vm"]
