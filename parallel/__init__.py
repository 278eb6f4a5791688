"""dsv4.parallel: process groups (state.py), the parallel layers (layers.py: the one place choosing layer
implementations), autograd collectives (mappings.py), vocab-parallel cross entropy, and the CPU compatibility
layer for megatron-core (cpu_compat.py, active only without CUDA)."""
