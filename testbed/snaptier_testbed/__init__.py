"""snaptier testbed: topology file -> machine descriptions -> a launch backend (QEMU today)."""
