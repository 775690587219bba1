"""How the process runs: device and precision, CPUs and threads, allocator, CPU kernels, torchrun."""
