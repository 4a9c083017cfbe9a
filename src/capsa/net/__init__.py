"""The virtual network: policy engine now; the userspace NAT datapath follows (see the network issue)."""
