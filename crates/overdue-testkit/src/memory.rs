//! `MemoryStore`: the reference [`Store`], in a `BTreeMap`. Not durable (it says so in its
//! capabilities); it exists to pin down the contract in the simplest code and to test the engine
//! without a database.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use overdue_core::{
    Capabilities, Claimed, DeadLetter, DeadLetterQuery, ListQuery, QueueCount, Result, Settlement,
    Store, Timer, TimerRef, TimerSpec, TimerState,
};
use parking_lot::Mutex;

#[derive(Clone, Debug)]
struct Row {
    due_at: i64,
    payload: Vec<u8>,
    generation: u64,
    attempts: u32,
    last_error: Option<String>,
    lease: Option<(String, i64)>,
    created_at: i64,
    updated_at: i64,
}

#[derive(Debug, Default)]
struct Inner {
    rows: HashMap<(String, String), Row>,
    /// `(due_at, queue, key)` of every row.
    by_due: BTreeSet<(i64, String, String)>,
    dead: BTreeMap<i64, DeadLetter>,
    next_generation: u64,
    next_dead_id: i64,
}

impl Inner {
    fn next_gen(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn put(&mut self, queue: String, key: String, row: Row) {
        let ident = (queue, key);
        if let Some(old) = self.rows.get(&ident) {
            self.by_due.remove(&(old.due_at, ident.0.clone(), ident.1.clone()));
        }
        self.by_due.insert((row.due_at, ident.0.clone(), ident.1.clone()));
        self.rows.insert(ident, row);
    }

    fn delete(&mut self, queue: &str, key: &str) -> Option<Row> {
        let row = self.rows.remove(&(queue.to_owned(), key.to_owned()))?;
        self.by_due.remove(&(row.due_at, queue.to_owned(), key.to_owned()));
        Some(row)
    }

    fn upsert(&mut self, queue: String, key: String, due_at: i64, payload: Vec<u8>, now: i64) -> u64 {
        let generation = self.next_gen();
        let created_at = self.rows.get(&(queue.clone(), key.clone())).map_or(now, |r| r.created_at);
        let row = Row { due_at, payload, generation, attempts: 0, last_error: None, lease: None, created_at, updated_at: now };
        self.put(queue, key, row);
        generation
    }

    fn current(&self, t: &TimerRef) -> Option<&Row> {
        self.rows.get(&(t.queue.clone(), t.key.clone())).filter(|r| r.generation == t.generation)
    }

    fn try_claim(&mut self, queue: &str, key: &str, generation: Option<u64>, owner: &str, now: i64, lease_until: i64) -> Option<Claimed> {
        let row = self.rows.get_mut(&(queue.to_owned(), key.to_owned()))?;
        let free = row.lease.as_ref().is_none_or(|(_, until)| *until <= now);
        if generation.is_some_and(|g| g != row.generation) || row.due_at > now || !free {
            return None;
        }
        row.lease = Some((owner.to_owned(), lease_until));
        Some(Claimed {
            timer: TimerRef { queue: queue.to_owned(), key: key.to_owned(), generation: row.generation, due_at: row.due_at },
            payload: row.payload.clone(),
            attempts: row.attempts,
        })
    }

    fn to_timer(queue: &str, key: &str, r: &Row, now: i64) -> Timer {
        let state = match &r.lease {
            Some((owner, until)) if *until > now => TimerState::InFlight { owner: owner.clone(), lease_until: *until },
            _ => TimerState::Pending,
        };
        Timer {
            queue: queue.to_owned(),
            key: key.to_owned(),
            due_at: r.due_at,
            payload: r.payload.clone(),
            generation: r.generation,
            attempts: r.attempts,
            last_error: r.last_error.clone(),
            state,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

/// The reference in-memory store. Clones share nothing; use one `Arc` per test.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { name: "memory", durable: false, shared: false }
    }

    async fn schedule(&self, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        let mut s = self.inner.lock();
        Ok(timers.into_iter().map(|t| s.upsert(t.queue, t.key, t.due_at, t.payload, now)).collect())
    }

    async fn cancel(&self, queue: &str, key: &str) -> Result<Option<u64>> {
        Ok(self.inner.lock().delete(queue, key).map(|r| r.generation))
    }

    async fn reschedule(&self, queue: &str, key: &str, due_at: i64, now: i64) -> Result<Option<u64>> {
        let mut s = self.inner.lock();
        let Some(old) = s.rows.get(&(queue.to_owned(), key.to_owned())).cloned() else { return Ok(None) };
        let generation = s.next_gen();
        let row = Row { due_at, generation, attempts: 0, last_error: None, lease: None, updated_at: now, ..old };
        s.put(queue.to_owned(), key.to_owned(), row);
        Ok(Some(generation))
    }

    async fn get(&self, queue: &str, key: &str, now: i64) -> Result<Option<Timer>> {
        let s = self.inner.lock();
        Ok(s.rows.get(&(queue.to_owned(), key.to_owned())).map(|r| Inner::to_timer(queue, key, r, now)))
    }

    async fn list(&self, q: &ListQuery, now: i64) -> Result<Vec<Timer>> {
        let s = self.inner.lock();
        let limit = q.effective_limit() as usize;
        let out = s
            .by_due
            .iter()
            .filter(|(due, queue, key)| {
                q.queue.as_ref().is_none_or(|x| x == queue)
                    && q.due_from.is_none_or(|f| *due >= f)
                    && q.due_to.is_none_or(|t| *due <= t)
                    && q.after.as_ref().is_none_or(|a| (*due, queue, key) > (a.0, &a.1, &a.2))
            })
            .take(limit)
            .filter_map(|(_, queue, key)| s.rows.get(&(queue.clone(), key.clone())).map(|r| Inner::to_timer(queue, key, r, now)))
            .collect();
        Ok(out)
    }

    async fn counts(&self, now: i64) -> Result<Vec<QueueCount>> {
        let s = self.inner.lock();
        let mut m: BTreeMap<String, QueueCount> = BTreeMap::new();
        for ((queue, _), r) in &s.rows {
            let c = m.entry(queue.clone()).or_insert_with(|| QueueCount { queue: queue.clone(), ..Default::default() });
            if r.lease.as_ref().is_some_and(|(_, until)| *until > now) { c.in_flight += 1 } else { c.pending += 1 }
        }
        for d in s.dead.values() {
            m.entry(d.queue.clone()).or_insert_with(|| QueueCount { queue: d.queue.clone(), ..Default::default() }).dead += 1;
        }
        Ok(m.into_values().collect())
    }

    async fn due_refs(&self, after: Option<&(i64, String, String)>, until: i64, limit: u32) -> Result<Vec<TimerRef>> {
        let s = self.inner.lock();
        let out = s
            .by_due
            .iter()
            .filter(|(due, queue, key)| after.is_none_or(|a| (*due, queue, key) > (a.0, &a.1, &a.2)))
            .take_while(|(due, _, _)| *due <= until)
            .take(limit as usize)
            .filter_map(|(due, queue, key)| {
                s.rows.get(&(queue.clone(), key.clone())).map(|r| TimerRef { queue: queue.clone(), key: key.clone(), generation: r.generation, due_at: *due })
            })
            .collect();
        Ok(out)
    }

    async fn claim(&self, timers: &[TimerRef], owner: &str, now: i64, lease_until: i64) -> Result<Vec<Claimed>> {
        let mut s = self.inner.lock();
        Ok(timers.iter().filter_map(|t| s.try_claim(&t.queue, &t.key, Some(t.generation), owner, now, lease_until)).collect())
    }

    async fn claim_due(&self, now: i64, due_before: i64, limit: u32, owner: &str, lease_until: i64) -> Result<Vec<Claimed>> {
        let mut s = self.inner.lock();
        let candidates: Vec<(String, String)> = s
            .by_due
            .iter()
            .take_while(|(due, _, _)| *due <= due_before.min(now))
            .map(|(_, q, k)| (q.clone(), k.clone()))
            .collect();
        let mut out = Vec::new();
        for (q, k) in candidates {
            if out.len() >= limit as usize {
                break;
            }
            if let Some(c) = s.try_claim(&q, &k, None, owner, now, lease_until) {
                out.push(c);
            }
        }
        Ok(out)
    }

    async fn settle(&self, batch: Vec<Settlement>, _now: i64) -> Result<()> {
        let mut s = self.inner.lock();
        for st in batch {
            let t = st.timer().clone();
            let Some(row) = s.current(&t).cloned() else { continue };
            match st {
                Settlement::Done(_) => {
                    s.delete(&t.queue, &t.key);
                }
                Settlement::Release(_) => {
                    s.put(t.queue, t.key, Row { lease: None, ..row });
                }
                Settlement::Retry { due_at, attempts, error, .. } => {
                    s.put(t.queue, t.key, Row { due_at, attempts, last_error: Some(error), lease: None, ..row });
                }
                Settlement::DeadLetter { attempts, error, failed_at, .. } => {
                    s.delete(&t.queue, &t.key);
                    s.next_dead_id += 1;
                    let id = s.next_dead_id;
                    s.dead.insert(id, DeadLetter {
                        id,
                        queue: t.queue,
                        key: t.key,
                        generation: row.generation,
                        due_at: row.due_at,
                        payload: row.payload,
                        attempts,
                        error,
                        failed_at,
                    });
                }
            }
        }
        Ok(())
    }

    async fn dead_letters(&self, q: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let s = self.inner.lock();
        let limit = match q.limit { 0 => 100, n => n.min(10_000) } as usize;
        Ok(s.dead
            .range(q.after_id.map_or(i64::MIN, |a| a.saturating_add(1))..)
            .map(|(_, d)| d)
            .filter(|d| q.queue.as_ref().is_none_or(|x| *x == d.queue))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn replay(&self, id: i64, due_at: i64, now: i64) -> Result<Option<u64>> {
        let mut s = self.inner.lock();
        let Some(d) = s.dead.remove(&id) else { return Ok(None) };
        Ok(Some(s.upsert(d.queue, d.key, due_at, d.payload, now)))
    }
}
