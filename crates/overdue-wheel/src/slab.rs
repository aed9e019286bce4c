//! The entry arena behind [`Wheel`](crate::Wheel).
//!
//! # Ground rules
//!
//! * Every timer lives in one [`Entry`] addressed by a `u32` index. Indices are stable for the
//!   life of the timer: the arena never moves an occupied entry to another index.
//! * The arena is a list of *chunks* of [`CHUNK_LEN`] entries. Growing the arena allocates one
//!   more chunk; it never reallocates (and copies) the entries already stored, so an insert never
//!   pays for moving millions of timers and capacity overshoots the need by less than one chunk.
//!   Only the first chunk grows geometrically, so a small wheel stays small.
//! * A vacant entry is on the *free list*, a singly linked list threaded through
//!   [`Entry::Vacant::next_free`]. Inserting pops the free list before it appends a fresh entry,
//!   so the arena does not grow while there are holes: no allocation per timer in steady state.
//! * Every entry carries a generation. It is bumped each time the entry is vacated, and a fresh
//!   entry starts at `gen_floor`, which is raised past every generation ever handed out whenever
//!   entries are dropped from the end of the arena. A `(index, generation)` key therefore names at
//!   most one timer until one index is reused 2^32 times.
//! * Memory goes back to the allocator in two places only: [`Slab::release_if_all_vacant`] (the
//!   wheel calls it when its last timer leaves) and [`Slab::shrink_to_fit`] (trailing vacant
//!   entries). Holes in the middle are reused, not returned: returning them would move entries
//!   and break keys.

use std::fmt;

/// `u32` index meaning "no entry": the end of a list.
pub(crate) const NIL: u32 = u32::MAX;

/// log2 of [`CHUNK_LEN`].
const CHUNK_BITS: u32 = 12;

/// Entries per chunk. 4096 entries of 32 bytes = 128 KiB, large enough that the table of chunk
/// pointers for 10 million timers (2 442 pointers) stays in L1/L2, small enough that the unused
/// tail of the last chunk is negligible.
pub(crate) const CHUNK_LEN: usize = 1 << CHUNK_BITS;

/// Mask extracting the offset inside a chunk from an entry index.
const CHUNK_MASK: u32 = (1 << CHUNK_BITS) - 1;

/// Capacity the first chunk starts at, and the capacity it keeps when the wheel empties.
/// 64 entries of 32 bytes = 2 KiB: a wheel oscillating between zero and a few timers does not
/// allocate on every insert.
pub(crate) const RETAIN_ON_EMPTY: usize = 64;

/// Largest number of entries: indices `0..MAX_ENTRIES`, [`NIL`] excluded.
pub(crate) const MAX_ENTRIES: usize = NIL as usize;

/// One timer, or one hole in the arena.
///
/// For `T = u64` this is 32 bytes: the discriminant and the three `u32` fields share the first
/// 16 bytes, `deadline` and `value` take the other 16 (checked below).
pub(crate) enum Entry<T> {
    /// A pending timer, linked into exactly one list of the wheel.
    Occupied {
        /// Deadline in ticks.
        deadline: u64,
        /// The caller's value.
        value: T,
        /// Next entry of the same list, or [`NIL`].
        next: u32,
        /// Previous entry of the same list, or [`NIL`] when this entry is the list's head.
        prev: u32,
        /// Generation handed out in this timer's key.
        generation: u32,
    },
    /// A hole, linked into the free list.
    Vacant {
        /// Next vacant entry, or [`NIL`].
        next_free: u32,
        /// Generation the next timer stored here will get.
        generation: u32,
    },
}

const _: () = assert!(
    std::mem::size_of::<Entry<u64>>() <= 32,
    "an entry for T = u64 must fit in 32 bytes"
);

/// Chunked arena of [`Entry`]s with an intrusive free list.
pub(crate) struct Slab<T> {
    /// All chunks but the last hold exactly [`CHUNK_LEN`] entries.
    chunks: Vec<Vec<Entry<T>>>,
    /// Number of entries (occupied or vacant) stored in `chunks`.
    entries: usize,
    /// Head of the free list, or [`NIL`].
    free_head: u32,
    /// Generation given to an entry appended at the end of the arena.
    gen_floor: u32,
    /// Highest generation stored in a vacant entry so far (not wrapping-aware).
    gen_high: u32,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Self {
        Slab {
            chunks: Vec::new(),
            entries: 0,
            free_head: NIL,
            gen_floor: 0,
            gen_high: 0,
        }
    }

    pub(crate) fn with_capacity(n: usize) -> Self {
        let mut slab = Self::new();
        slab.reserve(n);
        slab
    }

    /// Preallocates room for `n` entries in a new, empty arena.
    fn reserve(&mut self, n: usize) {
        debug_assert!(self.entries == 0, "reserve on a used arena: {self:?}");
        let n = n.min(MAX_ENTRIES);
        let chunks = n.div_ceil(CHUNK_LEN);
        self.chunks.reserve_exact(chunks);
        while self.chunks.len() < chunks {
            self.chunks.push(Vec::with_capacity(n.min(CHUNK_LEN)));
        }
    }

    /// Entries (occupied or vacant) the arena can hold without allocating.
    pub(crate) fn capacity(&self) -> usize {
        self.chunks.iter().map(Vec::capacity).sum()
    }

    /// Heap bytes held: entry storage plus the chunk table.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.capacity() * std::mem::size_of::<Entry<T>>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<Entry<T>>>()
    }

    #[inline]
    pub(crate) fn entry(&self, index: u32) -> &Entry<T> {
        &self.chunks[(index >> CHUNK_BITS) as usize][(index & CHUNK_MASK) as usize]
    }

    #[inline]
    pub(crate) fn entry_mut(&mut self, index: u32) -> &mut Entry<T> {
        &mut self.chunks[(index >> CHUNK_BITS) as usize][(index & CHUNK_MASK) as usize]
    }

    /// The entry at `index` if it exists, without panicking on a foreign index.
    #[inline]
    pub(crate) fn try_entry(&self, index: u32) -> Option<&Entry<T>> {
        self.chunks
            .get((index >> CHUNK_BITS) as usize)?
            .get((index & CHUNK_MASK) as usize)
    }

    /// `(deadline, next, prev)` of the occupied entry `index`.
    #[inline]
    pub(crate) fn links(&self, index: u32) -> (u64, u32, u32) {
        match self.entry(index) {
            Entry::Occupied {
                deadline,
                next,
                prev,
                ..
            } => (*deadline, *next, *prev),
            Entry::Vacant { .. } => corrupt("reading the links of a vacant entry", index),
        }
    }

    #[inline]
    pub(crate) fn set_next(&mut self, index: u32, to: u32) {
        match self.entry_mut(index) {
            Entry::Occupied { next, .. } => *next = to,
            Entry::Vacant { .. } => corrupt("linking a vacant entry", index),
        }
    }

    #[inline]
    pub(crate) fn set_prev(&mut self, index: u32, to: u32) {
        match self.entry_mut(index) {
            Entry::Occupied { prev, .. } => *prev = to,
            Entry::Vacant { .. } => corrupt("linking a vacant entry", index),
        }
    }

    #[inline]
    pub(crate) fn set_links(&mut self, index: u32, to_next: u32, to_prev: u32) {
        match self.entry_mut(index) {
            Entry::Occupied { next, prev, .. } => {
                *next = to_next;
                *prev = to_prev;
            }
            Entry::Vacant { .. } => corrupt("linking a vacant entry", index),
        }
    }

    /// Asks the CPU to start loading entry `index` into the cache, without waiting for it.
    ///
    /// Why `unsafe` here (the workspace denies it): cascading slots is the measured hot path of
    /// `Wheel::poll`, and it is bound by cache misses on entries scattered over the arena. A
    /// real load of the next entry would block retirement until the miss completes; a
    /// prefetch does not, so the next round's misses overlap the current round's work. With
    /// 10 million timers over one hour this took firing (cascades included) from ~111 to
    /// ~89 ns per timer (`cargo run --release -p overdue-wheel --example profile`). No safe
    /// equivalent exists; the intrinsic's only requirement is the `sse` target feature.
    #[inline]
    pub(crate) fn prefetch(&self, index: u32) {
        #[cfg(target_arch = "x86_64")]
        if let Some(entry) = self.try_entry(index) {
            let ptr = std::ptr::from_ref(entry).cast::<i8>();
            // SAFETY: a prefetch is only a cache hint: it reads nothing architecturally and
            // cannot fault, whatever the address (here a live reference anyway); SSE is part of
            // the x86_64 baseline.
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = index;
    }

    /// Index the next [`insert`](Self::insert) will use.
    ///
    /// # Panics
    ///
    /// If the arena is full: [`MAX_ENTRIES`] entries and no hole.
    #[inline]
    pub(crate) fn next_index(&self) -> u32 {
        if self.free_head != NIL {
            return self.free_head;
        }
        assert!(
            self.entries < MAX_ENTRIES,
            "timer wheel full: {} entries",
            self.entries
        );
        self.entries as u32
    }

    /// Stores a new occupied entry at [`next_index`](Self::next_index), linked before `next`
    /// (`prev` = [`NIL`]); returns its index and generation.
    ///
    /// # Panics
    ///
    /// If the arena is full.
    #[inline]
    pub(crate) fn insert(&mut self, deadline: u64, value: T, next: u32) -> (u32, u32) {
        if self.free_head != NIL {
            let index = self.free_head;
            let slot = self.entry_mut(index);
            let Entry::Vacant {
                next_free,
                generation,
            } = *slot
            else {
                corrupt("free list points at an occupied entry", index)
            };
            *slot = Entry::Occupied {
                deadline,
                value,
                next,
                prev: NIL,
                generation,
            };
            self.free_head = next_free;
            return (index, generation);
        }
        self.push_fresh(deadline, value, next)
    }

    #[inline]
    fn push_fresh(&mut self, deadline: u64, value: T, next: u32) -> (u32, u32) {
        assert!(
            self.entries < MAX_ENTRIES,
            "timer wheel full: {} entries",
            self.entries
        );
        let index = self.entries as u32;
        let generation = self.gen_floor;
        let entry = Entry::Occupied {
            deadline,
            value,
            next,
            prev: NIL,
            generation,
        };
        let chunk = self.entries >> CHUNK_BITS;
        if chunk == self.chunks.len() {
            let cap = if chunk == 0 {
                RETAIN_ON_EMPTY
            } else {
                CHUNK_LEN
            };
            self.chunks.push(Vec::with_capacity(cap));
        }
        let last = &mut self.chunks[chunk];
        if last.len() == last.capacity() {
            // Only the first chunk starts below CHUNK_LEN; grow it geometrically, capped.
            let want = (last.len() * 2).clamp(RETAIN_ON_EMPTY, CHUNK_LEN);
            last.reserve_exact(want - last.len());
        }
        last.push(entry);
        self.entries += 1;
        (index, generation)
    }

    /// Vacates the occupied entry at `index` and returns its value. The caller has unlinked it.
    #[inline]
    pub(crate) fn remove(&mut self, index: u32) -> T {
        let free_head = self.free_head;
        let slot = self.entry_mut(index);
        let Entry::Occupied { generation, .. } = *slot else {
            corrupt("removing a vacant entry", index)
        };
        let generation = generation.wrapping_add(1);
        let old = std::mem::replace(
            slot,
            Entry::Vacant {
                next_free: free_head,
                generation,
            },
        );
        self.free_head = index;
        self.gen_high = self.gen_high.max(generation);
        match old {
            Entry::Occupied { value, .. } => value,
            Entry::Vacant { .. } => corrupt("entry changed while removing it", index),
        }
    }

    /// Vacates the occupied entry at `index` in one lookup and returns
    /// `(deadline, next, generation, value)`. The caller unlinks it (it is the head of its lane).
    #[inline]
    pub(crate) fn take(&mut self, index: u32) -> (u64, u32, u32, T) {
        let free_head = self.free_head;
        let slot = self.entry_mut(index);
        let Entry::Occupied { generation, .. } = *slot else {
            corrupt("taking a vacant entry", index)
        };
        let old = std::mem::replace(
            slot,
            Entry::Vacant {
                next_free: free_head,
                generation: generation.wrapping_add(1),
            },
        );
        self.free_head = index;
        self.gen_high = self.gen_high.max(generation.wrapping_add(1));
        match old {
            Entry::Occupied {
                deadline,
                next,
                value,
                ..
            } => (deadline, next, generation, value),
            Entry::Vacant { .. } => corrupt("entry changed while taking it", index),
        }
    }

    /// Raises `gen_floor` past every generation an entry of this arena ever carried; called
    /// before entries are dropped from the end so a re-created index gets a new generation.
    fn raise_gen_floor(&mut self) {
        self.gen_floor = self.gen_floor.max(self.gen_high);
    }

    /// Frees every chunk, keeping at most [`RETAIN_ON_EMPTY`] entries of capacity.
    /// The caller guarantees every entry is vacant.
    pub(crate) fn release_if_all_vacant(&mut self) {
        if self.entries == 0 && self.capacity() <= RETAIN_ON_EMPTY {
            return;
        }
        self.raise_gen_floor();
        self.chunks.truncate(1);
        if let Some(first) = self.chunks.first_mut() {
            first.clear();
            first.shrink_to(RETAIN_ON_EMPTY);
        }
        self.chunks.shrink_to_fit();
        self.entries = 0;
        self.free_head = NIL;
    }

    /// Drops the trailing run of vacant entries, frees the chunks that leaves empty, shrinks the
    /// last chunk to its length, and rebuilds the free list in ascending index order so later
    /// inserts fill the lowest holes first (which keeps the next `shrink_to_fit` effective).
    /// O(number of entries).
    pub(crate) fn shrink_to_fit(&mut self) {
        let mut keep = self.entries;
        while keep > 0 && matches!(self.entry((keep - 1) as u32), Entry::Vacant { .. }) {
            keep -= 1;
        }
        if keep < self.entries {
            self.raise_gen_floor();
        }
        let full = keep / CHUNK_LEN;
        let rest = keep % CHUNK_LEN;
        self.chunks.truncate(full + usize::from(rest > 0));
        if let Some(last) = self.chunks.last_mut() {
            last.truncate(if rest > 0 { rest } else { CHUNK_LEN });
            last.shrink_to_fit();
        }
        self.chunks.shrink_to_fit();
        self.entries = keep;

        let mut head = NIL;
        for index in (0..keep as u32).rev() {
            if let Entry::Vacant { next_free, .. } = self.entry_mut(index) {
                *next_free = head;
                head = index;
            }
        }
        self.free_head = head;
    }

    /// Number of entries, occupied or vacant (the high-water mark).
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.entries
    }

    /// Length of the free list (O(holes)); for tests.
    #[cfg(test)]
    pub(crate) fn free_len(&self) -> usize {
        let mut n = 0;
        let mut cur = self.free_head;
        while cur != NIL {
            n += 1;
            cur = match self.entry(cur) {
                Entry::Vacant { next_free, .. } => *next_free,
                Entry::Occupied { .. } => corrupt("occupied entry on the free list", cur),
            };
        }
        n
    }
}

impl<T> fmt::Debug for Slab<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slab")
            .field("entries", &self.entries)
            .field("chunks", &self.chunks.len())
            .field("capacity", &self.capacity())
            .field("free_head", &self.free_head)
            .field("gen_floor", &self.gen_floor)
            .finish()
    }
}

/// Reports a broken internal invariant: a bug in this crate, never a caller error.
#[cold]
#[inline(never)]
#[track_caller]
pub(crate) fn corrupt(what: &str, index: u32) -> ! {
    panic!("overdue-wheel internal invariant broken: {what} (index {index})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(slab: &Slab<u64>, index: u32) -> Option<u64> {
        match slab.try_entry(index)? {
            Entry::Occupied { value, .. } => Some(*value),
            Entry::Vacant { .. } => None,
        }
    }

    #[test]
    fn entry_is_32_bytes_for_u64() {
        println!(
            "size_of::<Entry<u64>>() = {}",
            std::mem::size_of::<Entry<u64>>()
        );
        assert_eq!(std::mem::size_of::<Entry<u64>>(), 32);
    }

    #[test]
    fn reuses_holes_before_growing() {
        let mut slab = Slab::new();
        let a = slab.insert(1, 10, NIL);
        let b = slab.insert(2, 20, NIL);
        assert_eq!(slab.remove(a.0), 10);
        let c = slab.insert(3, 30, NIL);
        assert_eq!(c.0, a.0, "the hole is reused");
        assert_ne!(c.1, a.1, "with a new generation");
        assert_eq!(slab.entries(), 2);
        assert_eq!(value(&slab, b.0), Some(20));
        assert_eq!(value(&slab, c.0), Some(30));
    }

    #[test]
    fn grows_by_chunks_without_moving() {
        let mut slab = Slab::new();
        for i in 0..(3 * CHUNK_LEN as u64 + 5) {
            let (index, _) = slab.insert(i, i, NIL);
            assert_eq!(u64::from(index), i);
        }
        assert_eq!(slab.chunks.len(), 4);
        assert!(slab.capacity() <= 4 * CHUNK_LEN, "{:?}", slab);
        assert_eq!(
            value(&slab, 2 * CHUNK_LEN as u32 + 7),
            Some(2 * CHUNK_LEN as u64 + 7)
        );
    }

    #[test]
    fn with_capacity_preallocates() {
        let slab: Slab<u64> = Slab::with_capacity(10_000);
        assert!(slab.capacity() >= 10_000, "{slab:?}");
        assert!(slab.capacity() < 10_000 + CHUNK_LEN, "{slab:?}");
        let small: Slab<u64> = Slab::with_capacity(10);
        assert_eq!(small.capacity(), 10);
    }

    #[test]
    fn shrink_drops_trailing_holes_and_keeps_generations_fresh() {
        let mut slab = Slab::new();
        let keys: Vec<_> = (0..(2 * CHUNK_LEN as u64 + 10))
            .map(|i| slab.insert(i, i, NIL))
            .collect();
        for &(index, _) in &keys[10..] {
            slab.remove(index);
        }
        slab.remove(keys[3].0);
        slab.shrink_to_fit();
        assert_eq!(slab.entries(), 10);
        assert_eq!(slab.capacity(), 10);
        assert_eq!(slab.free_len(), 1);
        // The hole at 3 is reused first, then fresh entries with generations above the old ones.
        let (index, _) = slab.insert(0, 0, NIL);
        assert_eq!(index, 3);
        let (index, generation) = slab.insert(0, 0, NIL);
        assert_eq!(index, 10);
        assert_ne!(
            generation, keys[10].1,
            "a re-created index must not reuse a generation"
        );
    }

    #[test]
    fn release_keeps_a_small_first_chunk() {
        let mut slab = Slab::new();
        let keys: Vec<_> = (0..10_000u64).map(|i| slab.insert(i, i, NIL)).collect();
        for &(index, _) in &keys {
            slab.remove(index);
        }
        slab.release_if_all_vacant();
        assert!(slab.capacity() <= RETAIN_ON_EMPTY, "{slab:?}");
        let (index, generation) = slab.insert(0, 0, NIL);
        assert_eq!(index, 0);
        assert_ne!(generation, keys[0].1);
    }
}
