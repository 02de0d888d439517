//! Taking a `std` lock, whatever a panicked holder left behind.
//!
//! Every lock in seaport-net guards state that stays consistent between
//! calls (a state machine, a map, a count): a holder that panicked left no
//! half-done change, so a poisoned lock is taken as it is rather than
//! spreading the panic to every task that touches it. No lock here is held
//! across an await.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, recovering from a panicked holder.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Reads `l`, recovering from a panicked writer.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Writes `l`, recovering from a panicked holder.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}
