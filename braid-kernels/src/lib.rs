//! Braid's compute layer: dtypes, devices, tensors and every op the models need, with a CPU
//! reference (`cpu`) and CUDA kernels (`cuda`).

pub mod cpu;
pub mod cuda;
mod device;
mod dtype;
mod tensor;

pub use device::Device;
pub use dtype::DType;
pub use tensor::Tensor;

/// A bad argument to an op: one sentence naming what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Index(String),
}
