//! Braid's compute layer: dtypes, tensors and every op the models need, with a CPU reference and CUDA kernels.

pub mod cuda;
