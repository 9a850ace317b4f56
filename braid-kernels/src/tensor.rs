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

    pub fn zeros(shape: Vec<usize>) -> Self {
        let numel = shape.iter().product();
        Tensor { shape, data: vec![0.0; numel] }
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

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// The (rows, cols) of a 2-D tensor.
    pub fn dims2(&self) -> Result<(usize, usize), KernelError> {
        match self.shape[..] {
            [r, c] => Ok((r, c)),
            _ => Err(KernelError::Shape(format!("expected a 2-D tensor, got shape {:?}", self.shape))),
        }
    }

    /// Stack 2-D tensors with equal column counts along their rows (e.g. Q, K and V into one QKV weight).
    pub fn concat_rows(parts: &[&Tensor]) -> Result<Tensor, KernelError> {
        let cols = match parts.first() {
            Some(t) => t.dims2()?.1,
            None => return Err(KernelError::Shape("cannot concatenate zero tensors".into())),
        };
        let mut rows = 0;
        let mut data = Vec::new();
        for t in parts {
            let (r, c) = t.dims2()?;
            if c != cols {
                return Err(KernelError::Shape(format!(
                    "cannot stack a tensor of {c} columns under one of {cols}"
                )));
            }
            rows += r;
            data.extend_from_slice(&t.data);
        }
        Tensor::new(vec![rows, cols], data)
    }
}
