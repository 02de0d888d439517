//! Counted shares of something scarce (relays, connections that have not
//! spoken yet, admin HTTP connections): at most `max` in all and `per_key`
//! for one key, a source address say. Each share is a guard that gives its
//! place back when dropped, so every exit path, a panicked task included,
//! returns it.
//!
//! Invariant: the counts never exceed their caps, and a key's entry exists
//! only while it holds a share (the map is bounded by the shares).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use crate::lock::lock;

/// The caps and what is held against them.
#[derive(Debug)]
pub struct Limit<K> {
    max: usize,
    per_key: usize,
    held: Mutex<(usize, HashMap<K, usize>)>,
}

/// One place; given back on drop.
#[derive(Debug)]
pub struct Share<K: Hash + Eq + Copy> {
    limit: Arc<Limit<K>>,
    key: K,
}

/// Why no share was given: which cap, with the count that reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// `max` are held in all.
    All(usize),
    /// `per_key` are held for this key.
    Key(usize),
}

impl<K: Hash + Eq + Copy> Limit<K> {
    /// At most `max` shares in all and `per_key` for one key.
    pub fn new(max: usize, per_key: usize) -> Arc<Limit<K>> {
        Arc::new(Limit { max, per_key, held: Mutex::new((0, HashMap::new())) })
    }

    /// A share for `key`, if both caps allow one.
    pub fn take(self: &Arc<Self>, key: K) -> Result<Share<K>, Over> {
        let mut held = lock(&self.held);
        let (all, per) = &mut *held;
        if *all >= self.max {
            return Err(Over::All(*all));
        }
        let mine = per.entry(key).or_default();
        if *mine >= self.per_key {
            return Err(Over::Key(*mine));
        }
        *mine += 1;
        *all += 1;
        Ok(Share { limit: self.clone(), key })
    }
}

impl<K: Hash + Eq + Copy> Drop for Share<K> {
    fn drop(&mut self) {
        let mut held = lock(&self.limit.held);
        let (all, per) = &mut *held;
        *all = all.saturating_sub(1);
        if let Some(mine) = per.get_mut(&self.key) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                per.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_capped_in_all_and_per_key_and_come_back_on_drop() {
        let limit = Limit::new(3, 2);
        let a1 = limit.take('a').unwrap();
        let _a2 = limit.take('a').unwrap();
        assert_eq!(limit.take('a').unwrap_err(), Over::Key(2));
        let _b = limit.take('b').unwrap();
        assert_eq!(limit.take('c').unwrap_err(), Over::All(3));
        drop(a1);
        let _a3 = limit.take('a').unwrap();
        drop((_a2, _a3, _b));
        assert_eq!(lock(&limit.held).0, 0);
        assert!(lock(&limit.held).1.is_empty(), "no entry outlives its shares");
    }
}
