//! Token embedding lookup.

use crate::KernelError;

/// Gather rows of `table` ([vocab, hidden]) for each id into `out` ([ids.len(), hidden]).
pub fn embedding(
    table: &[f32],
    hidden: usize,
    ids: &[u32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    let vocab = table.len() / hidden;
    for (row, &id) in out.chunks_exact_mut(hidden).zip(ids) {
        let id = id as usize;
        if id >= vocab {
            return Err(KernelError::Index(format!(
                "token id {id} is outside the vocabulary of {vocab} tokens"
            )));
        }
        row.copy_from_slice(&table[id * hidden..(id + 1) * hidden]);
    }
    Ok(())
}
