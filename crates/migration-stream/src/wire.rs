//! Big-endian primitives and capped reads shared by every decoder.
//!
//! Every multi-byte integer of the format is big-endian (network order).
//! Blobs are read in [`READ_CHUNK`] steps after their declared length has
//! been checked against its cap, so memory only grows as bytes arrive.

use std::io::{self, Read, Write};

use crate::error::{Error, Result};
use crate::limits::READ_CHUNK;

/// Maps an I/O error of a read to [`Error::Truncated`] or [`Error::Io`].
pub(crate) fn read_err(what: &'static str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::Truncated { what }
    } else {
        Error::Io {
            context: what,
            source: e,
        }
    }
}

/// Maps an I/O error of a write to [`Error::Io`].
pub(crate) fn write_err(context: &'static str) -> impl Fn(io::Error) -> Error + Copy {
    move |source| Error::Io { context, source }
}

pub(crate) fn read_array<const N: usize, R: Read + ?Sized>(
    r: &mut R,
    what: &'static str,
) -> Result<[u8; N]> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf).map_err(|e| read_err(what, e))?;
    Ok(buf)
}

pub(crate) fn read_u8<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<u8> {
    Ok(read_array::<1, R>(r, what)?[0])
}

pub(crate) fn read_u16<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<u16> {
    Ok(u16::from_be_bytes(read_array(r, what)?))
}

pub(crate) fn read_u32<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<u32> {
    Ok(u32::from_be_bytes(read_array(r, what)?))
}

pub(crate) fn read_u64<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<u64> {
    Ok(u64::from_be_bytes(read_array(r, what)?))
}

/// Reads the first byte of a frame: `Ok(None)` on a clean end of stream.
pub(crate) fn read_tag<R: Read + ?Sized>(r: &mut R, what: &'static str) -> Result<Option<u8>> {
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b[0])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(what, e)),
        }
    }
}

/// Checks `len <= max`, returning [`Error::TooLong`] otherwise.
pub(crate) fn check_cap(what: &'static str, len: u64, max: u64) -> Result<()> {
    if len > max {
        Err(Error::TooLong { what, len, max })
    } else {
        Ok(())
    }
}

/// Reads exactly `len` bytes after checking `len <= max`; the buffer grows in
/// [`READ_CHUNK`] steps as the bytes arrive.
pub(crate) fn read_blob<R: Read + ?Sized>(
    r: &mut R,
    len: u64,
    max: u64,
    what: &'static str,
) -> Result<Vec<u8>> {
    check_cap(what, len, max)?;
    // `len <= max`, and every cap fits comfortably in usize on the 64-bit
    // hosts this crate targets; fall back to an error rather than truncate.
    let len = usize::try_from(len).map_err(|_| Error::TooLong {
        what,
        len,
        max: usize::MAX as u64,
    })?;
    let mut buf = Vec::with_capacity(len.min(READ_CHUNK));
    while buf.len() < len {
        let start = buf.len();
        let end = start + (len - start).min(READ_CHUNK);
        buf.resize(end, 0);
        track_alloc(buf.capacity());
        r.read_exact(&mut buf[start..end])
            .map_err(|e| read_err(what, e))?;
    }
    Ok(buf)
}

/// Reads a length-checked UTF-8 name.
pub(crate) fn read_name<R: Read + ?Sized>(
    r: &mut R,
    len: usize,
    max: usize,
    what: &'static str,
) -> Result<String> {
    if len == 0 {
        return Err(Error::InvalidName {
            what,
            reason: "empty",
        });
    }
    if len > max {
        return Err(Error::InvalidName {
            what,
            reason: "too long",
        });
    }
    let mut buf = vec![0u8; len];
    track_alloc(len);
    r.read_exact(&mut buf).map_err(|e| read_err(what, e))?;
    String::from_utf8(buf).map_err(|_| Error::InvalidName {
        what,
        reason: "not UTF-8",
    })
}

/// Checks a name before encoding it.
pub(crate) fn check_name(name: &str, max: usize, what: &'static str) -> Result<()> {
    if name.is_empty() {
        Err(Error::InvalidName {
            what,
            reason: "empty",
        })
    } else if name.len() > max {
        Err(Error::InvalidName {
            what,
            reason: "too long",
        })
    } else {
        Ok(())
    }
}

/// A reader that counts the bytes it has passed on.
#[derive(Debug)]
pub(crate) struct Counted<R> {
    pub(crate) inner: R,
    pub(crate) count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that counts the bytes it has accepted.
#[derive(Debug)]
pub(crate) struct CountedWriter<W> {
    pub(crate) inner: W,
    pub(crate) count: u64,
}

impl<W: Write> Write for CountedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
thread_local! {
    static MAX_ALLOC: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Records, in test builds, the largest buffer a decoder has sized from
/// peer-supplied lengths; the hostile-input tests assert it stays
/// proportional to the input.
#[inline]
pub(crate) fn track_alloc(_bytes: usize) {
    #[cfg(test)]
    MAX_ALLOC.with(|m| m.set(m.get().max(_bytes)));
}

/// Resets and returns the tracked maximum (test builds only).
#[cfg(test)]
pub(crate) fn take_max_alloc() -> usize {
    MAX_ALLOC.with(|m| m.replace(0))
}

/// Pushes onto a vector whose final length came from the peer, tracking
/// the memory it grows to.
pub(crate) fn push_tracked<T>(v: &mut Vec<T>, item: T) {
    v.push(item);
    track_alloc(v.capacity() * std::mem::size_of::<T>());
}
