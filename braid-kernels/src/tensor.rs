//! A dense, row-major f32 tensor in host memory: the unit weights are loaded into and the CPU computes on.

use crate::KernelError;

#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor over `data`, which must hold exactly the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self, KernelError> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(KernelError::Shape(format!(
                "shape {shape:?} needs {numel} elements but {} were given",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}
