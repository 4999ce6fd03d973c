//! Locked memory for raw keys: one arena of 32-byte slots per process, allocated once and
//! locked into RAM with `mlock(2)`, so the kernel never writes a key to swap.
//!
//! * Every [`crate::aead::DataKey`] takes a slot; dropping the key zeroizes the slot and
//!   returns it. Slots are handed out as disjoint `&'static mut` borrows of the arena, so a
//!   key is owned by exactly one `DataKey` and no other code can reach it.
//! * The arena is sized once, by [`init`] at start-up (the KMS: its DEK cache plus
//!   [`HEADROOM_SLOTS`] for keys in flight); without a call, the first key sizes it at
//!   [`DEFAULT_SLOTS`].
//! * Locking can be refused by the OS (`RLIMIT_MEMLOCK` too low and no `CAP_IPC_LOCK`). Then
//!   keys still work, in unlocked memory, and [`status`] says so: the binaries log it as a
//!   warning at start and report it in `/metrics` and `status`. The soft limit is first raised
//!   to the hard one.
//! * When every slot is taken, a key is made in ordinary (zeroizing, unlocked) heap memory and
//!   counted in [`KeyMemoryStatus::unlocked_keys`]; a warning is logged once.
//!
//! Not covered: the short-lived copies a cipher makes of a key (ring's expanded AES key
//! schedule, on the stack of the thread running the call) and the buffer a key is read into
//! from the HSM before it is moved here, which are zeroized but not locked.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use zeroize::Zeroize;

/// Bytes of one slot: a 256-bit key.
pub const SLOT_BYTES: usize = 32;
/// Slots of an arena nobody sized with [`init`].
pub const DEFAULT_SLOTS: usize = 8192;
/// Slots the KMS adds to its cache size for keys held by requests in flight.
pub const HEADROOM_SLOTS: usize = 8192;

/// One key's storage.
pub(crate) type Slot = &'static mut [u8; SLOT_BYTES];

/// Whether the arena's pages are locked into RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Locking {
    /// `mlock` succeeded for the whole arena.
    Locked,
    /// The OS refused; the reason, for the start-up warning.
    Refused(String),
}

/// The arena, as `/metrics` and `status` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMemoryStatus {
    /// Slots in the arena.
    pub slots: usize,
    /// Slots holding a key now.
    pub in_use: usize,
    /// Bytes of the arena.
    pub bytes: usize,
    pub locking: Locking,
    /// Keys made in ordinary memory because every slot was taken, since start.
    pub unlocked_keys: u64,
}

struct Arena {
    free: Mutex<Vec<Slot>>,
    slots: usize,
    in_use: AtomicUsize,
    locking: Locking,
    unlocked_keys: AtomicU64,
    warned_full: AtomicBool,
}

static ARENA: OnceLock<Arena> = OnceLock::new();

/// Makes the arena with `slots` slots (at least one) and locks it, unless a key or an earlier
/// call made it already (then its size stays). Returns what [`status`] returns.
pub fn init(slots: usize) -> KeyMemoryStatus {
    let _ = ARENA.get_or_init(|| Arena::new(slots.max(1)));
    status()
}

/// The arena now (made at [`DEFAULT_SLOTS`] if nothing made it yet).
pub fn status() -> KeyMemoryStatus {
    let a = arena();
    KeyMemoryStatus {
        slots: a.slots,
        in_use: a.in_use.load(Ordering::Relaxed),
        bytes: a.slots * SLOT_BYTES,
        locking: a.locking.clone(),
        unlocked_keys: a.unlocked_keys.load(Ordering::Relaxed),
    }
}

fn arena() -> &'static Arena {
    ARENA.get_or_init(|| Arena::new(DEFAULT_SLOTS))
}

impl Arena {
    fn new(slots: usize) -> Self {
        // Allocated once and never freed: the arena lives as long as the process.
        let memory: &'static mut [[u8; SLOT_BYTES]] =
            Box::leak(vec![[0u8; SLOT_BYTES]; slots].into_boxed_slice());
        let locking = lock(memory);
        Self {
            free: Mutex::new(memory.iter_mut().collect()),
            slots,
            in_use: AtomicUsize::new(0),
            locking,
            unlocked_keys: AtomicU64::new(0),
            warned_full: AtomicBool::new(false),
        }
    }

    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        // The list is only pushed and popped under the lock: a panic cannot leave it torn.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock(memory: &mut [[u8; SLOT_BYTES]]) -> Locking {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Memlock);
    if limit.current != limit.maximum {
        // Raising the soft limit up to the hard one needs no privilege; a refusal only means
        // the lock below may fail, which it reports.
        let _ = setrlimit(
            Resource::Memlock,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
    let len = std::mem::size_of_val(memory);
    #[allow(unsafe_code)]
    // SAFETY: `mlock` neither reads nor writes memory: it only pins the pages of the range
    // in RAM. The range is exactly `memory`, a live allocation this process owns and never
    // frees (leaked above), so the call cannot touch memory of anyone else; any failure is an
    // error code, handled below.
    let locked = unsafe { rustix::mm::mlock(memory.as_mut_ptr().cast(), len) };
    match locked {
        Ok(()) => Locking::Locked,
        Err(e) => Locking::Refused(format!(
            "mlock of {len} bytes refused ({e}); raise RLIMIT_MEMLOCK (LimitMEMLOCK= in the unit) or grant CAP_IPC_LOCK"
        )),
    }
}

/// A free slot, or `None` when every slot is taken (counted; the caller uses the heap).
pub(crate) fn take() -> Option<Slot> {
    let a = arena();
    let slot = a.free_list().pop();
    match slot {
        Some(s) => {
            a.in_use.fetch_add(1, Ordering::Relaxed);
            Some(s)
        }
        None => {
            a.unlocked_keys.fetch_add(1, Ordering::Relaxed);
            if !a.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    slots = a.slots,
                    "every locked key slot is in use: further keys are held in unlocked memory"
                );
            }
            None
        }
    }
}

/// Zeroizes `slot` and returns it to the arena.
pub(crate) fn give_back(slot: Slot) {
    slot.zeroize();
    let a = arena();
    a.free_list().push(slot);
    a.in_use.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::aead::DataKey;

    /// The `Locked:` size in kB of the mapping of this process that holds `addr`.
    fn locked_kb_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = first.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("Locked:") {
                    return kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn keys_live_in_locked_memory_and_slots_are_zeroized_and_reused() {
        let before = status();
        assert_eq!(before.locking, Locking::Locked, "{before:?}");
        let k = DataKey::from_slice(&[0x5a; 32]).unwrap();
        let addr = k.expose().as_ptr() as usize;
        assert!(locked_kb_at(addr) > 0, "the key's page is not locked");
        assert!(status().in_use >= 1);
        drop(k);
        // A heap key (as every key was before the arena) is in a mapping that is not locked.
        let heap = Box::new([0u8; 32]);
        assert_eq!(locked_kb_at(heap.as_ptr() as usize), 0);
    }

    #[test]
    fn a_returned_slot_is_zeroized() {
        let s = take().unwrap();
        s.copy_from_slice(&[7; 32]);
        let addr = s.as_ptr() as usize;
        give_back(s);
        let found = {
            let mut list = arena().free_list();
            let at = list
                .iter()
                .position(|x| x.as_ptr() as usize == addr)
                .unwrap();
            let s = list.swap_remove(at);
            let zero = *s == [0; 32];
            list.push(s);
            zero
        };
        assert!(found, "a returned slot kept its key");
    }
}
