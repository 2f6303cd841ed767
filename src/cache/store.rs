//! One worker's store of responses: a map from keys to values weighed in bytes, bounded by a
//! byte budget, with S3-FIFO eviction (Yang et al., "FIFO queues are all you need for cache
//! eviction", SOSP 2023). Single-threaded: each worker owns one, nothing is shared.
//!
//! ```text
//!   insert (new key) ─┬─ hash in the ghost table ──────────────► main ◄──┐ (accessed: kept,
//!                     └─ otherwise ─► small ─┬─ accessed ─────────► main ─┘  one use spent)
//!                                            └─ not accessed: out,         └─ not accessed: out
//!                                               its hash to the ghost table
//! ```
//!
//! - **Small** holds new entries, about a tenth of the budget ([`SMALL_SHARE`]); an entry that
//!   is not used again before it reaches the front leaves the store. A scan of one-time keys
//!   goes through small and never displaces what main holds.
//! - **Main** holds entries used at least once in small, or stored again soon after they went
//!   (their hash still in the ghost table). At the front, an entry with uses left is put back
//!   with one use less (a CLOCK over a FIFO); one with none leaves.
//! - **Ghost table**: the hashes of entries that left small unused, in a direct-mapped table of
//!   32-bit tags (one slot per expected entry, [`Store::new`]): a newer hash overwrites an older
//!   one in the same slot, so the table is bounded by construction and remembers about as many
//!   recent hashes as the store holds entries (the paper's ghost queue holds as many as main).
//!   It only decides where a new entry starts; a wrong answer costs a placement, never a
//!   wrong value.
//!
//! Keys come hashed ([`KeyRef`]: hashed once per request by `WorkerCache::key`, keyed per
//! worker); the index (`hashbrown::HashTable` of slot numbers) compares hash and bytes, so
//! keys with equal hashes stay apart. Entries live in a slab of slots with a free list, the
//! queues are ring buffers of slot numbers: once these have grown to the most entries the
//! store holds at once, an insert allocates nothing.

use std::cell::Cell;
use std::collections::VecDeque;

use hashbrown::HashTable;

use super::KeyRef;

/// Most uses an entry's counter records (S3-FIFO's two-bit counter): an entry in main at the
/// front of its queue goes round at most this many times without a use.
const MAX_FREQ: u8 = 3;
/// Small gets one part in `SMALL_SHARE` of the budget (the paper's 10%).
const SMALL_SHARE: u64 = 10;
/// The heaviest entry stored, in hundredths of the budget (as the `quick_cache` store this
/// replaces: an entry that would leave almost nothing else is not stored).
const MAX_ENTRY_PERCENT: u64 = 97;
/// Removed entries whose slot numbers wait in the queues, past which (and past the number of
/// live entries) the queues are swept: removals never make the queues or the slab grow
/// without bound.
const COMPACT_FLOOR: usize = 64;
/// Least expected entries the tables are sized for.
const MIN_ITEMS: usize = 16;
/// Most slots: slot numbers are `u32`.
const MAX_SLOTS: usize = u32::MAX as usize;
/// [`Slot::bucket`] when the index's bucket is not known.
const NO_BUCKET: u32 = u32::MAX;
/// Largest budget (so that the budget plus an entry's weight never overflows).
const MAX_BUDGET: u64 = u64::MAX / 2;

/// A key in the store: its bytes and their hash ([`KeyRef::hash`]). The bytes are a vector so
/// that an evicted key's allocation can hold the next stored one; its capacity is what the
/// entry's weight counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StoreKey {
    pub(crate) hash: u64,
    pub(crate) bytes: Vec<u8>,
}

/// One slot of the slab.
struct Slot<V> {
    /// `None`: free (its number is on the free list), or removed while its number still
    /// waits in a queue (freed when the queue reaches it or is swept).
    live: Option<(StoreKey, V)>,
    /// What the entry counts against the budget (never 0).
    weight: u64,
    /// Where the index put the slot's number when it went in ([`NO_BUCKET`]: unknown): a
    /// hint that spares a probe when the entry leaves, checked before use (the index moves
    /// its entries when it grows or tidies itself).
    bucket: u32,
    /// Uses since it entered its queue or was last passed over (at most [`MAX_FREQ`]).
    freq: Cell<u8>,
    /// In main (else in small).
    main: bool,
}

/// The store: see the module's documentation.
pub(crate) struct Store<V> {
    /// Slot numbers of the live entries, by their keys' hashes.
    index: HashTable<u32>,
    slots: Vec<Slot<V>>,
    /// Numbers of free slots.
    free: Vec<u32>,
    /// Slot numbers in small and in main, oldest first. Every live entry is in exactly one;
    /// a removed one stays until it reaches the front or a sweep.
    small: VecDeque<u32>,
    main: VecDeque<u32>,
    /// Tags of hashes that left small unused (0: none), indexed by the hash's low bits.
    ghost: Box<[u32]>,
    ghost_mask: usize,
    budget: u64,
    max_entry: u64,
    small_target: u64,
    small_weight: u64,
    main_weight: u64,
    len: usize,
    /// Removed entries whose numbers are still in a queue.
    dead: usize,
    /// Where the index's control bytes begin (0 until its first insert), for the prefetches
    /// of [`Store::prefetch_insert`]: worked out at each insert from the bucket the index put
    /// the new entry in and the address of its value, as hashbrown lays a table out (each
    /// bucket's value `(b + 1) * 4` bytes below the control bytes, its control byte `b` above).
    /// Only ever used as a hint: a wrong one costs a useless prefetch, never a wrong result.
    ctrl_at: usize,
}

impl<V> Store<V> {
    /// A store for about `items` entries (the tables' first size, and the ghost table's) of
    /// at most `budget` bytes in all.
    pub(crate) fn new(items: usize, budget: u64) -> Store<V> {
        let items = items.max(MIN_ITEMS);
        let budget = budget.min(MAX_BUDGET);
        let ghost_len = items.checked_next_power_of_two().unwrap_or(1 << 30);
        // In hundredths, exact for any budget (a u64 split so that nothing overflows).
        let max_entry =
            (budget / 100) * MAX_ENTRY_PERCENT + (budget % 100) * MAX_ENTRY_PERCENT / 100;
        Store {
            index: HashTable::with_capacity(items),
            slots: Vec::with_capacity(items),
            free: Vec::with_capacity(MIN_ITEMS),
            small: VecDeque::with_capacity(items),
            main: VecDeque::with_capacity(items),
            ghost: vec![0; ghost_len].into_boxed_slice(),
            ghost_mask: ghost_len - 1,
            budget,
            max_entry: max_entry.clamp(budget.min(1), budget),
            small_target: (budget / SMALL_SHARE).max(1),
            small_weight: 0,
            main_weight: 0,
            len: 0,
            dead: 0,
            ctrl_at: 0,
        }
    }

    /// Live entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// What the live entries weigh in all (at most the budget).
    pub(crate) fn weight(&self) -> u64 {
        self.small_weight + self.main_weight
    }

    /// The value stored under `key`, counted as a use.
    pub(crate) fn get(&self, key: KeyRef<'_>) -> Option<&V> {
        let slot = self.slots.get(self.find(key)? as usize)?;
        slot.freq.set((slot.freq.get() + 1).min(MAX_FREQ));
        slot.live.as_ref().map(|(_, v)| v)
    }

    /// The value stored under `key`, not counted as a use.
    pub(crate) fn peek(&self, key: KeyRef<'_>) -> Option<&V> {
        let slot = self.slots.get(self.find(key)? as usize)?;
        slot.live.as_ref().map(|(_, v)| v)
    }

    /// Every live entry, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&StoreKey, &V)> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.live.as_ref().map(|(k, v)| (k, v)))
    }

    /// Stores `value` under `key`, weighing `weight` bytes plus the key's capacity (at least
    /// 1 in all); a use of the key when it was stored already. Entries leave to make room
    /// (before a new key goes in: the new entry has the priority). Returns the first entry
    /// this displaced: the key's former one when it had one, else the first evicted for
    /// room, else the new entry itself when it is too heavy to store (then the key's former
    /// entry goes too); every other displaced entry is dropped here.
    pub(crate) fn insert(&mut self, key: StoreKey, value: V, weight: u64) -> Option<(StoreKey, V)> {
        let weight = weigh(&key, weight);
        let found = self.find_absent(KeyRef {
            hash: key.hash,
            bytes: &key.bytes,
        });
        if found.is_some() || weight > self.max_entry {
            std::hint::cold_path();
            return self.insert_again_or_refuse(found, key, value, weight);
        }
        if let Some(i) = self.sole_victim(weight) {
            return self.insert_over(i, key, value, weight);
        }
        self.insert_new(key, value, weight)
    }

    /// The slot of the entry the next eviction takes when the store needs room for `room`
    /// more bytes and that one eviction makes it (the usual insert once the store is full:
    /// an entry alike the one it displaces); `None` otherwise.
    #[inline(always)]
    fn sole_victim(&self, room: u64) -> Option<u32> {
        // No overflow: the weight is at most the budget, the budget and `room` at most
        // `MAX_BUDGET`.
        let needed = self.weight() + room;
        if needed <= self.budget {
            return None;
        }
        let i = self.front()?;
        let slot = self.slots.get(i as usize)?;
        // (Its weight is part of the store's: no underflow.)
        let usual =
            slot.freq.get() == 0 && slot.live.is_some() && needed - slot.weight <= self.budget;
        usual.then_some(i)
    }

    /// [`Store::insert`] of a new key when evicting live slot `i`, the front of the queue the
    /// next eviction takes from ([`Store::sole_victim`]), makes the room: that eviction, then
    /// the new entry in the slot it empties (what evicting and then storing into the free
    /// slot does, without the free list, and with the evicted entry moved out once).
    #[inline(always)]
    fn insert_over(
        &mut self,
        i: u32,
        key: StoreKey,
        value: V,
        weight: u64,
    ) -> Option<(StoreKey, V)> {
        let from_small = self.takes_from_small();
        let Some((old_hash, old_weight, bucket, was_main)) = self
            .slots
            .get(i as usize)
            .and_then(|s| Some((s.live.as_ref()?.0.hash, s.weight, s.bucket, s.main)))
        else {
            // (Not reached: `sole_victim` found it live.)
            return self.insert_new(key, value, weight);
        };
        // The eviction (as `evict_one` makes it), but for the slot, which the new entry takes.
        if from_small {
            self.small.pop_front();
            self.ghost_put(old_hash);
        } else {
            self.main.pop_front();
        }
        let sum = if was_main {
            &mut self.main_weight
        } else {
            &mut self.small_weight
        };
        *sum -= old_weight;
        self.unindex(old_hash, i, bucket);
        // The new entry (as `slot_for` writes it); the count of entries stays.
        let hash = key.hash;
        let main = self.ghost_take(hash);
        let slot = &mut self.slots[i as usize];
        let evicted = slot.live.replace((key, value));
        slot.weight = weight;
        slot.bucket = NO_BUCKET;
        slot.freq.set(0);
        slot.main = main;
        let (queue, sum) = if main {
            (&mut self.main, &mut self.main_weight)
        } else {
            (&mut self.small, &mut self.small_weight)
        };
        queue.push_back(i);
        *sum += weight;
        self.index_slot(hash, i);
        self.prefetch_next_victim();
        evicted
    }

    /// [`Store::insert`] of a new key in every other case: while the store fills (no room to
    /// make), when room takes more than one eviction, or when the queue's front is passed over.
    #[inline(never)]
    fn insert_new(&mut self, key: StoreKey, value: V, weight: u64) -> Option<(StoreKey, V)> {
        let first = self.evict_to(weight);
        let hash = key.hash;
        let main = self.ghost_take(hash);
        if let Some(i) = self.slot_for(key, value, weight, main) {
            self.index_slot(hash, i);
        }
        // (`None`: past `MAX_SLOTS`, entries of a byte each in a budget of over 4 GiB.)
        self.prefetch_next_victim();
        first
    }

    /// Whether the next eviction takes from small: while small holds more than its share, or
    /// main holds nothing.
    #[inline(always)]
    fn takes_from_small(&self) -> bool {
        !self.small.is_empty() && (self.small_weight > self.small_target || self.main_weight == 0)
    }

    /// The slot number the next eviction most likely empties: the front of the queue it takes
    /// from (an entry there with uses left is passed over instead; this does not look past it).
    fn front(&self) -> Option<u32> {
        if self.takes_from_small() {
            self.small.front().copied()
        } else {
            self.main.front().copied()
        }
    }

    /// Brings in the slot [`Store::front`] names (not read here: [`Store::victim_slot`] reads
    /// it, from `WorkerCache::prefetch_store`, which then brings in what the slot points to).
    #[inline]
    fn prefetch_next_victim(&self) {
        if let Some(slot) = self.front().and_then(|i| self.slots.get(i as usize)) {
            super::prefetch_of(std::ptr::from_ref(slot));
        }
    }

    /// Brings in what storing a new key hashed `hash` will read and write in the store's own
    /// tables, each line at a random place in them: the ghost table's slots (the new key's,
    /// read by `ghost_take`, and, when the next eviction takes from small, its entry's, written
    /// by `ghost_put`), the index's control group and values where the new key's probe
    /// starts (read for a former entry, then written), and the index's control byte and value
    /// of the entry the next eviction most likely takes (read and written as it leaves the
    /// index). Returns the value of [`Store::victim_slot`]'s entry, for the caller to bring in
    /// what it points to.
    ///
    /// Called when a miss's response head has arrived: its analysis and the insert follow
    /// with no wait between, so the lines arrive while the analysis runs. (Called at the
    /// lookup instead, they were gone again by the insert: while the fetch waits, the other
    /// connections' requests run.)
    #[inline]
    pub(crate) fn prefetch_insert(&self, hash: u64) -> Option<&V> {
        // (Each a u32, aligned to its size: one line.)
        let ghost = |h: u64| {
            self.ghost
                .as_ptr()
                .wrapping_add(h as usize & self.ghost_mask)
        };
        super::prefetch_line(ghost(hash).cast());
        let ctrl = self.ctrl_at;
        // A probe starts at the group of `Group::WIDTH` (16 on x86-64) control bytes at the
        // hash's bucket (hashbrown's `h1`: the hash's low bits); the values of those buckets
        // lie below the control bytes, the group's first bucket's highest.
        let mask = self.index.num_buckets().wrapping_sub(1);
        let pos = hash as usize & mask;
        if ctrl != 0 {
            super::prefetch_line(ctrl.wrapping_add(pos) as *const u8);
            super::prefetch_line(ctrl.wrapping_add(pos + 15) as *const u8);
            let values_end = ctrl.wrapping_sub(pos.wrapping_mul(4));
            super::prefetch_line(values_end.wrapping_sub(4) as *const u8);
            super::prefetch_line(values_end.wrapping_sub(64) as *const u8);
        }
        let slot = self.victim_slot()?;
        let (k, v) = slot.live.as_ref()?;
        if !slot.main {
            super::prefetch_line(ghost(k.hash).cast());
        }
        if ctrl != 0 && slot.bucket != NO_BUCKET {
            let b = slot.bucket as usize;
            super::prefetch_line(ctrl.wrapping_add(b) as *const u8);
            super::prefetch_line(ctrl.wrapping_sub((b + 1).wrapping_mul(4)) as *const u8);
        }
        Some(v)
    }

    /// The slot of the live entry the next eviction most likely takes (see [`Store::front`]);
    /// `None` when that slot's entry was removed, or has uses left (it would be passed over),
    /// or the store is empty. Changes nothing.
    fn victim_slot(&self) -> Option<&Slot<V>> {
        let slot = self.slots.get(self.front()? as usize)?;
        (slot.freq.get() == 0 && slot.live.is_some()).then_some(slot)
    }

    /// The entry of [`Store::victim_slot`] (what [`Store::prefetch_insert`] predicts, for the
    /// model test to check).
    #[cfg(test)]
    pub(crate) fn next_victim(&self) -> Option<(&StoreKey, &V)> {
        self.victim_slot()?.live.as_ref().map(|(k, v)| (k, v))
    }

    /// Replaces the value under `key` when one is stored: a use of the key unless `soft`.
    /// `Err` with `key` and `value` when none is stored, or when the new entry is too heavy
    /// to store (the key's former entry is then removed). What this displaces is dropped.
    pub(crate) fn replace(
        &mut self,
        key: StoreKey,
        value: V,
        weight: u64,
        soft: bool,
    ) -> Result<(), (StoreKey, V)> {
        let weight = weigh(&key, weight);
        let Some(i) = self.find(KeyRef {
            hash: key.hash,
            bytes: &key.bytes,
        }) else {
            return Err((key, value));
        };
        if weight > self.max_entry {
            drop(self.remove_at(i));
            return Err((key, value));
        }
        drop(self.reinsert(i, key, value, weight, !soft));
        Ok(())
    }

    /// Removes the entry under `key`, returning it.
    pub(crate) fn remove(&mut self, key: KeyRef<'_>) -> Option<(StoreKey, V)> {
        let i = self.find(key)?;
        self.remove_at(i)
    }

    /// The slot number of `key`'s live entry.
    #[inline]
    fn find(&self, key: KeyRef<'_>) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(key.hash, |&i| {
                slots
                    .get(i as usize)
                    .and_then(|s| s.live.as_ref())
                    .is_some_and(|(k, _)| k.hash == key.hash && k.bytes == key.bytes)
            })
            .copied()
    }

    /// [`Store::find`] for a key most likely not stored (a new key going in): the index's
    /// candidates of the same tag, rare, are compared out of the usual path's code lines.
    #[inline(always)]
    fn find_absent(&self, key: KeyRef<'_>) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(key.hash, |&i| {
                std::hint::cold_path();
                slots
                    .get(i as usize)
                    .and_then(|s| s.live.as_ref())
                    .is_some_and(|(k, _)| k.hash == key.hash && k.bytes == key.bytes)
            })
            .copied()
    }

    /// [`Store::insert`] of a key stored already (`found`), or of an entry too heavy to store
    /// (the key's former entry goes too; the first of the two is returned).
    #[inline(never)]
    fn insert_again_or_refuse(
        &mut self,
        found: Option<u32>,
        key: StoreKey,
        value: V,
        weight: u64,
    ) -> Option<(StoreKey, V)> {
        if weight <= self.max_entry {
            if let Some(i) = found {
                return self.reinsert(i, key, value, weight, true);
            }
        }
        match found.and_then(|i| self.remove_at(i)) {
            Some(former) => Some(former),
            None => Some((key, value)),
        }
    }

    /// Stores a new value for live slot `i`'s key with the priority a new key has (room is
    /// made before it goes in, so that it is not the one evicted): out of its slot, then in a
    /// new one at the back of the same queue, its uses kept (one more when `used`). Returns
    /// the former entry; what is evicted for room is dropped.
    fn reinsert(
        &mut self,
        i: u32,
        key: StoreKey,
        value: V,
        weight: u64,
        used: bool,
    ) -> Option<(StoreKey, V)> {
        let slot = self.slots.get(i as usize)?;
        let (main, freq) = (slot.main, slot.freq.get());
        let former = self.remove_at(i);
        drop(self.evict_to(weight));
        let hash = key.hash;
        if let Some(j) = self.slot_for(key, value, weight, main) {
            let freq = if used { (freq + 1).min(MAX_FREQ) } else { freq };
            self.slots[j as usize].freq.set(freq);
            self.index_slot(hash, j);
        }
        former
    }

    /// A slot holding a new entry, at the back of main or small; `None` past [`MAX_SLOTS`].
    #[inline(always)]
    fn slot_for(&mut self, key: StoreKey, value: V, weight: u64, main: bool) -> Option<u32> {
        let i = match self.free.pop() {
            Some(i) => {
                // Written in place (a free slot holds nothing to drop).
                let slot = self.slots.get_mut(i as usize)?;
                slot.live = Some((key, value));
                slot.weight = weight;
                slot.bucket = NO_BUCKET;
                slot.freq.set(0);
                slot.main = main;
                i
            }
            None => self.new_slot(key, value, weight, main)?,
        };
        // One push and one sum for either queue (one copy of their code).
        let (queue, sum) = if main {
            (&mut self.main, &mut self.main_weight)
        } else {
            (&mut self.small, &mut self.small_weight)
        };
        queue.push_back(i);
        *sum += weight;
        self.len += 1;
        Some(i)
    }

    /// [`Store::slot_for`] when no slot is free: a new one at the slab's end (while the
    /// store fills; once full, every insert finds the slot its eviction freed).
    #[cold]
    #[inline(never)]
    fn new_slot(&mut self, key: StoreKey, value: V, weight: u64, main: bool) -> Option<u32> {
        if self.slots.len() >= MAX_SLOTS {
            return None;
        }
        self.slots.push(Slot {
            live: Some((key, value)),
            weight,
            bucket: NO_BUCKET,
            freq: Cell::new(0),
            main,
        });
        Some((self.slots.len() - 1) as u32)
    }

    /// Evicts until `room` more bytes fit in the budget; returns the first entry evicted (the
    /// others are dropped).
    fn evict_to(&mut self, room: u64) -> Option<(StoreKey, V)> {
        let mut first = None;
        // No overflow: the weight is at most the budget, the budget and `room` at most
        // `MAX_BUDGET`.
        while self.weight() + room > self.budget {
            match self.evict_one() {
                Some(e) if first.is_none() => first = Some(e),
                Some(e) => drop(e),
                None => break,
            }
        }
        first
    }

    /// Evicts one entry (S3-FIFO): from small while it holds more than its share (or main
    /// holds nothing), else from main. `None` when the store is empty.
    #[inline(always)]
    fn evict_one(&mut self) -> Option<(StoreKey, V)> {
        loop {
            let from_small = self.takes_from_small();
            let i = if from_small {
                self.small.pop_front()
            } else {
                self.main.pop_front()
            }?;
            let Some(slot) = self.slots.get_mut(i as usize) else {
                continue;
            };
            let Some((key, _)) = &slot.live else {
                // Removed before it reached the front: its slot is free now.
                self.dead -= 1;
                self.free.push(i);
                continue;
            };
            let freq = slot.freq.get();
            if from_small {
                if freq > 0 {
                    // Used in small: to main, its uses spent on the move.
                    slot.freq.set(0);
                    slot.main = true;
                    self.small_weight -= slot.weight;
                    self.main_weight += slot.weight;
                    self.main.push_back(i);
                    continue;
                }
                let hash = key.hash;
                self.ghost_put(hash);
            } else if freq > 0 {
                slot.freq.set(freq - 1);
                self.main.push_back(i);
                continue;
            }
            return self.take(i);
        }
    }

    /// Takes live slot `i`'s entry out of the slot, the weights, the count and the index
    /// (what [`Store::take`] and [`Store::remove_at`] both do; the slot's number is theirs).
    #[inline(always)]
    fn vacate(&mut self, i: u32) -> Option<(StoreKey, V)> {
        let slot = self.slots.get_mut(i as usize)?;
        let (key, value) = slot.live.take()?;
        let sum = if slot.main {
            &mut self.main_weight
        } else {
            &mut self.small_weight
        };
        *sum -= slot.weight;
        self.len -= 1;
        let bucket = slot.bucket;
        self.unindex(key.hash, i, bucket);
        Some((key, value))
    }

    /// Empties live slot `i`, out of its queue already, onto the free list.
    #[inline(always)]
    fn take(&mut self, i: u32) -> Option<(StoreKey, V)> {
        let taken = self.vacate(i)?;
        self.free.push(i);
        Some(taken)
    }

    /// Removes live slot `i`, still in its queue: its number stays there until the queue
    /// reaches it or a sweep frees it.
    fn remove_at(&mut self, i: u32) -> Option<(StoreKey, V)> {
        let (key, value) = self.vacate(i)?;
        self.dead += 1;
        if self.dead > COMPACT_FLOOR && self.dead > self.len {
            self.sweep();
        }
        Some((key, value))
    }

    /// Puts slot `i` (live, its key hashed `hash`) in the index, noting its bucket.
    #[inline(always)]
    fn index_slot(&mut self, hash: u64, i: u32) {
        let buckets = self.index.num_buckets();
        let slots = &self.slots;
        // Grown as soon as it is half full (7/16 of its buckets: half of the 7/8 it fills),
        // not later. The index marks removed entries deleted; when those use up its free room
        // it tidies itself in place if at most half full, else grows. A store that has filled
        // its budget inserts and evicts forever at about one size: grown here, its index
        // stays under half full and never allocates again, where it would otherwise grow at
        // some later insert, whenever its deleted marks ran out (a full store's stored miss
        // allocates nothing: tests/allocations.rs).
        let live = self.index.len();
        if live.saturating_mul(16) >= buckets.saturating_mul(7) {
            std::hint::cold_path();
            self.index.reserve(live + 1, |j| hash_of(slots, j));
        }
        let e = self.index.insert_unique(hash, i, |j| hash_of(slots, j));
        let at = e.bucket_index();
        self.ctrl_at = ctrl_of(std::ptr::from_ref(e.get()), at);
        if self.index.num_buckets() != buckets {
            // The index grew: every entry moved.
            self.note_buckets();
        } else if let Some(slot) = self.slots.get_mut(i as usize) {
            slot.bucket = u32::try_from(at).unwrap_or(NO_BUCKET);
        }
    }

    /// Notes every live slot's bucket anew (after the index grew, which moves them all; as
    /// costly as the growth itself, and as rare).
    #[cold]
    fn note_buckets(&mut self) {
        for at in self.index.iter_buckets() {
            let Some(&i) = self.index.get_bucket(at) else {
                continue;
            };
            if let Some(slot) = self.slots.get_mut(i as usize) {
                slot.bucket = u32::try_from(at).unwrap_or(NO_BUCKET);
            }
        }
    }

    /// Takes slot `i` (its key hashed `hash`) out of the index: at `bucket` when it is still
    /// there, else found by its hash.
    #[inline(always)]
    fn unindex(&mut self, hash: u64, i: u32, bucket: u32) {
        let at = bucket as usize;
        if self.index.get_bucket(at) == Some(&i) {
            if let Ok(e) = self.index.get_bucket_entry(at) {
                e.remove();
                return;
            }
        }
        self.unindex_by_hash(hash, i);
    }

    /// [`Store::unindex`] when the slot's bucket moved (the index grew or tidied itself
    /// since the slot went in): found by its hash.
    #[cold]
    #[inline(never)]
    fn unindex_by_hash(&mut self, hash: u64, i: u32) {
        if let Ok(e) = self.index.find_entry(hash, |&j| j == i) {
            e.remove();
        }
    }

    /// Drops the numbers of removed entries from the queues, freeing their slots.
    #[cold]
    fn sweep(&mut self) {
        let (slots, free) = (&self.slots, &mut self.free);
        let mut keep = |i: &u32| {
            let live = slots.get(*i as usize).is_some_and(|s| s.live.is_some());
            if !live {
                free.push(*i);
            }
            live
        };
        self.small.retain(&mut keep);
        self.main.retain(&mut keep);
        self.dead = 0;
    }

    #[inline]
    fn ghost_put(&mut self, hash: u64) {
        let at = hash as usize & self.ghost_mask;
        self.ghost[at] = ghost_tag(hash);
    }

    /// Whether `hash` left small unused lately (forgotten once asked).
    #[inline]
    fn ghost_take(&mut self, hash: u64) -> bool {
        let at = hash as usize & self.ghost_mask;
        let seen = self.ghost[at] == ghost_tag(hash);
        if seen {
            self.ghost[at] = 0;
        }
        seen
    }
}

/// An entry's weight: `weight` plus its key's capacity, never 0 (a 0-weight entry would never
/// make room).
fn weigh(key: &StoreKey, weight: u64) -> u64 {
    weight.saturating_add(key.bytes.capacity() as u64).max(1)
}

/// The ghost table's tag of `hash`: its high half (the low bits choose the slot), never 0.
fn ghost_tag(hash: u64) -> u32 {
    (hash >> 32) as u32 | 1
}

/// The hash of slot `i`'s key, for the index to move it when it grows (only live slots are in
/// the index).
/// Where the index's control bytes begin, from the address of bucket `at`'s value (see
/// [`Store::ctrl_at`]).
#[inline(always)]
fn ctrl_of(value: *const u32, at: usize) -> usize {
    (value as usize).wrapping_add(at.wrapping_add(1).wrapping_mul(std::mem::size_of::<u32>()))
}

fn hash_of<V>(slots: &[Slot<V>], i: &u32) -> u64 {
    slots
        .get(*i as usize)
        .and_then(|s| s.live.as_ref())
        .map_or(0, |(k, _)| k.hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::rc::{Rc, Weak};

    /// A stored value: which key it went in under and its version, the weight it was given.
    #[derive(Debug)]
    struct Val {
        key: Vec<u8>,
        version: u64,
        weight: u64,
    }

    /// Keys: short byte strings; with `collide`, many share one hash.
    fn key_bytes(n: u8) -> Vec<u8> {
        format!("k{n}").into_bytes()
    }

    fn hash_of_key(bytes: &[u8], collide: bool) -> u64 {
        if collide {
            // Three hashes for every key: equal hashes, different bytes.
            return bytes.iter().map(|b| u64::from(*b)).sum::<u64>() % 3;
        }
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
    }

    fn store_key(bytes: &[u8], collide: bool, room: usize) -> StoreKey {
        let mut v = Vec::with_capacity(bytes.len() + room);
        v.extend_from_slice(bytes);
        StoreKey {
            hash: hash_of_key(bytes, collide),
            bytes: v,
        }
    }

    fn key_ref(bytes: &[u8], collide: bool) -> KeyRef<'_> {
        KeyRef {
            hash: hash_of_key(bytes, collide),
            bytes,
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert { key: u8, weight: u64, room: usize },
        Replace { key: u8, weight: u64, soft: bool },
        Get(u8),
        Peek(u8),
        Remove(u8),
    }

    fn op(keys: u8, max_weight: u64) -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..keys, 0..max_weight, 0usize..4)
                .prop_map(|(key, weight, room)| Op::Insert { key, weight, room }),
            1 => (0..keys, 0..max_weight, any::<bool>())
                .prop_map(|(key, weight, soft)| Op::Replace { key, weight, soft }),
            3 => (0..keys).prop_map(Op::Get),
            1 => (0..keys).prop_map(Op::Peek),
            1 => (0..keys).prop_map(Op::Remove),
        ]
    }

    /// What the store holds, checked against the model: `newest[key]` is the version last put
    /// under `key` (`None` once removed).
    fn check(
        s: &Store<Rc<Val>>,
        budget: u64,
        newest: &HashMap<Vec<u8>, Option<u64>>,
        made: &[Weak<Val>],
    ) -> Result<(), TestCaseError> {
        prop_assert!(s.weight() <= budget, "{} > {budget}", s.weight());
        let mut n = 0;
        let mut weight = 0;
        for (k, v) in s.iter() {
            n += 1;
            weight += (v.weight + k.bytes.capacity() as u64).max(1);
            prop_assert_eq!(&k.bytes, &v.key, "a value under another key");
            prop_assert_eq!(
                newest.get(&k.bytes).copied().flatten(),
                Some(v.version),
                "not the newest value of {:?}",
                k.bytes
            );
        }
        prop_assert_eq!(n, s.len());
        prop_assert_eq!(
            s.index.len(),
            s.len(),
            "the index holds exactly the live entries"
        );
        prop_assert_eq!(weight, s.weight());
        // Every live slot is in exactly one queue; a removed one at most once.
        let mut queued = vec![0u32; s.slots.len()];
        for &i in s.small.iter().chain(s.main.iter()) {
            queued[i as usize] += 1;
        }
        for (i, slot) in s.slots.iter().enumerate() {
            let want = u32::from(slot.live.is_some());
            prop_assert!(
                queued[i] == want || (want == 0 && queued[i] <= 1),
                "slot {} queued {} times",
                i,
                queued[i]
            );
        }
        prop_assert!(
            s.free.iter().all(|&i| queued[i as usize] == 0),
            "a free slot in a queue"
        );
        // Each queue's weight is that of its live entries.
        let of = |q: &VecDeque<u32>, main: bool| -> Result<u64, TestCaseError> {
            let mut w = 0;
            for &i in q {
                let slot = &s.slots[i as usize];
                if slot.live.is_some() {
                    prop_assert_eq!(slot.main, main);
                    w += slot.weight;
                }
            }
            Ok(w)
        };
        prop_assert_eq!(of(&s.small, false)?, s.small_weight);
        prop_assert_eq!(of(&s.main, true)?, s.main_weight);
        // The test keeps no value: what is alive is what the store holds, each once.
        let alive: Vec<Rc<Val>> = made.iter().filter_map(Weak::upgrade).collect();
        prop_assert_eq!(alive.len(), s.len(), "a value leaked or was dropped early");
        for v in &alive {
            // The store's reference and this one.
            prop_assert_eq!(Rc::strong_count(v), 2);
        }
        Ok(())
    }

    fn run(ops: Vec<Op>, budget: u64, collide: bool) -> Result<(), TestCaseError> {
        let mut s: Store<Rc<Val>> = Store::new(4, budget);
        let mut newest: HashMap<Vec<u8>, Option<u64>> = HashMap::new();
        let mut made: Vec<Weak<Val>> = Vec::new();
        let mut version = 0u64;
        let mut value = |key: &[u8], weight: u64, made: &mut Vec<Weak<Val>>| {
            version += 1;
            let v = Rc::new(Val {
                key: key.to_vec(),
                version,
                weight,
            });
            made.push(Rc::downgrade(&v));
            v
        };
        for op in ops {
            match op {
                Op::Insert { key, weight, room } => {
                    let bytes = key_bytes(key);
                    let v = value(&bytes, weight, &mut made);
                    let former = newest.get(&bytes).copied().flatten();
                    let was_there = s.peek(key_ref(&bytes, collide)).is_some();
                    let new_version = v.version;
                    newest.insert(bytes.clone(), Some(new_version));
                    // What the caches are told to bring in for the next eviction.
                    let victim = s.next_victim().map(|(k, _)| k.bytes.clone());
                    let w = (weight + (bytes.len() + room) as u64).max(1);
                    let out = s.insert(store_key(&bytes, collide, room), v, weight);
                    if let Some((k, v)) = out {
                        prop_assert_eq!(&k.bytes, &v.key);
                        if was_there {
                            // The key's own former entry comes back first.
                            prop_assert_eq!(&k.bytes, &bytes);
                            prop_assert_eq!(Some(v.version), former);
                        } else if let Some(victim) =
                            victim.filter(|_| w * 100 <= budget * MAX_ENTRY_PERCENT)
                        {
                            // A new key stored by evicting: the first evicted is the one
                            // `next_victim` named.
                            prop_assert_eq!(&k.bytes, &victim);
                        }
                    }
                    let stored = s.peek(key_ref(&bytes, collide)).map(|v| v.version);
                    if w * 100 <= budget * MAX_ENTRY_PERCENT {
                        // Light enough: stored, with priority over what was there.
                        prop_assert_eq!(stored, Some(new_version));
                    } else {
                        prop_assert_eq!(stored, None, "too heavy, yet stored");
                    }
                }
                Op::Replace { key, weight, soft } => {
                    let bytes = key_bytes(key);
                    let v = value(&bytes, weight, &mut made);
                    let new_version = v.version;
                    let was_there = s.peek(key_ref(&bytes, collide)).is_some();
                    match s.replace(store_key(&bytes, collide, 0), v, weight, soft) {
                        Ok(()) => {
                            prop_assert!(was_there);
                            newest.insert(bytes.clone(), Some(new_version));
                        }
                        Err((k, v)) => {
                            prop_assert_eq!(v.version, new_version);
                            prop_assert_eq!(&k.bytes, &bytes);
                            if s.peek(key_ref(&bytes, collide)).is_none() {
                                newest.insert(bytes.clone(), None);
                            }
                        }
                    }
                }
                Op::Get(key) => {
                    let bytes = key_bytes(key);
                    if let Some(v) = s.get(key_ref(&bytes, collide)) {
                        prop_assert_eq!(&v.key, &bytes);
                        prop_assert_eq!(Some(v.version), newest[&bytes]);
                    }
                }
                Op::Peek(key) => {
                    let bytes = key_bytes(key);
                    if let Some(v) = s.peek(key_ref(&bytes, collide)) {
                        prop_assert_eq!(&v.key, &bytes);
                        prop_assert_eq!(Some(v.version), newest[&bytes]);
                    }
                }
                Op::Remove(key) => {
                    let bytes = key_bytes(key);
                    let out = s.remove(key_ref(&bytes, collide));
                    if let Some((k, v)) = &out {
                        prop_assert_eq!(&k.bytes, &bytes);
                        prop_assert_eq!(Some(v.version), newest[&bytes]);
                    }
                    newest.insert(bytes.clone(), None);
                    prop_assert!(s.peek(key_ref(&bytes, collide)).is_none());
                }
            }
            check(&s, budget, &newest, &made)?;
        }
        drop(s);
        prop_assert!(
            made.iter().all(|w| w.upgrade().is_none()),
            "a value outlived the store"
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn the_store_holds_the_newest_values_within_its_budget(
            ops in prop::collection::vec(op(24, 40), 1..300),
            budget in 1u64..200,
            collide in any::<bool>(),
        ) {
            run(ops, budget, collide)?;
        }

        #[test]
        fn many_removals_keep_the_store_consistent(
            ops in prop::collection::vec(
                prop_oneof![
                    1 => (0u8..200, 0u64..8).prop_map(|(key, weight)| Op::Insert { key, weight, room: 0 }),
                    1 => (0u8..200).prop_map(Op::Remove),
                    1 => (0u8..200).prop_map(Op::Get),
                ],
                1..600,
            ),
            collide in any::<bool>(),
        ) {
            run(ops, 4096, collide)?;
        }
    }

    #[test]
    fn a_hot_set_survives_a_scan_of_one_time_keys() {
        // Keys of 8 bytes, weight 8 each: 100 fit.
        let mut s: Store<u32> = Store::new(100, 800);
        let key = |n: u32| format!("{n:08}").into_bytes();
        let k = |n: u32| StoreKey {
            hash: hash_of_key(&key(n), false),
            bytes: key(n),
        };
        for n in 0..10 {
            s.insert(k(n), n, 0);
        }
        for _ in 0..2 {
            for n in 0..10 {
                assert_eq!(s.get(key_ref(&key(n), false)), Some(&n));
            }
        }
        // A scan far longer than the store, each key once.
        for n in 1000..21_000 {
            s.insert(k(n), n, 0);
            assert!(s.weight() <= 800);
        }
        for n in 0..10 {
            assert_eq!(
                s.peek(key_ref(&key(n), false)),
                Some(&n),
                "hot key {n} lost"
            );
        }
        // The store is full of the scan otherwise.
        assert_eq!(s.len(), 100);
        // A FIFO (all in small) would have lost them: the first scanned keys are gone.
        assert!(s.peek(key_ref(&key(1000), false)).is_none());
    }

    #[test]
    fn a_key_stored_again_soon_after_it_left_unused_goes_to_main() {
        let mut s: Store<u32> = Store::new(16, 100);
        let k = |n: u8| StoreKey {
            hash: u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            bytes: vec![n],
        };
        let r = |n: u8| (u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15), [n]);
        // Weight 10 each (9 + a key of 1 byte): ten fit.
        for n in 0..10 {
            assert!(s.insert(k(n), u32::from(n), 9).is_none());
        }
        // The eleventh evicts the oldest, unused: handed back.
        let (gone, v) = s.insert(k(10), 10, 9).expect("one evicted");
        assert_eq!((gone.bytes, v), (vec![0], 0));
        let (h, b) = r(0);
        assert!(s.peek(KeyRef { hash: h, bytes: &b }).is_none());
        // Stored again: into main, straight from the ghost table.
        s.insert(k(0), 0, 9);
        let i = s.find(KeyRef { hash: h, bytes: &b }).expect("stored");
        assert!(s.slots[i as usize].main);
        // A key never seen starts in small.
        s.insert(k(20), 20, 9);
        let (h, b) = r(20);
        let i = s.find(KeyRef { hash: h, bytes: &b }).expect("stored");
        assert!(!s.slots[i as usize].main);
    }

    #[test]
    fn an_entry_too_heavy_is_not_stored_and_takes_its_key_former_entry() {
        let mut s: Store<u32> = Store::new(16, 1000);
        let k = || StoreKey {
            hash: 1,
            bytes: b"k".to_vec(),
        };
        let r = KeyRef {
            hash: 1,
            bytes: b"k",
        };
        // 969 + 1: 97% of the budget, stored.
        assert!(s.insert(k(), 1, 969).is_none());
        assert_eq!(s.peek(r), Some(&1));
        // 970 + 1: over, refused; the key's former entry comes back and is gone.
        let (_, v) = s.insert(k(), 2, 970).expect("displaced");
        assert_eq!(v, 1);
        assert_eq!((s.len(), s.weight()), (0, 0));
        // With no former entry, the refused one itself comes back.
        let (_, v) = s.insert(k(), 3, 5000).expect("refused");
        assert_eq!(v, 3);
        assert_eq!(s.len(), 0);
        // A replace too heavy: refused, and the former entry removed.
        s.insert(k(), 4, 10);
        assert!(s.replace(k(), 5, 5000, true).is_err());
        assert!(s.peek(r).is_none());
    }

    /// Once full, storing with eviction allocates nothing: the slab, the free list, the
    /// queues and the index keep their allocations (storing a new key per insert, as a stored
    /// miss does).
    #[test]
    fn a_full_store_stores_without_growing() {
        let mut s: Store<u64> = Store::new(16, 10_000);
        let k = |n: u64| StoreKey {
            hash: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            bytes: n.to_le_bytes().to_vec(),
        };
        let sizes = |s: &Store<u64>| {
            (
                s.slots.capacity(),
                s.free.capacity(),
                s.small.capacity(),
                s.main.capacity(),
                s.index.num_buckets(),
            )
        };
        // Weights of 2 to 20 bytes (key included): several evictions for some inserts, none
        // for others; every tenth key is used once, so main fills too.
        let weight = |n: u64| n % 13;
        for n in 0..50_000u64 {
            s.insert(k(n), n, weight(n));
            if n % 10 == 0 {
                let key = n.to_le_bytes();
                s.get(KeyRef {
                    hash: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    bytes: &key,
                });
            }
        }
        let before = sizes(&s);
        assert!(
            s.main_weight > 0 && s.small_weight > 0,
            "both queues in use"
        );
        for n in 50_000..150_000u64 {
            let out = s.insert(k(n), n, weight(n));
            if let Some((key, v)) = out {
                assert_eq!(
                    key.bytes,
                    v.to_le_bytes(),
                    "an entry comes back with its key"
                );
            }
            if n % 10 == 0 {
                let key = n.to_le_bytes();
                s.get(KeyRef {
                    hash: n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    bytes: &key,
                });
            }
            assert!(s.weight() <= 10_000);
        }
        assert_eq!(sizes(&s), before, "nothing grew");
    }

    /// Once full, a new key that one eviction makes room for takes the evicted entry's slot
    /// (from small, its hash to the ghost table; or from main), the others evicting as before.
    #[test]
    fn one_eviction_hands_its_slot_to_the_new_entry() {
        // Weight 10 each (9 + a key of 1 byte): ten fit.
        let mut s: Store<u32> = Store::new(16, 100);
        let k = |n: u8| StoreKey {
            hash: u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            bytes: vec![n],
        };
        let slot_of = |s: &Store<u32>, n: u8| {
            let hash = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            s.find(KeyRef { hash, bytes: &[n] })
        };
        for n in 0..10 {
            assert!(s.insert(k(n), u32::from(n), 9).is_none());
        }
        let slots = s.slots.len();
        for n in 10..30u8 {
            let victim = s.next_victim().map(|(k, v)| (k.bytes.clone(), *v));
            let at = victim.as_ref().and_then(|(b, _)| slot_of(&s, b[0]));
            let (gone, v) = s.insert(k(n), u32::from(n), 9).expect("one evicted");
            assert_eq!(
                Some((gone.bytes.clone(), v)),
                victim,
                "the predicted victim"
            );
            assert_eq!(slot_of(&s, n), at, "its slot, to the new key");
            assert!(slot_of(&s, gone.bytes[0]).is_none());
            assert_eq!((s.len(), s.weight(), s.slots.len()), (10, 100, slots));
            assert!(s.free.is_empty());
        }
        // A key used in small goes to main when it reaches the front: the next eviction passes
        // over it (not the sole-victim path), and it stays.
        let (h, b) = (u64::from(25u8).wrapping_mul(0x9e37_79b9_7f4a_7c15), [25u8]);
        assert_eq!(s.get(KeyRef { hash: h, bytes: &b }), Some(&25));
        for n in 30..50u8 {
            s.insert(k(n), u32::from(n), 9);
            assert!(s.weight() <= 100);
        }
        assert_eq!(s.peek(KeyRef { hash: h, bytes: &b }), Some(&25));
        let i = s.find(KeyRef { hash: h, bytes: &b }).expect("kept");
        assert!(s.slots[i as usize].main);
        // Entries of twice the weight: two evictions each (the general path), the budget kept.
        for n in 50..60u8 {
            s.insert(k(n), u32::from(n), 19);
            assert!(s.weight() <= 100);
            assert!(slot_of(&s, n).is_some());
        }
    }

    #[test]
    fn removals_do_not_grow_the_queues_or_the_slab() {
        let mut s: Store<u32> = Store::new(16, 1 << 20);
        let k = |n: u32| StoreKey {
            hash: u64::from(n),
            bytes: n.to_le_bytes().to_vec(),
        };
        // Far from full: nothing is evicted, every entry leaves by removal.
        for n in 0..100_000u32 {
            s.insert(k(n), n, 10);
            let key = n.to_le_bytes();
            assert!(s
                .remove(KeyRef {
                    hash: u64::from(n),
                    bytes: &key,
                })
                .is_some());
        }
        assert_eq!(s.len(), 0);
        assert!(s.slots.len() <= 2 * COMPACT_FLOOR + 2, "{}", s.slots.len());
        assert!(s.small.len() + s.main.len() <= 2 * COMPACT_FLOOR + 2);
    }

    /// The prefetches of `prefetch_insert` find the index's lines by where hashbrown puts a
    /// bucket's value (`ctrl_at`): checked against the address of every live bucket's value,
    /// through the index's growth and once full and evicting (a hashbrown that lays its
    /// table out otherwise would only make the prefetches useless: this says so).
    #[test]
    fn the_index_layout_the_prefetches_assume_holds() {
        let mut s: Store<u32> = Store::new(16, 4_000);
        let k = |n: u32| StoreKey {
            hash: u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            bytes: n.to_le_bytes().to_vec(),
        };
        for n in 0..3_000u32 {
            s.insert(k(n), n, 10);
            if n % 97 != 0 {
                continue;
            }
            assert_ne!(s.ctrl_at, 0);
            let mut seen = 0;
            for b in s.index.iter_buckets() {
                let v = s.index.get_bucket(b).expect("a live bucket");
                assert_eq!(ctrl_of(std::ptr::from_ref(v), b), s.ctrl_at, "bucket {b}");
                seen += 1;
            }
            assert_eq!(seen, s.len());
        }
    }
}
