//! # overdue-redis
//!
//! [`RedisStore`]: timers in Redis sorted sets scored by due time, shared by any number of
//! overdue nodes. Every change is one Lua script, so it is atomic; every batch is one script
//! call, so 1,000 timers cost one round trip.
//!
//! ## Key layout
//!
//! With the prefix `P` (URL parameter `prefix`, default `overdue`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:gen` | STRING | the generation counter; a batch of n takes n with one `INCRBY` |
//! | `P:queues` | SET | every queue that has had a timer (the scans walk these) |
//! | `P:dlid` | STRING | the dead-letter id counter (`INCR`) |
//! | `P:dlq` | HASH | dead-letter id → queue, so `replay(id)` finds the queue |
//! | `P:layout` | STRING | the key layout the prefix holds (`2`, [`LAYOUT`]); `open` refuses another |
//! | `{P:q:Q}:due` | ZSET | member = `<timer key>\0<generation>`, score = `due_at` ms: the pending (unclaimed) timers of queue `Q` |
//! | `{P:q:Q}:t` | HASH | field = timer key, value = the record `<generation>,<attempts>,<created_at>,<updated_at - created_at>,<due_at - created_at>,<payload bytes>` |
//! | `{P:q:Q}:fly` | ZSET | member = timer key, score = the id of the lease holding it: the claimed timers (a claim moves a member from `due` to here; retry and release move it back) |
//! | `{P:q:Q}:lease` | ZSET | member = lease id, score = `lease_until` ms: one entry per claim (a batch), not per timer; a score `<= now` is an expired lease, its timers claimable again |
//! | `{P:q:Q}:owner` | HASH | field = lease id, value = the node that holds the lease; field `0` = the last lease id issued |
//! | `{P:q:Q}:err` | HASH | field = timer key, value = the last handler error (only after a failed attempt) |
//! | `{P:q:Q}:dead` | ZSET | score = dead-letter id, member = `<id>,<generation>,<due_at>,<attempts>,<failed_at>,<key length>,<error length>,<key><error><payload>` |
//!
//! The `{…}` is a Redis Cluster hash tag: all keys of one queue hash to one slot,
//! `CRC16("P:q:Q") mod 16384`. A future `keyspace` trigger would add one expiring key per timer
//! under the same tag (`{P:q:Q}:x:<key>`), so its expiry event names the queue and the key.
//!
//! ## What is atomic
//!
//! Each of `schedule` (a whole batch, across queues), `cancel`, `reschedule`, `claim` (a whole
//! batch), `claim_due`, `settle` (a whole batch) and `replay` is a single script: Redis runs no
//! other command while it runs, so the claim contract of `overdue_core::store` holds exactly: a
//! timer is claimed only if its generation matches, `due_at <= now` and its lease is free or
//! expired, and of two nodes claiming it at once exactly one wins. Settlements apply only while
//! the generation is unchanged. (A script that fails half way — out of memory — is not rolled
//! back; the caller sees the error and retries the batch, which is an idempotent upsert.)
//!
//! ## Redis Cluster
//!
//! The scripts declare every key they touch. A script that touches one queue (cancel,
//! reschedule, get, replay of one dead letter) stays in the queue's slot, except that
//! reschedule and replay also take a generation from `P:gen`. Scripts over several queues
//! (schedule, claim, claim_due, settle, and the reads) and every use of the global counters are
//! cross-slot: fine on one Redis (the backend this crate targets and tests), refused by a
//! cluster (`CROSSSLOT`). A cluster port would run one script per queue (losing the atomicity of
//! a batch that spans queues, not of any one timer) and allocate generations with one `INCRBY`
//! per batch on `P:gen` before the per-queue scripts (one extra round trip per batch; the
//! counter's slot is a hot spot only at one command per batch).
//!
//! ## Many nodes
//!
//! Every node loads the whole near future into its wheel (no partition leases: see
//! `docs/redis.md` for why) and the claim script decides who runs each timer: the loser of a
//! race gets an empty claim, never a double run. A node that dies leaves its claimed timers in
//! `fly` under leases that expire at their `lease_until`; once that passes they are due again and
//! `claim_due` (the scan trigger and every node's backstop sweep) takes them. A spent lease (every
//! timer settled) is deleted when its queue has nothing in flight, or by the next `claim_due`
//! after it expires.
//!
//! ## Durability
//!
//! [`Capabilities::durable`] is about a crash of the *overdue process*: a timer that
//! `schedule` returned for is in Redis, and survives any overdue process being killed. Whether it
//! survives a crash of *Redis* is Redis's configuration: with `appendonly yes` and
//! `appendfsync always` every acknowledged write is on disk; with `everysec` up to a second of
//! writes can be lost; without AOF (as on the development machines, `--save "" --appendonly
//! no`) a Redis restart loses every timer. [`RedisStore::open`] logs a warning when Redis keeps
//! nothing on disk, and [`RedisStore::persistence`] reports what it found.
//!
//! ## URL
//!
//! `redis://[user[:password]@]host[:port][/db][?prefix=NAME&node=NAME]`
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `prefix` | first part of every key; 1-64 characters of `[A-Za-z0-9._:-]` | `overdue` |
//! | `node` | this node's name (logs, [`RedisStore::node`]) | `<host>-<pid>-<random>` |
//!
//! Every other parameter goes to the driver (`protocol=resp3`, …). `rediss://` (TLS) is not
//! built in.

pub mod keyspace;
pub mod layout;
mod scripts;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use overdue_core::{
    Capabilities, Claimed, DeadLetter, DeadLetterQuery, Error, ListQuery, QueueCount, Result, Settlement, Store,
    Timer, TimerRef, TimerSpec, TimerState,
};
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

pub use self::keyspace::KeyspaceTrigger;
pub use self::layout::{GlobalKeys, LAYOUT, QueueKeys};
use self::scripts::Scripts;

/// The backend name in errors and capabilities.
pub(crate) const BACKEND: &str = "redis";
/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "overdue";
/// How long opening waits for Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits for its reply before failing (transiently).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to open a [`RedisStore`]; [`RedisOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// First part of every key.
    pub prefix: String,
    /// This node's name; `None` picks a unique one.
    pub node: Option<String>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions { prefix: DEFAULT_PREFIX.to_owned(), node: None }
    }
}

impl RedisOptions {
    /// Splits overdue's own parameters off a `redis://` URL; returns them and the URL for the
    /// driver.
    pub fn from_url(url: &str) -> Result<(RedisOptions, String)> {
        let bad = |m: String| Error::Config(format!("invalid redis url: {m}"));
        if !url.starts_with("redis://") {
            return Err(bad(format!("{url:?} does not start with redis://")));
        }
        let mut opts = RedisOptions::default();
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "prefix" => {
                    let ok = !v.is_empty()
                        && v.len() <= 64
                        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
                    if !ok {
                        return Err(bad(format!("prefix={v:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'")));
                    }
                    opts.prefix = v.to_owned();
                }
                "node" => {
                    if v.is_empty() || v.len() > 200 || v.chars().any(char::is_control) {
                        return Err(bad(format!("node={v:?} must be 1-200 printable characters")));
                    }
                    opts.node = Some(v.to_owned());
                }
                _ => rest.push(pair),
            }
        }
        let driver = if rest.is_empty() { base.to_owned() } else { format!("{base}?{}", rest.join("&")) };
        Ok((opts, driver))
    }
}

/// Turns a driver error into a store error; connection trouble, timeouts and a Redis that is
/// loading, read-only or failing over are transient.
pub(crate) fn redis_err(e: redis::RedisError) -> Error {
    use redis::{ErrorKind, ServerErrorKind as S};
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Io
                | ErrorKind::Server(S::BusyLoading | S::TryAgain | S::ClusterDown | S::MasterDown | S::ReadOnly)
        );
    Error::store(BACKEND, e.to_string(), transient, e)
}

/// A reply that does not have the shape a script promises.
fn bad_reply(what: &str) -> Error {
    Error::Store { backend: BACKEND, message: format!("unexpected reply from redis: {what}"), transient: false, source: None }
}

/// What Redis keeps on disk, as `CONFIG GET` reported at open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Persistence {
    /// `appendonly` (`yes`/`no`), if the server let us read it.
    pub appendonly: Option<String>,
    /// `appendfsync` (`always`/`everysec`/`no`).
    pub appendfsync: Option<String>,
    /// `save` (RDB snapshot schedule; empty = none).
    pub save: Option<String>,
}

impl Persistence {
    /// True if Redis is known to keep nothing on disk (a Redis restart loses every timer).
    pub fn keeps_nothing(&self) -> bool {
        self.appendonly.as_deref() == Some("no") && self.save.as_deref().is_some_and(|s| s.trim().is_empty())
    }
}

struct Inner {
    con: ConnectionManager,
    scripts: Scripts,
    prefix: String,
    global: GlobalKeys,
    node: String,
    persistence: Persistence,
    healthy: AtomicBool,
}

/// Timers in Redis. Cheap to clone; clones share one multiplexed connection. See the crate
/// docs.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

fn random_node() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    format!("{host}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => format!("{}***{}", &url[..s + 3], &url[at..]),
            }
        }
        _ => url.to_owned(),
    }
}

/// Queue names of a batch in byte order, and each name's 1-based index.
struct QueueSet<'a> {
    names: Vec<&'a str>,
    index: HashMap<&'a str, usize>,
}

impl<'a> QueueSet<'a> {
    fn of(queues: impl Iterator<Item = &'a str>) -> QueueSet<'a> {
        let mut names: Vec<&str> = queues.collect();
        names.sort_unstable();
        names.dedup();
        let index = names.iter().enumerate().map(|(i, q)| (*q, i + 1)).collect();
        QueueSet { names, index }
    }

    fn idx(&self, q: &str) -> usize {
        self.index.get(q).copied().unwrap_or(0)
    }
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => {
            let s = std::str::from_utf8(b).map_err(|_| bad_reply("a number that is not text"))?;
            s.parse::<i64>()
                .or_else(|_| s.parse::<f64>().map(|f| f as i64))
                .map_err(|_| bad_reply("a number that does not parse"))
        }
        Value::SimpleString(s) => s.parse().map_err(|_| bad_reply("a number that does not parse")),
        Value::Double(f) => Ok(*f as i64),
        _ => Err(bad_reply("expected a number")),
    }
}

fn bytes(v: Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        _ => Err(bad_reply("expected a string")),
    }
}

fn text(v: Value) -> Result<String> {
    String::from_utf8(bytes(v)?).map_err(|_| bad_reply("a name that is not UTF-8"))
}

fn opt(v: Value) -> Option<Value> {
    match v {
        Value::Nil => None,
        v => Some(v),
    }
}

fn array(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Nil => Ok(Vec::new()),
        _ => Err(bad_reply("expected an array")),
    }
}

/// Writes `<key>\0<generation>`, a pending timer's member of `due`, into `buf`.
fn due_member(buf: &mut Vec<u8>, key: &str, generation: u64) {
    buf.clear();
    buf.extend_from_slice(key.as_bytes());
    buf.push(0);
    let _ = std::io::Write::write_fmt(buf, format_args!("{generation}"));
}

/// Splits a member of `due` into its key and generation (the digits after the last NUL).
fn split_member(mut m: Vec<u8>) -> Result<(String, u64)> {
    let nul = m.iter().rposition(|b| *b == 0).ok_or_else(|| bad_reply("a due member without generation"))?;
    let generation = std::str::from_utf8(&m[nul + 1..])
        .ok()
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| bad_reply("a due member's generation"))?;
    m.truncate(nul);
    let key = String::from_utf8(m).map_err(|_| bad_reply("a due member's key"))?;
    Ok((key, generation))
}

/// A parsed record: generation, attempts, created, updated, due, payload.
struct Record {
    generation: u64,
    attempts: u32,
    created_at: i64,
    updated_at: i64,
    due_at: i64,
    payload: Vec<u8>,
}

fn parse_record(mut v: Vec<u8>) -> Result<Record> {
    let mut fields = [0i64; 5];
    let mut pos = 0;
    for f in &mut fields {
        let end = v[pos..].iter().position(|b| *b == b',').ok_or_else(|| bad_reply("a truncated timer record"))?;
        let s = std::str::from_utf8(&v[pos..pos + end]).map_err(|_| bad_reply("a timer record"))?;
        *f = s.parse().map_err(|_| bad_reply("a timer record field"))?;
        pos += end + 1;
    }
    let payload = v.split_off(pos);
    Ok(Record {
        generation: fields[0] as u64,
        attempts: fields[1].max(0) as u32,
        created_at: fields[2],
        updated_at: fields[2].saturating_add(fields[3]),
        due_at: fields[2].saturating_add(fields[4]),
        payload,
    })
}

/// Parses a dead-letter member (see the crate docs).
fn parse_dead(queue: &str, mut v: Vec<u8>) -> Result<DeadLetter> {
    let mut fields = [0i64; 7];
    let mut pos = 0;
    for f in &mut fields {
        let end = v[pos..].iter().position(|b| *b == b',').ok_or_else(|| bad_reply("a truncated dead letter"))?;
        let s = std::str::from_utf8(&v[pos..pos + end]).map_err(|_| bad_reply("a dead letter"))?;
        *f = s.parse().map_err(|_| bad_reply("a dead-letter field"))?;
        pos += end + 1;
    }
    let (kl, el) = (fields[5] as usize, fields[6] as usize);
    if v.len() < pos + kl + el {
        return Err(bad_reply("a truncated dead letter"));
    }
    let payload = v.split_off(pos + kl + el);
    let error = String::from_utf8_lossy(&v[pos + kl..pos + kl + el]).into_owned();
    let key = String::from_utf8_lossy(&v[pos..pos + kl]).into_owned();
    Ok(DeadLetter {
        id: fields[0],
        queue: queue.to_owned(),
        key,
        generation: fields[1] as u64,
        due_at: fields[2],
        payload,
        attempts: fields[3].max(0) as u32,
        error,
        failed_at: fields[4],
    })
}

impl RedisStore {
    /// Opens the store a `redis://` URL names (see the crate docs for its parameters).
    pub async fn open_url(url: &str) -> Result<RedisStore> {
        let (opts, driver) = RedisOptions::from_url(url)?;
        RedisStore::open(&driver, opts).await
    }

    /// Connects, loads the scripts and reads the server's persistence settings.
    pub async fn open(driver_url: &str, opts: RedisOptions) -> Result<RedisStore> {
        let client = redis::Client::open(driver_url)
            .map_err(|e| Error::Config(format!("invalid redis url {}: {e}", redact(driver_url))))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2);
        let unreachable = |e: String| Error::Store {
            backend: BACKEND,
            message: format!("cannot connect to redis at {}: {e}", redact(driver_url)),
            transient: true,
            source: None,
        };
        let mut con = match tokio::time::timeout(CONNECT_TIMEOUT, client.get_connection_manager_with_config(config)).await
        {
            Ok(Ok(con)) => con,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => return Err(unreachable("timed out".into())),
        };
        let global = GlobalKeys::new(&opts.prefix);
        check_layout(&mut con, &global, &opts.prefix).await?;
        let scripts = Scripts::new();
        for s in scripts.all() {
            s.prepare_invoke().load_async(&mut con).await.map_err(redis_err)?;
        }
        let persistence = read_persistence(&mut con).await;
        if persistence.keeps_nothing() {
            tracing::warn!(
                "redis keeps nothing on disk (appendonly no, no save points): a redis restart loses every timer; \
                 production needs appendonly yes with appendfsync everysec or always"
            );
        }
        let node = opts.node.clone().unwrap_or_else(random_node);
        Ok(RedisStore {
            inner: Arc::new(Inner {
                con,
                scripts,
                global,
                prefix: opts.prefix,
                node,
                persistence,
                healthy: AtomicBool::new(true),
            }),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// What Redis keeps on disk, as read at open.
    pub fn persistence(&self) -> &Persistence {
        &self.inner.persistence
    }

    /// The store-wide keys.
    pub fn global_keys(&self) -> &GlobalKeys {
        &self.inner.global
    }

    /// The keys of one queue.
    pub fn queue_keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(&self.inner.prefix, queue)
    }

    /// The connection, for callers that keep their own keys in the same Redis.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.con.clone()
    }

    /// Whether the last round trip worked.
    pub fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    fn track<T>(&self, r: std::result::Result<T, redis::RedisError>) -> Result<T> {
        let r = r.map_err(redis_err);
        match &r {
            Err(e) if e.is_transient() => self.inner.healthy.store(false, Ordering::Relaxed),
            Ok(_) => self.inner.healthy.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
        r
    }

    fn con(&self) -> ConnectionManager {
        self.inner.con.clone()
    }

    /// Every known queue, sorted.
    async fn queues(&self) -> Result<Vec<String>> {
        let mut con = self.con();
        let mut q: Vec<String> = self.track(redis::cmd("SMEMBERS").arg(&self.inner.global.queues).query_async(&mut con).await)?;
        q.sort_unstable();
        Ok(q)
    }

    fn add_groups<'s>(&self, inv: &mut redis::ScriptInvocation<'s>, queues: &[&str]) {
        for q in queues {
            let k = QueueKeys::new(&self.inner.prefix, q);
            for key in k.all() {
                inv.key(key);
            }
        }
    }

    /// The RANGE script over `queues`: timers due by `until` after the cursor, per queue at most
    /// `limit`, as flat rows 7 values wide with details and 3 without (see the script). The
    /// callers parse and merge them.
    async fn range_rows(
        &self,
        queues: &[&str],
        after: Option<&(i64, String, String)>,
        due_from: Option<i64>,
        until: i64,
        limit: u32,
        details: bool,
    ) -> Result<std::vec::IntoIter<Value>> {
        if queues.is_empty() || limit == 0 {
            return Ok(Vec::new().into_iter());
        }
        let mut inv = self.inner.scripts.range.prepare_invoke();
        self.add_groups(&mut inv, queues);
        inv.arg(until).arg(limit).arg(if details { "1" } else { "0" });
        for q in queues {
            // Lower bound for this queue: the cursor, or due_from, whichever is later.
            let (mode, lo, key): (&str, i64, &str) = match after {
                Some((d, cq, ck)) => match (*q).cmp(cq.as_str()) {
                    std::cmp::Ordering::Less => ("x", *d, ""),
                    std::cmp::Ordering::Equal => ("k", *d, ck.as_str()),
                    std::cmp::Ordering::Greater => ("i", *d, ""),
                },
                None => ("a", 0, ""),
            };
            let (mode, lo, key) = match due_from {
                Some(f) if mode == "a" || f > lo => ("i", f, ""),
                _ => (mode, lo, key),
            };
            inv.arg(mode).arg(lo).arg(key);
        }
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let flat = array(r)?;
        let width = if details { 7 } else { 3 };
        if flat.len() % width != 0 {
            return Err(bad_reply("a range of the wrong width"));
        }
        Ok(flat.into_iter())
    }

    /// Timers of `queues` with their details (record, lease, owner, last error), in due order.
    async fn range(
        &self,
        queues: &[&str],
        after: Option<&(i64, String, String)>,
        due_from: Option<i64>,
        until: i64,
        limit: u32,
    ) -> Result<Vec<(String, String, i64, Vec<Value>)>> {
        let mut it = self.range_rows(queues, after, due_from, until, limit, true).await?;
        let mut out = Vec::with_capacity(it.len() / 7);
        while let Some(qi) = it.next() {
            let queue = queue_at(queues, &qi)?;
            let key = text(it.next().unwrap_or_default())?;
            let due = int(&it.next().unwrap_or_default())?;
            out.push((queue.to_owned(), key, due, it.by_ref().take(4).collect()));
        }
        out.sort_unstable_by(|a, b| (a.2, &a.0, &a.1).cmp(&(b.2, &b.0, &b.1)));
        out.truncate(limit as usize);
        Ok(out)
    }
}

/// The queue a script's 1-based queue index names.
fn queue_at<'a>(queues: &[&'a str], qi: &Value) -> Result<&'a str> {
    let qi = int(qi)? as usize;
    queues.get(qi.wrapping_sub(1)).copied().ok_or_else(|| bad_reply("a queue index"))
}

/// Stamps a prefix with [`LAYOUT`] on first use, and refuses one that holds timers in another
/// layout (older versions did not stamp: timer records without a stamp are layout 1).
async fn check_layout(con: &mut ConnectionManager, global: &GlobalKeys, prefix: &str) -> Result<()> {
    let refuse = |found: &str| {
        Error::Config(format!(
            "the redis prefix {prefix:?} holds timers in key layout {found}; this version of overdue reads layout {LAYOUT}: \
             let the version that wrote them drain them, or use another prefix (?prefix=NAME)"
        ))
    };
    let stamp: Option<String> = redis::cmd("GET").arg(&global.layout).query_async(con).await.map_err(redis_err)?;
    match stamp.as_deref() {
        Some(LAYOUT) => return Ok(()),
        Some(other) => return Err(refuse(other)),
        None => {}
    }
    let queues: Vec<String> = redis::cmd("SMEMBERS").arg(&global.queues).query_async(con).await.map_err(redis_err)?;
    for q in &queues {
        let n: i64 = redis::cmd("HLEN").arg(&QueueKeys::new(prefix, q).timers).query_async(con).await.map_err(redis_err)?;
        if n > 0 {
            return Err(refuse("1"));
        }
    }
    let _: Option<String> =
        redis::cmd("SET").arg(&global.layout).arg(LAYOUT).arg("NX").query_async(con).await.map_err(redis_err)?;
    Ok(())
}

async fn read_persistence(con: &mut ConnectionManager) -> Persistence {
    let mut get = async |name: &str| -> Option<String> {
        let r: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(con).await;
        r.ok().and_then(|v| v.get(1).cloned())
    };
    Persistence { appendonly: get("appendonly").await, appendfsync: get("appendfsync").await, save: get("save").await }
}

fn timer_from(queue: String, key: String, rest: Vec<Value>, now: i64) -> Result<Timer> {
    let mut it = rest.into_iter();
    let rec = parse_record(bytes(it.next().unwrap_or_default())?)?;
    let lease = opt(it.next().unwrap_or_default()).map(|v| int(&v)).transpose()?;
    let owner = opt(it.next().unwrap_or_default()).map(text).transpose()?;
    let last_error = opt(it.next().unwrap_or_default()).map(text).transpose()?;
    let state = match (owner, lease) {
        (Some(owner), Some(until)) if until > now => TimerState::InFlight { owner, lease_until: until },
        _ => TimerState::Pending,
    };
    Ok(Timer {
        queue,
        key,
        due_at: rec.due_at,
        payload: rec.payload,
        generation: rec.generation,
        attempts: rec.attempts,
        last_error,
        state,
        created_at: rec.created_at,
        updated_at: rec.updated_at,
    })
}

#[async_trait]
impl Store for RedisStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { name: BACKEND, durable: true, shared: true }
    }

    async fn schedule(&self, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let qs = QueueSet::of(timers.iter().map(|t| t.queue.as_str()));
        let mut inv = self.inner.scripts.schedule.prepare_invoke();
        inv.key(&self.inner.global.generation).key(&self.inner.global.queues);
        self.add_groups(&mut inv, &qs.names);
        inv.arg(now).arg(timers.len()).arg(qs.names.len());
        for q in &qs.names {
            inv.arg(*q);
        }
        for t in &timers {
            inv.arg(qs.idx(&t.queue)).arg(&t.key).arg(t.due_at).arg(&t.payload[..]);
        }
        let mut con = self.con();
        let gens: Vec<u64> = self.track(inv.invoke_async(&mut con).await)?;
        if gens.len() != timers.len() {
            return Err(bad_reply("schedule returned the wrong number of generations"));
        }
        Ok(gens)
    }

    async fn cancel(&self, queue: &str, key: &str) -> Result<Option<u64>> {
        let mut inv = self.inner.scripts.cancel.prepare_invoke();
        self.add_groups(&mut inv, &[queue]);
        inv.arg(key);
        let mut con = self.con();
        self.track(inv.invoke_async(&mut con).await)
    }

    async fn reschedule(&self, queue: &str, key: &str, due_at: i64, now: i64) -> Result<Option<u64>> {
        let mut inv = self.inner.scripts.reschedule.prepare_invoke();
        inv.key(&self.inner.global.generation);
        self.add_groups(&mut inv, &[queue]);
        inv.arg(key).arg(due_at).arg(now);
        let mut con = self.con();
        self.track(inv.invoke_async(&mut con).await)
    }

    async fn get(&self, queue: &str, key: &str, now: i64) -> Result<Option<Timer>> {
        let mut inv = self.inner.scripts.get.prepare_invoke();
        self.add_groups(&mut inv, &[queue]);
        inv.arg(key);
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let Some(r) = opt(r) else { return Ok(None) };
        let mut a = array(r)?.into_iter();
        let rec = a.next().unwrap_or_default();
        let _due = a.next();
        let mut rest = vec![rec];
        rest.extend(a);
        timer_from(queue.to_owned(), key.to_owned(), rest, now).map(Some)
    }

    async fn list(&self, query: &ListQuery, now: i64) -> Result<Vec<Timer>> {
        let all = self.queues().await?;
        let queues: Vec<&str> = match &query.queue {
            Some(q) => all.iter().map(String::as_str).filter(|n| n == q).collect(),
            None => all.iter().map(String::as_str).collect(),
        };
        let until = query.due_to.unwrap_or(i64::MAX / 2);
        let found = self.range(&queues, query.after.as_ref(), query.due_from, until, query.effective_limit()).await?;
        found.into_iter().map(|(q, k, _, rest)| timer_from(q, k, rest, now)).collect()
    }

    async fn counts(&self, now: i64) -> Result<Vec<QueueCount>> {
        let all = self.queues().await?;
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut inv = self.inner.scripts.counts.prepare_invoke();
        self.add_groups(&mut inv, &names);
        inv.arg(now);
        let mut con = self.con();
        let r: Vec<i64> = self.track(inv.invoke_async(&mut con).await)?;
        if r.len() != names.len() * 3 {
            return Err(bad_reply("counts of the wrong width"));
        }
        Ok(names
            .iter()
            .zip(r.chunks_exact(3))
            .map(|(q, c)| QueueCount {
                queue: (*q).to_owned(),
                pending: (c[0] - c[1]).max(0) as u64,
                in_flight: c[1].max(0) as u64,
                dead: c[2].max(0) as u64,
            })
            .filter(|c| c.pending + c.in_flight + c.dead > 0)
            .collect())
    }

    async fn due_refs(&self, after: Option<&(i64, String, String)>, until: i64, limit: u32) -> Result<Vec<TimerRef>> {
        let all = self.queues().await?;
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        // Rows of (queue index, `<key>\0<generation>`, due): the member is split here, not in Lua.
        let mut it = self.range_rows(&names, after, None, until, limit, false).await?;
        let mut out = Vec::with_capacity(it.len() / 3);
        while let Some(qi) = it.next() {
            let queue = queue_at(&names, &qi)?;
            let (key, generation) = split_member(bytes(it.next().unwrap_or_default())?)?;
            let due_at = int(&it.next().unwrap_or_default())?;
            out.push(TimerRef { queue: queue.to_owned(), key, generation, due_at });
        }
        out.sort_unstable_by(|a, b| (a.due_at, &a.queue, &a.key).cmp(&(b.due_at, &b.queue, &b.key)));
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn claim(&self, timers: &[TimerRef], owner: &str, now: i64, lease_until: i64) -> Result<Vec<Claimed>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let qs = QueueSet::of(timers.iter().map(|t| t.queue.as_str()));
        let mut inv = self.inner.scripts.claim.prepare_invoke();
        self.add_groups(&mut inv, &qs.names);
        inv.arg(now).arg(lease_until).arg(owner);
        let mut member = Vec::new();
        for t in timers {
            due_member(&mut member, &t.key, t.generation);
            inv.arg(qs.idx(&t.queue)).arg(&t.key).arg(&member[..]);
        }
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let flat = array(r)?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let Some(i) = it.next() {
            let i = int(&i)? as usize;
            let t = timers.get(i.wrapping_sub(1)).ok_or_else(|| bad_reply("a claim index"))?;
            let rec = parse_record(bytes(it.next().unwrap_or_default())?)?;
            if rec.generation != t.generation {
                return Err(bad_reply("a claim of another generation"));
            }
            out.push((i, Claimed { timer: TimerRef { due_at: rec.due_at, ..t.clone() }, payload: rec.payload, attempts: rec.attempts }));
        }
        // The script answers queue by queue; the contract is input order.
        out.sort_unstable_by_key(|(i, _)| *i);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    async fn claim_due(&self, now: i64, due_before: i64, limit: u32, owner: &str, lease_until: i64) -> Result<Vec<Claimed>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let all = self.queues().await?;
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut inv = self.inner.scripts.claim_due.prepare_invoke();
        self.add_groups(&mut inv, &names);
        inv.arg(now).arg(due_before.min(now)).arg(limit).arg(owner).arg(lease_until);
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let flat = array(r)?;
        let mut out = Vec::with_capacity(flat.len() / 3);
        let mut it = flat.into_iter();
        while let Some(qi) = it.next() {
            let queue = queue_at(&names, &qi)?;
            let key = text(it.next().unwrap_or_default())?;
            let rec = parse_record(bytes(it.next().unwrap_or_default())?)?;
            let timer = TimerRef { queue: queue.to_owned(), key, generation: rec.generation, due_at: rec.due_at };
            out.push(Claimed { timer, payload: rec.payload, attempts: rec.attempts });
        }
        out.sort_unstable_by(|a, b| {
            (a.timer.due_at, &a.timer.queue, &a.timer.key).cmp(&(b.timer.due_at, &b.timer.queue, &b.timer.key))
        });
        Ok(out)
    }

    async fn settle(&self, batch: Vec<Settlement>, now: i64) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let qs = QueueSet::of(batch.iter().map(|s| s.timer().queue.as_str()));
        let mut inv = self.inner.scripts.settle.prepare_invoke();
        inv.key(&self.inner.global.dead_id).key(&self.inner.global.dead_index);
        self.add_groups(&mut inv, &qs.names);
        inv.arg(now).arg(qs.names.len());
        for q in &qs.names {
            inv.arg(*q);
        }
        // `Done` of a key named once in the batch goes in the short section the script applies
        // in bulk; everything else keeps batch order in the long one.
        let mut named: HashMap<(&str, &str), u32> = HashMap::with_capacity(batch.len());
        for s in &batch {
            *named.entry((s.timer().queue.as_str(), s.timer().key.as_str())).or_default() += 1;
        }
        let bulk: Vec<bool> =
            batch.iter().map(|s| matches!(s, Settlement::Done(t) if named[&(t.queue.as_str(), t.key.as_str())] == 1)).collect();
        inv.arg(bulk.iter().filter(|b| **b).count());
        for (s, _) in batch.iter().zip(&bulk).filter(|(_, b)| **b) {
            let t = s.timer();
            inv.arg(qs.idx(&t.queue)).arg(&t.key).arg(t.generation);
        }
        for (s, _) in batch.iter().zip(&bulk).filter(|(_, b)| !**b) {
            let t = s.timer();
            inv.arg(match s {
                Settlement::Done(_) => "D",
                Settlement::Release(_) => "L",
                Settlement::Retry { .. } => "R",
                Settlement::DeadLetter { .. } => "X",
            });
            inv.arg(qs.idx(&t.queue)).arg(&t.key).arg(t.generation);
            match s {
                Settlement::Done(_) | Settlement::Release(_) => {
                    inv.arg(0).arg(0).arg("");
                }
                Settlement::Retry { due_at, attempts, error, .. } => {
                    inv.arg(*due_at).arg(*attempts).arg(error);
                }
                Settlement::DeadLetter { attempts, error, failed_at, .. } => {
                    inv.arg(*attempts).arg(error).arg(*failed_at);
                }
            }
        }
        let mut con = self.con();
        let _applied: i64 = self.track(inv.invoke_async(&mut con).await)?;
        Ok(())
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let limit = match query.limit {
            0 => 100,
            n => n.min(10_000),
        };
        let all = self.queues().await?;
        let names: Vec<&str> = match &query.queue {
            Some(q) => all.iter().map(String::as_str).filter(|n| n == q).collect(),
            None => all.iter().map(String::as_str).collect(),
        };
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = self.inner.scripts.dead.prepare_invoke();
        self.add_groups(&mut inv, &names);
        inv.arg(query.after_id.unwrap_or(i64::MIN).max(-1)).arg(limit);
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let mut out = Vec::new();
        let mut it = array(r)?.into_iter();
        while let Some(qi) = it.next() {
            let queue = queue_at(&names, &qi)?;
            out.push(parse_dead(queue, bytes(it.next().unwrap_or_default())?)?);
        }
        out.sort_unstable_by_key(|d| d.id);
        out.truncate(limit as usize);
        Ok(out)
    }

    async fn replay(&self, id: i64, due_at: i64, now: i64) -> Result<Option<u64>> {
        let mut con = self.con();
        let queue: Option<String> =
            self.track(redis::cmd("HGET").arg(&self.inner.global.dead_index).arg(id).query_async(&mut con).await)?;
        let Some(queue) = queue else { return Ok(None) };
        let mut inv = self.inner.scripts.replay.prepare_invoke();
        inv.key(&self.inner.global.generation).key(&self.inner.global.dead_index);
        self.add_groups(&mut inv, &[queue.as_str()]);
        inv.arg(id).arg(due_at).arg(now);
        self.track(inv.invoke_async(&mut con).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_split_from_the_driver_url() {
        let (o, d) = RedisOptions::from_url("redis://127.0.0.1:6379/0?prefix=ab_1&node=n1&protocol=resp3").expect("valid");
        assert_eq!((o.prefix.as_str(), o.node.as_deref()), ("ab_1", Some("n1")));
        assert_eq!(d, "redis://127.0.0.1:6379/0?protocol=resp3");
        let (o, d) = RedisOptions::from_url("redis://127.0.0.1").expect("valid");
        assert_eq!((o.prefix.as_str(), o.node, d.as_str()), (DEFAULT_PREFIX, None, "redis://127.0.0.1"));
    }

    #[test]
    fn bad_url_parameters_are_clear_errors() {
        for (url, needle) in [
            ("postgres://x", "does not start with redis://"),
            ("redis://h?prefix=", "prefix"),
            ("redis://h?prefix=a{b}", "prefix"),
            ("redis://h?prefix=a%20b", "prefix"),
            ("redis://h?node=", "node"),
        ] {
            let e = RedisOptions::from_url(url).expect_err(url).to_string();
            assert!(e.contains(needle) && e.starts_with("invalid configuration: invalid redis url"), "{url}: {e}");
        }
    }

    #[test]
    fn passwords_are_redacted_in_messages() {
        assert_eq!(redact("redis://u:secret@h:6379/0"), "redis://u:***@h:6379/0");
        assert_eq!(redact("redis://:secret@h"), "redis://:***@h");
        assert_eq!(redact("redis://h/0"), "redis://h/0");
    }

    #[test]
    fn records_round_trip() {
        let r = parse_record(b"42,3,1000,5,-7,a,b\0c".to_vec()).expect("record");
        assert_eq!((r.generation, r.attempts, r.created_at, r.updated_at, r.due_at), (42, 3, 1000, 1005, 993));
        assert_eq!(r.payload, b"a,b\0c");
        // A layout-1 record (no due field) is refused, not misread.
        assert!(parse_record(b"42,3,1000,5,a,b".to_vec()).is_err());
        let d = parse_dead("q", b"7,42,1000,3,2000,3,4,k,1boomp\0".to_vec()).expect("dead");
        assert_eq!((d.id, d.generation, d.due_at, d.attempts, d.failed_at), (7, 42, 1000, 3, 2000));
        assert_eq!((d.key.as_str(), d.error.as_str(), d.payload.as_slice()), ("k,1", "boom", &b"p\0"[..]));
    }
}
