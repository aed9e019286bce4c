//! The in-memory near future of the `wheel` and `heap` triggers.
//!
//! ## Ground rules
//!
//! - The store is the truth; this index is only a list of wake-ups. Anything it holds may be
//!   stale (the timer was cancelled or replaced by another process): the claim in the store
//!   drops such firings. Anything it misses is caught by the backstop sweep. So a bug here can
//!   make a timer late, never fire it twice or early.
//! - `covered_until` is the promise that makes normal operation exact: every stored timer with
//!   `due_at <= covered_until` has been put in the index (by the loader, or by the engine's own
//!   schedule calls). A schedule whose due time is within the covered range is inserted here by
//!   the caller after its store write; the loader publishes the range it is *about* to cover
//!   before it queries, so a schedule that commits during the query is inserted by one or both
//!   (the index keeps the higher generation).
//! - One entry per `(queue, key)`, holding the newest generation seen.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use overdue_core::TimerRef;
use overdue_wheel::{TimerKey, Wheel};

use crate::config::TriggerKind;

/// Handle of an entry in one of the two delay structures.
#[derive(Clone, Copy, Debug)]
enum Handle {
    Wheel(TimerKey),
    Heap(u64),
}

/// A binary-heap delay queue with lazy removal (the JDK `DelayQueue` shape).
#[derive(Debug, Default)]
struct HeapQueue {
    heap: BinaryHeap<Reverse<(i64, u64)>>,
    removed: HashSet<u64>,
}

impl HeapQueue {
    /// Removed entries are purged from the heap once they outnumber live ones by this margin.
    const COMPACT_SLACK: usize = 1024;

    fn remove(&mut self, id: u64) {
        self.removed.insert(id);
        if self.removed.len() > self.heap.len() / 2 + Self::COMPACT_SLACK {
            let removed = std::mem::take(&mut self.removed);
            self.heap.retain(|Reverse((_, id))| !removed.contains(id));
        }
    }

    fn pop_due(&mut self, now: i64, out: &mut Vec<u64>) {
        while let Some(Reverse((due, id))) = self.heap.peek().copied() {
            if due > now {
                break;
            }
            self.heap.pop();
            if !self.removed.remove(&id) {
                out.push(id);
            }
        }
    }
}

#[derive(Debug)]
enum Delay {
    Wheel(Wheel<u64>),
    Heap(HeapQueue),
}

#[derive(Debug)]
struct Entry {
    timer: TimerRef,
    handle: Handle,
}

/// The near future in memory. See the module docs.
#[derive(Debug)]
pub(crate) struct MemIndex {
    delay: Delay,
    entries: HashMap<u64, Entry>,
    by_key: HashMap<(String, String), u64>,
    next_id: u64,
    /// Every stored timer due at or before this is in the index (or being loaded).
    pub(crate) covered_until: i64,
    /// Keyset cursor of the loader inside the range it is loading.
    pub(crate) cursor: Option<(i64, String, String)>,
}

impl MemIndex {
    pub(crate) fn new(kind: TriggerKind) -> Self {
        let delay = match kind {
            TriggerKind::Heap => Delay::Heap(HeapQueue::default()),
            _ => Delay::Wheel(Wheel::new()),
        };
        MemIndex {
            delay,
            entries: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 0,
            covered_until: i64::MIN,
            cursor: None,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Inserts or replaces the wake-up for `timer`'s identity, keeping the newest generation.
    /// Returns true if the index changed.
    pub(crate) fn upsert(&mut self, timer: TimerRef) -> bool {
        let ident = (timer.queue.clone(), timer.key.clone());
        if let Some(&id) = self.by_key.get(&ident) {
            let Some(old) = self.entries.get(&id) else { return false };
            // Newest generation wins; within one generation the later due time wins (a retry
            // re-dates its timer forward, and a loader page read before the retry must not move
            // it back).
            if old.timer.generation > timer.generation
                || (old.timer.generation == timer.generation && old.timer.due_at >= timer.due_at)
            {
                return false;
            }
            self.remove_id(id);
        }
        let id = self.next_id;
        self.next_id += 1;
        let due = timer.due_at.max(0);
        let handle = match &mut self.delay {
            Delay::Wheel(w) => Handle::Wheel(w.insert(due as u64, id)),
            Delay::Heap(h) => {
                h.heap.push(Reverse((due, id)));
                Handle::Heap(id)
            }
        };
        self.entries.insert(id, Entry { timer, handle });
        self.by_key.insert(ident, id);
        true
    }

    /// Forgets the wake-up of an identity if its generation is at most `generation` (after a
    /// cancel of that generation, or a move of it beyond the horizon). A newer entry, written by a
    /// concurrent schedule, stays.
    pub(crate) fn remove_upto(&mut self, queue: &str, key: &str, generation: u64) {
        let ident = (queue.to_owned(), key.to_owned());
        let Some(&id) = self.by_key.get(&ident) else { return };
        if self.entries.get(&id).is_some_and(|e| e.timer.generation <= generation) {
            self.by_key.remove(&ident);
            self.remove_id(id);
        }
    }

    fn remove_id(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            match (&mut self.delay, entry.handle) {
                (Delay::Wheel(w), Handle::Wheel(k)) => {
                    w.remove(k);
                }
                (Delay::Heap(h), Handle::Heap(i)) => h.remove(i),
                _ => debug_assert!(false, "handle kind does not match the delay structure"),
            }
            let ident = (entry.timer.queue, entry.timer.key);
            if self.by_key.get(&ident) == Some(&id) {
                self.by_key.remove(&ident);
            }
        }
    }

    /// A time at or before the earliest wake-up (the wheel may answer early; never late).
    pub(crate) fn next_due(&self) -> Option<i64> {
        match &self.delay {
            Delay::Wheel(w) => w.next_deadline().map(|t| t.min(i64::MAX as u64) as i64),
            Delay::Heap(h) => h.heap.peek().map(|Reverse((due, _))| *due),
        }
    }

    /// Moves every wake-up due at or before `now` into `out`, earliest first.
    pub(crate) fn pop_due(&mut self, now: i64, out: &mut Vec<TimerRef>) {
        let mut ids = Vec::new();
        match &mut self.delay {
            Delay::Wheel(w) => w.drain_expired(now.max(0) as u64, &mut ids),
            Delay::Heap(h) => h.pop_due(now, &mut ids),
        }
        for id in ids {
            if let Some(entry) = self.entries.remove(&id) {
                let ident = (entry.timer.queue.clone(), entry.timer.key.clone());
                if self.by_key.get(&ident) == Some(&id) {
                    self.by_key.remove(&ident);
                }
                out.push(entry.timer);
            }
        }
        // The wheel fires timers that were inserted already overdue before the rest, in no
        // particular order; hand every batch over in due order.
        out.sort_by_key(|t| t.due_at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(key: &str, generation: u64, due_at: i64) -> TimerRef {
        TimerRef { queue: "q".into(), key: key.into(), generation, due_at }
    }

    #[test]
    fn both_structures_pop_in_due_order_and_keep_the_newest_generation() {
        for kind in [TriggerKind::Wheel, TriggerKind::Heap] {
            let mut ix = MemIndex::new(kind);
            assert!(ix.upsert(r("a", 1, 30)));
            assert!(ix.upsert(r("b", 2, 10)));
            assert!(ix.upsert(r("c", 3, 20)));
            assert!(!ix.upsert(r("a", 0, 5)), "{kind}: an older generation must not replace a newer one");
            assert!(ix.upsert(r("a", 4, 15)), "{kind}: a newer generation replaces");
            ix.remove_upto("q", "c", 3);
            let mut out = Vec::new();
            ix.pop_due(14, &mut out);
            assert_eq!(out, vec![r("b", 2, 10)], "{kind}");
            out.clear();
            ix.pop_due(100, &mut out);
            assert_eq!(out, vec![r("a", 4, 15)], "{kind}: removed and replaced entries never pop");
            assert_eq!(ix.len(), 0);
            assert_eq!(ix.next_due(), None, "{kind}");
        }
    }

    #[test]
    fn removal_spares_a_newer_generation_and_a_retry_keeps_its_later_due_time() {
        for kind in [TriggerKind::Wheel, TriggerKind::Heap] {
            let mut ix = MemIndex::new(kind);
            ix.upsert(r("k", 7, 100));
            ix.remove_upto("q", "k", 6);
            assert_eq!(ix.len(), 1, "{kind}: a cancel of generation 6 removed generation 7");
            assert!(ix.upsert(r("k", 7, 1_100)), "{kind}: a retry moves its own generation later");
            assert!(!ix.upsert(r("k", 7, 100)), "{kind}: a stale page must not move it back");
            let mut out = Vec::new();
            ix.pop_due(1_099, &mut out);
            assert!(out.is_empty(), "{kind}: {out:?}");
            ix.pop_due(1_100, &mut out);
            assert_eq!(out, vec![r("k", 7, 1_100)], "{kind}");
            ix.upsert(r("k", 8, 5));
            ix.remove_upto("q", "k", 8);
            assert_eq!(ix.len(), 0, "{kind}");
        }
    }

    #[test]
    fn heap_compacts_removed_entries() {
        let mut ix = MemIndex::new(TriggerKind::Heap);
        for i in 0..5000 {
            ix.upsert(r(&i.to_string(), i, 1000 + i as i64));
        }
        for i in 0..5000 {
            ix.remove_upto("q", &i.to_string(), i);
        }
        let Delay::Heap(h) = &ix.delay else { panic!("heap expected") };
        assert!(h.heap.len() < 5000, "heap kept {} dead entries", h.heap.len());
    }
}
