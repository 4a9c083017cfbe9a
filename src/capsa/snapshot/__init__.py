"""Snapshots: the on-disk store, QEMUs migration stream, and writing a running VMs memory."""
