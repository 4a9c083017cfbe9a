"""The QEMU backend: argv building, process ownership, QMP control."""
