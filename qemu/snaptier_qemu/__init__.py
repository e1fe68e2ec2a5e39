"""The QEMU launch backend: MachineSpec -> qemu-system-x86_64 command line, and process control."""
