//! The encoding of the KVM state sections.
//!
//! Every section's data is little-endian. Integers are written with
//! [`Writer`] and read back with [`Reader`], which refuses short data and
//! trailing bytes with [`StateError::Malformed`] naming the section. A
//! kvm-bindings struct (`kvm_regs`, `kvm_lapic_state`, ...) is written as its
//! bytes in the kernel's x86_64 layout, which is little-endian: zerocopy's
//! derives (kvm-bindings' `serde` feature) prove that the struct has no
//! padding and that any bytes make a valid value, and each file that encodes
//! one asserts its size at compile time, so a kvm-bindings update that
//! changed a layout stops the build instead of the stream.

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::session::StateError;

/// Builds a section's data.
#[derive(Debug, Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    /// An empty buffer.
    pub(crate) fn new() -> Self {
        Writer(Vec::new())
    }

    /// Appends a `u32`, little-endian.
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends raw bytes.
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// Appends a kvm-bindings struct as its bytes.
    pub(crate) fn raw<T: IntoBytes + Immutable>(&mut self, v: &T) -> &mut Self {
        self.0.extend_from_slice(v.as_bytes());
        self
    }

    /// The data.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Reads a section's data, naming the section in its errors.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    what: &'a str,
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `data`, the section `what`.
    pub(crate) fn new(what: &'a str, data: &'a [u8]) -> Self {
        Reader { what, data, pos: 0 }
    }

    /// A [`StateError::Malformed`] for this section.
    pub(crate) fn malformed(&self, why: impl Into<String>) -> StateError {
        StateError::malformed(self.what, why)
    }

    /// The next `n` bytes.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                self.malformed(format!(
                    "{} bytes, expected at least {}",
                    self.data.len(),
                    self.pos.saturating_add(n)
                ))
            })?;
        let b = &self.data[self.pos..end];
        self.pos = end;
        Ok(b)
    }

    /// The next `u32`.
    pub(crate) fn u32(&mut self) -> Result<u32, StateError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.bytes(4)?);
        Ok(u32::from_le_bytes(a))
    }

    /// The next kvm-bindings struct.
    pub(crate) fn raw<T: FromBytes>(&mut self) -> Result<T, StateError> {
        let b = self.bytes(std::mem::size_of::<T>())?;
        T::read_from_bytes(b).map_err(|_| self.malformed("struct bytes do not fit"))
    }

    /// A count of `elem`-byte elements, checked against the bytes left so a
    /// hostile count cannot make the reader allocate.
    pub(crate) fn count(&mut self, elem: usize, max: usize) -> Result<usize, StateError> {
        let n = usize::try_from(self.u32()?).unwrap_or(usize::MAX);
        let left = self.data.len() - self.pos;
        if n > max || n.saturating_mul(elem) > left {
            return Err(self.malformed(format!(
                "count {n} exceeds the limit {max} or the {left} bytes left"
            )));
        }
        Ok(n)
    }

    /// Fails unless every byte was read.
    /// The whole data as one struct: [`Reader::raw`], then [`Reader::end`].
    pub(crate) fn only<T: FromBytes>(mut self) -> Result<T, StateError> {
        let v = self.raw()?;
        self.end()?;
        Ok(v)
    }

    pub(crate) fn end(&self) -> Result<(), StateError> {
        if self.pos != self.data.len() {
            return Err(self.malformed(format!("{} trailing bytes", self.data.len() - self.pos)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let data = Writer::new().u32(7).bytes(&[1, 2]).finish();
        let mut r = Reader::new("kvm.x", &data);
        assert_eq!(r.u32().unwrap(), 7);
        assert!(r.end().is_err());
        assert_eq!(r.bytes(2).unwrap(), &[1, 2]);
        r.end().unwrap();
        let err = r.u32().unwrap_err();
        assert!(matches!(err, StateError::Malformed { ref what, .. } if what == "kvm.x"));
    }

    #[test]
    fn hostile_count_is_refused() {
        let data = Writer::new().u32(u32::MAX).finish();
        assert!(Reader::new("kvm.x", &data).count(16, 1 << 20).is_err());
        let data = Writer::new().u32(2).bytes(&[0; 32]).finish();
        assert_eq!(Reader::new("kvm.x", &data).count(16, 4).unwrap(), 2);
    }
}
