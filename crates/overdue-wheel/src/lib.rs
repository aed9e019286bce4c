//! `overdue-wheel`: an in-process hierarchical timing wheel.
//!
//! A [`Wheel<T>`] holds timers, each a deadline in *ticks* (a `u64`; one tick is whatever unit
//! the caller picks, the engine uses 1 ms) and a value `T`. [`Wheel::insert`] hands back a
//! [`TimerKey`]; [`Wheel::poll`] advances the wheel's clock and fires every timer that is due.
//! Converting wall-clock time to ticks is the caller's job; [`ticks_ceil`] rounds *up* so a
//! timer never fires early.
//!
//! # Design
//!
//! The layout follows tokio's wheel (`tokio-util/src/time/wheel/`): [`NUM_LEVELS`] levels of
//! [`SLOTS`] slots. A slot at level `L` spans `64^L` ticks, a whole level spans `64^(L+1)`, and
//! seven levels cover `2^42` ticks (139 years of milliseconds). Timers live in a chunked arena
//! (`slab.rs`); a slot holds only `u32` indices: the heads of intrusive doubly linked lists
//! threaded through the entries, so insert, cancel and reset are O(1) and allocate nothing once
//! the arena has grown. Each level has a `u64` occupancy bitmap, so the next occupied slot is one
//! `trailing_zeros`.
//!
//! Besides the slot lists there are two more lists: *pending* (timers whose deadline is not
//! after `elapsed`: they fire at the next poll) and *overflow* (timers whose deadline lies in a
//! later *epoch*, i.e. differs from `elapsed` above bit [`RANGE_BITS`]; in practice more than
//! 139 years away).
//!
//! # Ground rules
//!
//! These invariants hold whenever control is outside this crate (including while the callback
//! given to [`Wheel::poll`] runs). Everything else is derived from them.
//!
//! 1. **The list of a timer is a function of `(elapsed, deadline)`**; it is not stored. With
//!    `x = elapsed ^ deadline` and `level = msb(x | 63) / 6`:
//!    * `deadline <= elapsed` ⇒ the pending list;
//!    * otherwise `level >= NUM_LEVELS` ⇒ the overflow list;
//!    * otherwise slot `(deadline >> 6·level) & 63` of `level`.
//!
//!    So a timer on level `L` agrees with `elapsed` on every 6-bit group above `L` and is
//!    *strictly* ahead of it in group `L`. Removing a timer recomputes its list from its deadline
//!    and needs no per-entry bookkeeping, which keeps an entry at 32 bytes for `T = u64`.
//! 2. **Every slot at or before `elapsed`'s own position on a level is empty.** Hence the next
//!    slot of a level is the lowest set bit of its bitmap (no rotation), and any timer on level
//!    `L` is due before any timer on level `L + 1` (which must wait for group `L + 1` to roll
//!    over). The earliest timer of the wheel is therefore in the lowest non-empty level's first
//!    occupied slot, and that slot's start is a lower bound for it ([`Wheel::next_deadline`]).
//! 3. **`elapsed` only moves forward, and only across empty time**: poll moves it to the start
//!    of the earliest occupied slot, re-files that slot's timers one level down (or onto the
//!    pending list when their deadline *is* that start), fires the pending list, and repeats
//!    until the next slot starts after `now`; then it sets `elapsed = now`. Because no timer lies
//!    between the old and new `elapsed` except those just re-filed, rule 1 keeps holding for all
//!    timers without touching them.
//! 4. **A timer fires exactly once, at the first poll whose `now` is `>= deadline`**, never
//!    earlier. Poll fires timers in non-decreasing deadline order, except that timers inserted
//!    with a deadline already `<= elapsed` fire first, in unspecified order.
//! 5. **A key names one timer.** A [`TimerKey`] is the entry index plus that entry's generation,
//!    bumped whenever the entry is vacated; a stale key finds a different generation and is
//!    ignored (see `slab.rs`).
//! 6. **Panic safety.** If the poll callback panics, the timer it was given is gone, the wheel is
//!    consistent, and the timers not yet fired are still pending.
//!
//! # Range
//!
//! Deadlines are any `u64`. Deadlines more than `2^42` ticks out wait on the overflow list, which
//! poll re-files when `elapsed` crosses into a later epoch (an O(overflow) scan per crossing,
//! i.e. once every 139 years of 1 ms ticks; a single poll jumping many epochs scans once per
//! epoch that holds timers, plus once). No timer is ever clamped, dropped or fired early.
//!
//! # Speed
//!
//! Cascading walks linked lists whose entries are scattered over the arena, so with millions of
//! timers every step is a cache miss, and a plain list walk waits for one miss per entry. Two
//! things keep several misses in flight instead (see `LANES` and `Wheel::refile`):
//!
//! * every list is split into `LANES` = 8 independent *lanes* (an entry's lane is fixed
//!   by its index), walked round-robin, so the next entries of all lanes load in parallel;
//! * while linking one round of entries, the next round's entries are *prefetched*. A prefetch
//!   is the crate's only `unsafe` (`Slab::prefetch`, an `_mm_prefetch` hint, which cannot fault);
//!   on 10 million timers it cut the cost of firing a timer (all cascades included) from about
//!   111 ns to 89 ns on the benchmark machine. Other targets compile it to nothing.
//!
//! # Memory
//!
//! See `slab.rs`. An entry is 32 bytes for `T = u64`; the arena grows by 4096-entry chunks and
//! never copies. When the last timer leaves the wheel (by [`Wheel::remove`] or [`Wheel::poll`])
//! the arena is freed down to a 64-entry first chunk. [`Wheel::shrink_to_fit`] frees the trailing
//! run of vacant entries and renumbers the free list so new timers fill the lowest holes first.
//! Vacant entries between occupied ones are reused by later inserts but not returned.

mod slab;

use std::fmt;

use slab::{Entry, NIL, Slab, corrupt};

/// Bits of the deadline resolved by one level: a level has `1 << LEVEL_BITS` slots.
pub const LEVEL_BITS: u32 = 6;

/// Slots per level. 64, as in tokio, so one `u64` bitmap tracks which slots are occupied.
pub const SLOTS: usize = 1 << LEVEL_BITS;

/// Number of levels. Slot `s` of level `L` spans `64^L` ticks: level 0 has 1-tick slots, level 6
/// has slots of `2^36` ticks (2.2 years of 1 ms ticks), and the seven levels together span
/// `2^42` ticks (139 years of 1 ms ticks).
pub const NUM_LEVELS: usize = 7;

/// Bits of the deadline covered by all levels: the wheel's range is `1 << RANGE_BITS` ticks.
/// A deadline differing from `elapsed` above these bits waits on the overflow list.
pub const RANGE_BITS: u32 = LEVEL_BITS * NUM_LEVELS as u32;

/// Mask of a slot number inside a level.
const SLOT_MASK: u64 = SLOTS as u64 - 1;

/// Mask of the tick bits inside one epoch (an aligned block of `1 << RANGE_BITS` ticks).
const EPOCH_MASK: u64 = (1 << RANGE_BITS) - 1;

/// Number of slot lists; list `level * SLOTS + slot` is that slot's list.
const SLOT_LISTS: usize = NUM_LEVELS * SLOTS;

/// List of timers whose deadline is `<= elapsed`; drained by the next poll.
const PENDING: usize = SLOT_LISTS;

/// List of timers whose deadline lies in a later epoch than `elapsed`.
const OVERFLOW: usize = SLOT_LISTS + 1;

/// Number of lists.
const NUM_LISTS: usize = SLOT_LISTS + 2;

/// Lanes per list. Every list is really `LANES` independent linked lists, and an entry's lane is
/// fixed by its index (`index % LANES`), so O(1) removal still knows which head to update.
/// Walking a list (to cascade a slot or fire it) visits the lanes round-robin: the next entries
/// of the lanes do not depend on each other, so the CPU has `LANES` cache misses in flight
/// instead of one. Entries of one list need no particular order (a level-0 slot's timers share
/// one deadline; a cascade just moves a set), so lanes cost nothing semantically.
const LANES: usize = 8;

/// The heads of one list's lanes, aligned so they share one cache line.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(C, align(32))]
struct Heads([u32; LANES]);

const _: () = assert!(
    std::mem::size_of::<Heads>() == LANES * 4,
    "Heads must not be padded"
);

impl Heads {
    /// Every lane empty.
    const EMPTY: Heads = Heads([NIL; LANES]);

    #[inline]
    fn is_empty(&self) -> bool {
        *self == Self::EMPTY
    }

    /// Bit `l` set ⇔ lane `l` is non-empty.
    #[inline]
    fn live_lanes(&self) -> u32 {
        let mut mask = 0;
        for (lane, &head) in self.0.iter().enumerate() {
            mask |= u32::from(head != NIL) << lane;
        }
        mask
    }
}

/// Lane of the entry at `index`.
#[inline]
fn lane_of(index: u32) -> usize {
    index as usize % LANES
}

/// Names one timer in one [`Wheel`].
///
/// A key stays valid until its timer fires or is removed; after that every method ignores it
/// (returns `None`/`false`), even if the wheel has reused the timer's storage for another timer,
/// because the key carries the storage's generation. (A generation is a `u32`: a key could only
/// alias after the same storage slot is reused 2^32 times.) Keys from another wheel are not
/// detected.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct TimerKey {
    index: u32,
    generation: u32,
}

/// A hierarchical timing wheel of timers carrying values of type `T`.
///
/// See the [crate documentation](crate) for the design and its invariants.
pub struct Wheel<T> {
    /// The tick the wheel has been advanced to; every timer due at or before it has fired or is
    /// on the pending list.
    elapsed: u64,
    /// Number of pending timers.
    len: usize,
    /// Per level, bit `s` set ⇔ slot `s` of that level is non-empty.
    occupied: [u64; NUM_LEVELS],
    /// Lower bound of the deadlines on the pending list (`u64::MAX` when it is empty).
    pending_min: u64,
    /// Head entry of every lane of every list, or [`NIL`].
    heads: Box<[Heads; NUM_LISTS]>,
    /// The entries.
    slab: Slab<T>,
}

impl<T> Default for Wheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Wheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("elapsed", &self.elapsed)
            .field("len", &self.len)
            .field("next_deadline", &self.next_deadline())
            .field("occupied", &format_args!("{:016x?}", self.occupied))
            .field("pending", &self.heads[PENDING])
            .field("overflow", &self.heads[OVERFLOW])
            .field("slab", &self.slab)
            .finish()
    }
}

impl<T> Wheel<T> {
    /// Creates an empty wheel with `elapsed() == 0`. Allocates only the list heads.
    pub fn new() -> Self {
        Self::from_slab(Slab::new())
    }

    /// Creates an empty wheel that can hold `n` timers without allocating again.
    pub fn with_capacity(n: usize) -> Self {
        Self::from_slab(Slab::with_capacity(n))
    }

    fn from_slab(slab: Slab<T>) -> Self {
        Wheel {
            elapsed: 0,
            len: 0,
            occupied: [0; NUM_LEVELS],
            pending_min: u64::MAX,
            heads: Box::new([Heads::EMPTY; NUM_LISTS]),
            slab,
        }
    }

    /// The tick the wheel has been advanced to: the largest `now` given to [`poll`](Self::poll).
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Number of pending timers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a timer due at tick `deadline` and returns its key. O(1).
    ///
    /// A deadline `<= elapsed()` is already due: the timer fires at the next poll, whatever
    /// `now` that poll is given. Any `u64` deadline is accepted (see the crate docs on range).
    ///
    /// # Panics
    ///
    /// If the wheel already holds `u32::MAX` timers and holes.
    #[inline]
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let index = self.slab.next_index();
        let list = self.note_link(deadline);
        let head = std::mem::replace(&mut self.heads[list].0[lane_of(index)], index);
        let (stored, generation) = self.slab.insert(deadline, value, head);
        debug_assert_eq!(
            stored, index,
            "slab stored at an unexpected index: {self:?}"
        );
        if head != NIL {
            self.slab.set_prev(head, index);
        }
        self.len += 1;
        TimerKey { index, generation }
    }

    /// Cancels the timer and returns its value, or `None` if `key` is stale (the timer fired or
    /// was removed) or unknown. O(1). Removing the last timer frees the arena (crate docs).
    #[inline]
    pub fn remove(&mut self, key: TimerKey) -> Option<T> {
        self.lookup(key)?;
        self.unlink(key.index);
        let value = self.slab.remove(key.index);
        self.len -= 1;
        if self.len == 0 {
            self.slab.release_if_all_vacant();
        }
        Some(value)
    }

    /// Moves the timer to a new deadline (earlier, later, or already due); the key stays
    /// valid. Returns `false`, changing nothing, if `key` is stale or unknown. O(1).
    #[inline]
    pub fn reset(&mut self, key: TimerKey, deadline: u64) -> bool {
        if self.lookup(key).is_none() {
            return false;
        }
        self.unlink(key.index);
        if let Entry::Occupied { deadline: d, .. } = self.slab.entry_mut(key.index) {
            *d = deadline;
        }
        self.link(key.index, deadline);
        true
    }

    /// The timer's deadline, or `None` if `key` is stale or unknown.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        match self.lookup(key)? {
            Entry::Occupied { deadline, .. } => Some(*deadline),
            Entry::Vacant { .. } => None,
        }
    }

    /// The timer's value, or `None` if `key` is stale or unknown.
    pub fn get(&self, key: TimerKey) -> Option<&T> {
        match self.lookup(key)? {
            Entry::Occupied { value, .. } => Some(value),
            Entry::Vacant { .. } => None,
        }
    }

    /// The timer's value, mutably, or `None` if `key` is stale or unknown.
    pub fn get_mut(&mut self, key: TimerKey) -> Option<&mut T> {
        self.lookup(key)?;
        match self.slab.entry_mut(key.index) {
            Entry::Occupied { value, .. } => Some(value),
            Entry::Vacant { .. } => None,
        }
    }

    /// When to poll next: a tick that is **never later than the earliest pending deadline**, or
    /// `None` when the wheel is empty. O(`NUM_LEVELS`).
    ///
    /// It is exact when the earliest timer sits on level 0 (deadline less than 64 ticks after
    /// `elapsed`'s 64-tick block); otherwise it is the start of the slot holding the earliest
    /// timer, which can be up to `64^L - 1` ticks early for level `L`. Polling at that tick moves
    /// the slot's timers down a level, after which the bound is tighter; so a loop "sleep until
    /// `next_deadline()`, then `poll(now)`" wakes at most once per level (≤ 6 times) before the
    /// earliest timer fires. With overdue timers (inserted with a deadline `<= elapsed`) it
    /// returns a value `<= elapsed`: poll now. With only overflow timers it returns the start of
    /// the next 2^42-tick epoch.
    pub fn next_deadline(&self) -> Option<u64> {
        if !self.heads[PENDING].is_empty() {
            return Some(self.pending_min);
        }
        for (level, &occupied) in self.occupied.iter().enumerate() {
            if occupied != 0 {
                return Some(slot_start(self.elapsed, level, occupied.trailing_zeros()));
            }
        }
        if !self.heads[OVERFLOW].is_empty() {
            return (self.elapsed | EPOCH_MASK).checked_add(1);
        }
        None
    }

    /// Fires every timer with `deadline <= max(now, elapsed())` — exactly those — passing
    /// `f(key, deadline, value)`, then sets `elapsed` to `max(elapsed, now)`.
    ///
    /// Timers fire in non-decreasing deadline order, except that timers inserted with a deadline
    /// already `<= elapsed()` fire first, in unspecified order. Cost: O(1) per fired timer plus
    /// O(1) per level a timer moves down (at most `NUM_LEVELS - 1` in its life), plus
    /// O(`NUM_LEVELS`) per occupied slot passed. If `f` panics the wheel stays consistent: the
    /// timer given to `f` is gone, the rest are still pending.
    pub fn poll(&mut self, now: u64, mut f: impl FnMut(TimerKey, u64, T)) {
        let now = now.max(self.elapsed);
        loop {
            self.fire_pending(&mut f);
            if !self.advance_to_next_slot(now) {
                break;
            }
        }
        debug_assert!(
            self.next_deadline().is_none_or(|next| next > now),
            "poll({now}) left a due timer: {self:?}"
        );
        self.elapsed = now;
        if self.len == 0 {
            self.slab.release_if_all_vacant();
        }
    }

    /// Like [`poll`](Self::poll), appending the fired values to `out`.
    pub fn drain_expired(&mut self, now: u64, out: &mut Vec<T>) {
        self.poll(now, |_, _, value| out.push(value));
    }

    /// Returns memory to the allocator: drops the trailing run of vacant entries (and the
    /// chunks that leaves empty), trims the last chunk, and rebuilds the free list in ascending
    /// order so the next inserts fill the lowest holes. O(capacity); keys stay valid.
    pub fn shrink_to_fit(&mut self) {
        if self.len == 0 {
            self.slab.release_if_all_vacant();
        }
        self.slab.shrink_to_fit();
    }

    /// Heap bytes held now: arena capacity × entry size, the chunk table, and the list heads.
    /// (`size_of::<Wheel<T>>()` itself is not included; a `T` that owns heap memory is not
    /// counted either.)
    pub fn memory_bytes(&self) -> usize {
        self.slab.heap_bytes() + std::mem::size_of::<[Heads; NUM_LISTS]>()
    }

    /// The occupied entry named by `key`, if the key is current.
    #[inline]
    fn lookup(&self, key: TimerKey) -> Option<&Entry<T>> {
        match self.slab.try_entry(key.index)? {
            entry @ Entry::Occupied { generation, .. } if *generation == key.generation => {
                Some(entry)
            }
            _ => None,
        }
    }

    /// The list a timer with `deadline` belongs on (ground rule 1).
    #[inline]
    fn list_for(&self, deadline: u64) -> usize {
        if deadline <= self.elapsed {
            return PENDING;
        }
        let level = level_for(self.elapsed, deadline);
        if level >= NUM_LEVELS {
            return OVERFLOW;
        }
        level * SLOTS + slot_for(deadline, level)
    }

    /// The list for `deadline`, noted as about to receive an entry (occupancy bit or
    /// `pending_min`).
    #[inline]
    fn note_link(&mut self, deadline: u64) -> usize {
        let list = self.list_for(deadline);
        if list < SLOT_LISTS {
            self.occupied[list / SLOTS] |= 1 << (list % SLOTS);
        } else if list == PENDING {
            self.pending_min = self.pending_min.min(deadline);
        }
        list
    }

    /// Pushes the (unlinked) entry `index` onto the front of the list for `deadline`.
    #[inline]
    fn link(&mut self, index: u32, deadline: u64) {
        let list = self.note_link(deadline);
        let head = std::mem::replace(&mut self.heads[list].0[lane_of(index)], index);
        if head != NIL {
            self.slab.set_prev(head, index);
        }
        self.slab.set_links(index, head, NIL);
    }

    /// Takes the occupied entry `index` out of its list.
    #[inline]
    fn unlink(&mut self, index: u32) {
        let (deadline, next, prev) = self.slab.links(index);
        if prev != NIL {
            self.slab.set_next(prev, next);
        } else {
            let list = self.list_for(deadline);
            let heads = &mut self.heads[list];
            debug_assert_eq!(
                heads.0[lane_of(index)],
                index,
                "entry {index} (deadline {deadline}) is not the head of list {list}"
            );
            heads.0[lane_of(index)] = next;
            if next == NIL && heads.is_empty() {
                if list < SLOT_LISTS {
                    self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
                } else if list == PENDING {
                    self.pending_min = u64::MAX;
                }
            }
        }
        if next != NIL {
            self.slab.set_prev(next, prev);
        }
    }

    /// Fires every timer on the pending list, lanes round-robin, popping each timer before
    /// calling `f` (ground rule 6).
    fn fire_pending(&mut self, f: &mut impl FnMut(TimerKey, u64, T)) {
        loop {
            let mut live = self.heads[PENDING].live_lanes();
            if live == 0 {
                break;
            }
            while live != 0 {
                let lane = live.trailing_zeros() as usize;
                live &= live - 1;
                let index = self.heads[PENDING].0[lane];
                let (deadline, next, generation, value) = self.slab.take(index);
                self.heads[PENDING].0[lane] = next;
                if next != NIL {
                    // Also starts fetching the entry this lane fires next.
                    self.slab.set_prev(next, NIL);
                }
                self.len -= 1;
                f(TimerKey { index, generation }, deadline, value);
            }
        }
        self.pending_min = u64::MAX;
    }

    /// If the earliest occupied slot starts at or before `now`, moves `elapsed` to its start and
    /// re-files its timers (ground rule 3); returns whether it did.
    fn advance_to_next_slot(&mut self, now: u64) -> bool {
        debug_assert!(
            self.heads[PENDING].is_empty(),
            "advancing with timers still pending: {self:?}"
        );
        for level in 0..NUM_LEVELS {
            let occupied = self.occupied[level];
            if occupied == 0 {
                continue;
            }
            let slot = occupied.trailing_zeros();
            debug_assert!(
                occupied & (u64::MAX >> (63 - current_slot(self.elapsed, level))) == 0,
                "level {level} has a slot at or before elapsed {} (occupied {occupied:064b})",
                self.elapsed
            );
            let start = slot_start(self.elapsed, level, slot);
            if start > now {
                return false;
            }
            self.elapsed = start;
            self.occupied[level] &= !(1 << slot);
            let list = level * SLOTS + slot as usize;
            let heads = std::mem::replace(&mut self.heads[list], Heads::EMPTY);
            if level == 0 {
                // Every timer here is due exactly at `start`: the whole list becomes pending.
                self.heads[PENDING] = heads;
                self.pending_min = start;
            } else {
                self.refile(heads);
            }
            return true;
        }
        self.advance_to_overflow(now)
    }

    /// With all levels empty: if the next epoch starts at or before `now`, jumps `elapsed` to the
    /// start of the epoch of `min(earliest overflow deadline, now)` and re-files the overflow
    /// list; returns whether it did.
    fn advance_to_overflow(&mut self, now: u64) -> bool {
        let heads = self.heads[OVERFLOW];
        if heads.is_empty() {
            return false;
        }
        let Some(next_epoch) = (self.elapsed | EPOCH_MASK).checked_add(1) else {
            corrupt("overflow timers in the last epoch", heads.0[0])
        };
        if next_epoch > now {
            return false;
        }
        let mut earliest = u64::MAX;
        for &head in &heads.0 {
            let mut cur = head;
            while cur != NIL {
                let (deadline, next, _) = self.slab.links(cur);
                earliest = earliest.min(deadline);
                cur = next;
            }
        }
        debug_assert!(
            earliest >= next_epoch,
            "overflow timer due {earliest} before the next epoch {next_epoch}: {self:?}"
        );
        self.elapsed = earliest.min(now) & !EPOCH_MASK;
        self.heads[OVERFLOW] = Heads::EMPTY;
        self.refile(heads);
        true
    }

    /// Links every entry of the detached lanes `heads` into its list for the current `elapsed`.
    ///
    /// Each round first reads the next entry of every live lane (independent loads, so their
    /// cache misses overlap), then links them.
    fn refile(&mut self, heads: Heads) {
        let mut cur = heads.0;
        let mut live = heads.live_lanes();
        while live != 0 {
            let mut batch = [(NIL, 0u64); LANES];
            let mut count = 0;
            let mut lanes = live;
            while lanes != 0 {
                let lane = lanes.trailing_zeros() as usize;
                lanes &= lanes - 1;
                let index = cur[lane];
                let (deadline, next, _) = self.slab.links(index);
                self.slab.prefetch(next);
                cur[lane] = next;
                live &= !(u32::from(next == NIL) << lane);
                batch[count] = (index, deadline);
                count += 1;
            }
            for &(index, deadline) in &batch[..count] {
                self.link(index, deadline);
            }
        }
    }

    /// Checks every invariant in O(capacity); for tests.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut seen = 0;
        for list in 0..NUM_LISTS {
            for lane in 0..LANES {
                let mut prev = NIL;
                let mut cur = self.heads[list].0[lane];
                while cur != NIL {
                    assert_eq!(
                        lane_of(cur),
                        lane,
                        "entry {cur} in the wrong lane; {self:?}"
                    );
                    let (deadline, next, back) = self.slab.links(cur);
                    assert_eq!(
                        back, prev,
                        "entry {cur} on list {list}: bad prev link; {self:?}"
                    );
                    assert_eq!(
                        self.list_for(deadline),
                        list,
                        "entry {cur} (deadline {deadline}) on the wrong list; {self:?}"
                    );
                    if list == PENDING {
                        assert!(
                            self.pending_min <= deadline,
                            "pending_min too high; {self:?}"
                        );
                    }
                    seen += 1;
                    prev = cur;
                    cur = next;
                }
            }
            if list < SLOT_LISTS {
                let bit = self.occupied[list / SLOTS] & (1 << (list % SLOTS)) != 0;
                assert_eq!(
                    bit,
                    !self.heads[list].is_empty(),
                    "bitmap of list {list}; {self:?}"
                );
            }
        }
        assert_eq!(seen, self.len, "linked entries vs len; {self:?}");
        assert_eq!(
            self.slab.entries() - self.slab.free_len(),
            self.len,
            "occupied entries vs len; {self:?}"
        );
    }
}

/// Level of a `deadline > elapsed`: the 6-bit group of its highest bit differing from `elapsed`.
/// `NUM_LEVELS` or more means a later epoch.
#[inline]
fn level_for(elapsed: u64, deadline: u64) -> usize {
    let differing = (elapsed ^ deadline) | SLOT_MASK;
    ((63 - differing.leading_zeros()) / LEVEL_BITS) as usize
}

/// Slot of `deadline` on `level`.
#[inline]
fn slot_for(deadline: u64, level: usize) -> usize {
    ((deadline >> (level as u32 * LEVEL_BITS)) & SLOT_MASK) as usize
}

/// Slot `elapsed` itself occupies on `level`.
#[inline]
fn current_slot(elapsed: u64, level: usize) -> u32 {
    slot_for(elapsed, level) as u32
}

/// First tick of slot `slot` of `level` in the level rotation `elapsed` is in.
#[inline]
fn slot_start(elapsed: u64, level: usize, slot: u32) -> u64 {
    let level_shift = level as u32 * LEVEL_BITS;
    let rotation_mask = (1u64 << (level_shift + LEVEL_BITS)) - 1;
    (elapsed & !rotation_mask) | (u64::from(slot) << level_shift)
}

/// Converts a millisecond instant to a wheel tick of `tick_ms` milliseconds, rounding up so a
/// timer never fires early: `ticks_ceil(ms, t) * t >= ms`.
///
/// # Panics
///
/// If `tick_ms` is 0.
pub fn ticks_ceil(ms: u64, tick_ms: u64) -> u64 {
    assert!(tick_ms > 0, "tick_ms must be positive");
    ms.div_ceil(tick_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// A random number below `2^b` for a random `b` in `min_bits..max_bits` (log-uniform spans).
    fn random_span(rng: &mut SmallRng, min_bits: u32, max_bits: u32) -> u64 {
        let bits = rng.random_range(min_bits..max_bits);
        rng.random_range(0..1u64 << bits)
    }

    /// Polls to `now`, checks the invariants, returns `(deadline, value)` in firing order.
    fn fire(wheel: &mut Wheel<u64>, now: u64) -> Vec<(u64, u64)> {
        let mut fired = Vec::new();
        let limit = now.max(wheel.elapsed());
        wheel.poll(now, |key, deadline, value| {
            assert!(
                deadline <= limit,
                "fired {key:?} due {deadline} early, at {limit}"
            );
            fired.push((deadline, value));
        });
        wheel.check_invariants();
        fired
    }

    #[test]
    fn constants_cover_a_century_of_milliseconds() {
        assert_eq!(SLOTS, 64);
        assert_eq!(RANGE_BITS, 42);
        let years = (1u64 << RANGE_BITS) as f64 / (1000.0 * 3600.0 * 24.0 * 365.25);
        assert!(years > 100.0, "range is {years} years");
    }

    #[test]
    fn level_and_slot_math() {
        for d in 1..64 {
            assert_eq!(level_for(0, d), 0, "deadline {d}");
        }
        for level in 1..NUM_LEVELS {
            let base = 1u64 << (level as u32 * LEVEL_BITS);
            assert_eq!(level_for(0, base), level);
            assert_eq!(level_for(0, base - 1), level - 1);
            assert_eq!(level_for(0, 63 * base), level);
            assert_eq!(slot_for(5 * base + 3, level), 5);
        }
        assert_eq!(level_for(0, 1 << RANGE_BITS), NUM_LEVELS);
        assert!(level_for(0, u64::MAX) >= NUM_LEVELS);
        assert_eq!(slot_start(0x1234_5678, 0, 9), 0x1234_5649);
        assert_eq!(slot_start(0x1234_5678, 1, 2), 0x1234_5080);
        assert_eq!(
            slot_start(u64::MAX, NUM_LEVELS - 1, 63),
            !((1u64 << 36) - 1)
        );
    }

    #[test]
    fn fires_at_the_deadline_not_before() {
        let mut wheel = Wheel::new();
        let key = wheel.insert(10, 1);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.deadline(key), Some(10));
        assert_eq!(wheel.get(key), Some(&1));
        assert!(fire(&mut wheel, 9).is_empty());
        assert_eq!(wheel.elapsed(), 9);
        assert_eq!(fire(&mut wheel, 10), vec![(10, 1)]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.get(key), None, "a fired key is stale");
        assert_eq!(wheel.remove(key), None);
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn past_and_present_deadlines_fire_at_next_poll() {
        let mut wheel = Wheel::new();
        fire(&mut wheel, 1000);
        wheel.insert(5, 1);
        wheel.insert(1000, 2);
        wheel.insert(1001, 3);
        wheel.insert(0, 4);
        assert_eq!(wheel.next_deadline(), Some(0));
        // `now` behind `elapsed` acts as `elapsed`.
        let mut fired = fire(&mut wheel, 3);
        fired.sort_unstable();
        assert_eq!(fired, vec![(0, 4), (5, 1), (1000, 2)]);
        assert_eq!(wheel.elapsed(), 1000);
        assert_eq!(wheel.next_deadline(), Some(1001));
        assert_eq!(fire(&mut wheel, 1001), vec![(1001, 3)]);
    }

    #[test]
    fn stale_and_foreign_keys_are_ignored() {
        let mut wheel = Wheel::new();
        let a = wheel.insert(10, 1);
        assert_eq!(wheel.remove(a), Some(1));
        let b = wheel.insert(20, 2);
        assert_eq!(b.index, a.index, "storage is reused");
        assert_eq!(wheel.remove(a), None);
        assert_eq!(wheel.get(a), None);
        assert_eq!(wheel.get_mut(a), None);
        assert_eq!(wheel.deadline(a), None);
        assert!(!wheel.reset(a, 5));
        assert_eq!(wheel.deadline(b), Some(20), "b untouched by a's stale key");
        let foreign = TimerKey {
            index: 12_345,
            generation: 0,
        };
        assert_eq!(wheel.remove(foreign), None);
        assert!(!wheel.reset(foreign, 1));
        let nil = TimerKey {
            index: NIL,
            generation: 0,
        };
        assert_eq!(wheel.get(nil), None);
        wheel.check_invariants();
        // After the wheel empties and frees its arena, old keys stay stale.
        assert_eq!(wheel.remove(b), Some(2));
        let c = wheel.insert(30, 3);
        assert_eq!(c.index, b.index);
        assert_eq!(wheel.get(b), None);
        assert_eq!(wheel.get(a), None);
        assert_eq!(wheel.get(c), Some(&3));
    }

    #[test]
    fn reset_moves_timers_in_every_direction() {
        let mut wheel = Wheel::new();
        let a = wheel.insert(100_000, 1);
        let b = wheel.insert(50, 2);
        assert!(wheel.reset(a, 7));
        assert!(wheel.reset(b, 1 << 50));
        wheel.check_invariants();
        assert_eq!(fire(&mut wheel, 7), vec![(7, 1)]);
        assert!(!wheel.reset(a, 9), "fired key");
        assert!(wheel.reset(b, 3), "into the past");
        assert_eq!(wheel.deadline(b), Some(3));
        assert_eq!(fire(&mut wheel, 7), vec![(3, 2)]);
        let c = wheel.insert(0, 3);
        assert!(wheel.reset(c, 64 * 64 * 64 + 1), "out of the pending list");
        assert!(fire(&mut wheel, 64 * 64 * 64).is_empty());
        assert_eq!(
            fire(&mut wheel, 64 * 64 * 64 + 1),
            vec![(64 * 64 * 64 + 1, 3)]
        );
        let d = wheel.insert(9, 0);
        if let Some(value) = wheel.get_mut(d) {
            *value = 42;
        }
        assert_eq!(fire(&mut wheel, 9), vec![(9, 42)]);
    }

    #[test]
    fn cascades_across_every_level_in_order() {
        let mut wheel = Wheel::new();
        let mut expected = Vec::new();
        let mut v = 0;
        for level in 0..=NUM_LEVELS as u32 {
            let base = 1u64 << (level * LEVEL_BITS);
            for d in [
                base - 1,
                base,
                base + 1,
                2 * base - 1,
                63 * base,
                63 * base + 1,
            ] {
                if d > 0 {
                    wheel.insert(d, v);
                    expected.push((d, v));
                    v += 1;
                }
            }
        }
        wheel.check_invariants();
        expected.sort_unstable();
        // Walk through time with steps that land exactly on, just before and just after
        // each deadline.
        let mut fired = Vec::new();
        for &(d, _) in &expected {
            let before = fire(&mut wheel, d - 1);
            assert!(
                before.iter().all(|&(fd, _)| fd < d),
                "early before {d}: {before:?}"
            );
            fired.extend(before);
            fired.extend(fire(&mut wheel, d));
        }
        assert_eq!(fired.len(), expected.len());
        assert!(
            fired.windows(2).all(|w| w[0].0 <= w[1].0),
            "order: {fired:?}"
        );
        let mut sorted = fired.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, expected);
    }

    #[test]
    fn one_big_jump_fires_everything_in_deadline_order() {
        let mut wheel = Wheel::new();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut deadlines: Vec<u64> = (0..5000).map(|_| rng.random_range(1..1u64 << 45)).collect();
        for (i, &d) in deadlines.iter().enumerate() {
            wheel.insert(d, i as u64);
        }
        let fired = fire(&mut wheel, 1 << 45);
        let got: Vec<u64> = fired.iter().map(|&(d, _)| d).collect();
        deadlines.sort_unstable();
        assert_eq!(got, deadlines);
    }

    #[test]
    fn huge_deadlines_never_fire_early_and_never_get_lost() {
        let mut wheel = Wheel::new();
        let huge = [
            u64::MAX,
            u64::MAX - 1,
            u64::MAX / 2,
            u64::MAX / 2 + 1,
            1 << 42,
            (1 << 42) - 1,
            (1 << 42) + 1,
            (1 << 63) + 12_345,
            3 << 42,
        ];
        for (i, &d) in huge.iter().enumerate() {
            wheel.insert(d, i as u64);
        }
        wheel.check_invariants();
        let mut fired = Vec::new();
        let mut sorted = huge.to_vec();
        sorted.sort_unstable();
        for &d in &sorted {
            let before = fire(&mut wheel, d - 1);
            assert!(before.iter().all(|&(fd, _)| fd < d));
            fired.extend(before);
            let nd = wheel.next_deadline();
            assert!(nd.is_some_and(|nd| nd <= d), "next_deadline {nd:?} > {d}");
            fired.extend(fire(&mut wheel, d));
            assert!(fired.iter().any(|&(fd, _)| fd == d), "{d} did not fire");
        }
        assert_eq!(fired.len(), huge.len());
        assert!(wheel.is_empty());
        // A timer inserted at the very end of time still fires.
        let key = wheel.insert(u64::MAX, 99);
        assert_eq!(wheel.deadline(key), Some(u64::MAX));
        assert_eq!(fire(&mut wheel, u64::MAX), vec![(u64::MAX, 99)]);
        wheel.insert(5, 1);
        assert_eq!(
            fire(&mut wheel, 0),
            vec![(5, 1)],
            "deadline behind elapsed = MAX"
        );
    }

    #[test]
    fn overflow_timers_wait_for_their_epoch_with_big_jumps() {
        let mut wheel = Wheel::new();
        wheel.insert(5 << 42 | 17, 1);
        wheel.insert(9 << 42, 2);
        wheel.insert(100, 3);
        assert_eq!(fire(&mut wheel, 3 << 42), vec![(100, 3)]);
        assert_eq!(
            wheel.next_deadline(),
            Some(4 << 42),
            "next epoch as lower bound"
        );
        assert!(fire(&mut wheel, 5 << 42 | 16).is_empty());
        assert_eq!(wheel.next_deadline(), Some(5 << 42 | 17));
        assert_eq!(fire(&mut wheel, 8 << 42), vec![(5 << 42 | 17, 1)]);
        assert_eq!(fire(&mut wheel, u64::MAX), vec![(9 << 42, 2)]);
    }

    #[test]
    fn next_deadline_is_a_lower_bound_that_lets_a_sleep_loop_converge() {
        let mut rng = SmallRng::seed_from_u64(11);
        for round in 0..200 {
            let mut wheel = Wheel::new();
            let start = rng.random_range(0..1u64 << 40);
            fire(&mut wheel, start);
            let n = rng.random_range(1..20);
            let mut deadlines: Vec<u64> = (0..n)
                .map(|_| start + 1 + random_span(&mut rng, 1, 44))
                .collect();
            for &d in &deadlines {
                wheel.insert(d, d);
            }
            deadlines.sort_unstable();
            let mut wakeups = 0;
            while let Some(next) = wheel.next_deadline() {
                let earliest = deadlines[0];
                assert!(
                    next <= earliest,
                    "round {round}: next {next} > earliest {earliest}"
                );
                assert!(
                    next > wheel.elapsed(),
                    "round {round}: next {next} not in the future"
                );
                let fired = fire(&mut wheel, next);
                wakeups += 1;
                for (d, _) in fired {
                    assert_eq!(d, deadlines.remove(0), "round {round}");
                }
                assert!(wakeups <= 8 * n as usize, "round {round}: too many wakeups");
            }
            assert!(deadlines.is_empty());
        }
    }

    #[test]
    fn randomized_operations_keep_invariants() {
        let mut rng = SmallRng::seed_from_u64(3);
        let mut wheel = Wheel::new();
        let mut keys = Vec::new();
        for step in 0..20_000u64 {
            match rng.random_range(0..10) {
                0..=3 => {
                    let span = 1u64 << rng.random_range(0..50);
                    let d = wheel
                        .elapsed()
                        .saturating_add(rng.random_range(0..span))
                        .saturating_sub(3);
                    keys.push(wheel.insert(d, step));
                }
                4 | 5 if !keys.is_empty() => {
                    let key = keys.swap_remove(rng.random_range(0..keys.len()));
                    let _ = wheel.remove(key);
                }
                6 if !keys.is_empty() => {
                    let key = keys[rng.random_range(0..keys.len())];
                    let d = wheel.elapsed() + random_span(&mut rng, 0, 30);
                    wheel.reset(key, d);
                }
                _ => {
                    let now = wheel.elapsed() + random_span(&mut rng, 0, 24);
                    for (_, value) in fire(&mut wheel, now) {
                        let _ = value;
                    }
                }
            }
            if step % 97 == 0 {
                wheel.check_invariants();
            }
        }
        wheel.check_invariants();
    }

    #[test]
    fn memory_is_released_when_the_wheel_empties() {
        let mut wheel = Wheel::new();
        let empty = wheel.memory_bytes();
        let keys: Vec<_> = (0..100_000u64)
            .map(|i| wheel.insert(i * 7 + 1, i))
            .collect();
        let full = wheel.memory_bytes();
        println!(
            "empty: {empty} B, 100k timers: {full} B ({} B/timer)",
            full / 100_000
        );
        assert!(full / 100_000 <= 33, "bytes per timer: {}", full / 100_000);
        for key in keys {
            wheel.remove(key);
        }
        assert!(
            wheel.memory_bytes() <= empty + 64 * 32 + 64,
            "{} B after emptying",
            wheel.memory_bytes()
        );
        // Same when the timers fire.
        for i in 0..100_000u64 {
            wheel.insert(wheel.elapsed() + i + 1, i);
        }
        let mut out = Vec::new();
        wheel.drain_expired(u64::MAX, &mut out);
        assert_eq!(out.len(), 100_000);
        assert!(
            wheel.memory_bytes() <= empty + 64 * 32 + 64,
            "{} B after firing",
            wheel.memory_bytes()
        );
    }

    #[test]
    fn shrink_to_fit_returns_the_trailing_vacant_entries() {
        let mut wheel = Wheel::new();
        let keys: Vec<_> = (0..50_000u64).map(|i| wheel.insert(i + 1, i)).collect();
        for &key in &keys[1000..] {
            wheel.remove(key);
        }
        wheel.remove(keys[10]);
        let before = wheel.memory_bytes();
        wheel.shrink_to_fit();
        let after = wheel.memory_bytes();
        assert!(after < before / 10, "{before} -> {after}");
        wheel.check_invariants();
        assert_eq!(wheel.get(keys[999]), Some(&999), "keys survive shrinking");
        assert_eq!(wheel.get(keys[1000]), None);
        let reused = wheel.insert(5, 5);
        assert_eq!(reused.index, keys[10].index, "lowest hole first");
        let fresh = wheel.insert(5, 6);
        assert_eq!(fresh.index, keys[1000].index);
        assert_eq!(
            wheel.get(keys[1000]),
            None,
            "a re-created index gets a new generation"
        );
        assert_eq!(wheel.len(), 1001);
    }

    #[test]
    fn with_capacity_does_not_reallocate() {
        let mut wheel = Wheel::with_capacity(10_000);
        let bytes = wheel.memory_bytes();
        for i in 0..10_000u64 {
            wheel.insert(i, i);
        }
        assert_eq!(wheel.memory_bytes(), bytes);
    }

    #[test]
    fn a_panicking_callback_leaves_the_wheel_consistent() {
        let mut wheel = Wheel::new();
        for i in 0..10u64 {
            wheel.insert(100, i);
            wheel.insert(5000 + i, i);
        }
        let mut before_panic = 0;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wheel.poll(6000, |_, deadline, value| {
                assert!(!(deadline == 5000 + 3 && value == 3), "boom");
                before_panic += 1;
            });
        }));
        assert!(result.is_err());
        wheel.check_invariants();
        assert_eq!(wheel.len(), 20 - before_panic - 1, "{wheel:?}");
        let rest = fire(&mut wheel, 6000);
        assert_eq!(before_panic + 1 + rest.len(), 20);
        assert!(
            rest.iter().all(|&(d, _)| d > 5003),
            "order kept after the panic: {rest:?}"
        );
        assert!(wheel.is_empty());
    }

    #[test]
    fn wheel_and_keys_can_cross_threads() {
        fn assert_send_sync<X: Send + Sync>() {}
        assert_send_sync::<Wheel<u64>>();
        assert_send_sync::<TimerKey>();
    }

    #[test]
    fn ticks_ceil_rounds_up() {
        assert_eq!(ticks_ceil(0, 1), 0);
        assert_eq!(ticks_ceil(10, 1), 10);
        assert_eq!(ticks_ceil(10, 3), 4);
        assert_eq!(ticks_ceil(9, 3), 3);
        assert_eq!(ticks_ceil(u64::MAX, 1), u64::MAX);
        assert_eq!(ticks_ceil(u64::MAX, 2), u64::MAX / 2 + 1);
    }
}
