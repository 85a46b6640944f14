//! Per-thread pools of scratch buffers for the inference kernels. A forward
//! pass asks for the same few sizes in every block; reusing the allocations
//! avoids zero-filling and page-faulting tens of megabytes per block.
//! A buffer's contents are whatever its last user left: every user must
//! write all of it before reading.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Buffers kept per thread and element type.
const KEEP: usize = 8;

thread_local! {
    static F32: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static U8: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// An element type with a pool.
pub trait Pooled: Copy + Default + 'static {
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R;
}

impl Pooled for f32 {
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<f32>>) -> R) -> R {
        F32.with(|p| f(&mut p.borrow_mut()))
    }
}

impl Pooled for u8 {
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<u8>>) -> R) -> R {
        U8.with(|p| f(&mut p.borrow_mut()))
    }
}

/// A buffer of `len` elements with unspecified contents; returned to this
/// thread's pool when dropped.
pub struct Scratch<T: Pooled> {
    buf: Vec<T>,
}

/// Takes a buffer of `len` elements from the pool (the smallest that fits),
/// or allocates one.
pub fn take<T: Pooled>(len: usize) -> Scratch<T> {
    let mut buf = T::with_pool(|pool| {
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        match best {
            Some(i) => pool.swap_remove(i),
            None => pool.pop().unwrap_or_default(),
        }
    });
    buf.resize(len, T::default());
    buf.truncate(len);
    Scratch { buf }
}

impl<T: Pooled> Drop for Scratch<T> {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        T::with_pool(|pool| {
            if pool.len() < KEEP {
                pool.push(buf);
            }
        });
    }
}

impl<T: Pooled> Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf
    }
}

impl<T: Pooled> DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let ptr = {
            let mut a = take::<f32>(1000);
            a[999] = 1.0;
            a.as_ptr()
        };
        let b = take::<f32>(500);
        assert_eq!(b.len(), 500);
        assert_eq!(b.as_ptr(), ptr, "the freed buffer is handed out again");
        let c = take::<f32>(2000);
        assert_eq!(c.len(), 2000);
    }
}
