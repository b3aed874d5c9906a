//! The one locking helper shared by the signal registry, the cleanup list and
//! [`Shutdown`](crate::Shutdown): a poisoned mutex is still used.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if another thread panicked while holding
/// it: cleanup and shutdown must still run after a panic elsewhere, and the
/// data they guard (flags, a list of entries) stays valid across one.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
