//! # overdue-redisson
//!
//! [`RedissonStore`]: overdue timers kept in exactly the keys, data layout and member encoding of
//! Redisson's `RDelayedQueue`, so a Java service and overdue share one delayed queue:
//!
//! - what a Java service `offer(value, delay)`s is an overdue timer (key
//!   `redisson:<sha1 of the member>`), fired by overdue on time;
//! - what overdue schedules is an item Redisson sees (`size()`, `readAll()`, `poll()`…), and when
//!   it fires, its value lands in the destination list exactly as Redisson's transfer puts it
//!   there (`RPUSH` of the encoded value), where `RBlockingQueue.take()` finds it.
//!
//! Unlike Redisson, which moves due items with a timer in each live Java client (and stalls
//! when none is alive: redisson/redisson#4088, #6020), overdue moves them on its own schedule,
//! server-side, in one Lua script per batch.
//!
//! The layout follows Redisson's source, `redisson/src/main/java/org/redisson/RedissonDelayedQueue.java`
//! (the `Bc0Lc0` member of the current source, copyright 2013-2024; the older `dLc0` member with
//! `member=dLc0`) and `QueueTransferTask.java`. See `docs/redisson.md` for the whole story.
//!
//! ## Keys of one queue
//!
//! An overdue queue `Q` is the Redisson queue named `N = <name_prefix>Q` (URL parameter
//! `name_prefix`, default empty). With side-key prefix `P` (URL parameter `prefix`, default
//! `overdue`), and Redisson's `prefixName` (`x:{N}`, or `x:N` if `N` has a `{`):
//!
//! | key | type | holds | who |
//! |---|---|---|---|
//! | `redisson_delay_queue_timeout:{N}` | ZSET | member = packed value ([`member`]), score = due ms: the pending items | Redisson and overdue |
//! | `redisson_delay_queue:{N}` | LIST | the same members in offer order | Redisson and overdue |
//! | `redisson_delay_queue_channel:{N}` | channel | the due time of a new head item | Redisson and overdue publish |
//! | `N` | LIST | the destination: due values, `RPUSH`ed | Java consumers `take()` |
//! | `P:t:{N}` | HASH | timer key → `<gen>,<attempts>,<created_at>,<updated_at - created_at>,<member>` | overdue |
//! | `P:m:{N}` | HASH | member → timer key | overdue |
//! | `P:fly:{N}` | ZSET | timer key → due ms: claimed timers (their member is out of Redisson's keys while a handler runs) | overdue |
//! | `P:lease:{N}` | ZSET | timer key → lease_until ms | overdue |
//! | `P:owner:{N}` | HASH | timer key → node | overdue |
//! | `P:err:{N}` | HASH | timer key → last handler error | overdue |
//! | `P:dead:{N}` | ZSET | dead letters, score = id (as in `overdue-redis`) | overdue |
//! | `P:gen`, `P:queues`, `P:dlid`, `P:dlq` | | generation counter, known queues, dead-letter ids and their queues | overdue |
//!
//! Every key of a queue carries the hash tag `{N}`, the one Redisson uses, so a queue is one
//! Redis Cluster slot; the scripts also touch the global keys, so (as with `overdue-redis`) they
//! run on one Redis, not on a cluster.
//!
//! ## What firing means
//!
//! A claim takes the member out of the timeout set and the ordered list (`ZREM`, `LREM`) into
//! `P:fly`, so no Redisson transfer can also move it while overdue's handler runs. The handler's
//! outcome decides: `Done` removes the timer and, with `deliver=list` (the default), `RPUSH`es
//! its value to the destination list `N` in the same script — that is the transfer, done once
//! per generation; retry and release put the member back (`ZADD` + `RPUSH`, and a notice on the
//! channel if it is the new head), dead-lettering keeps it in `P:dead`. With `deliver=none`
//! nothing is pushed: the overdue handler is the consumer. A handler that just returns `Done`
//! makes overdue a pure server-side transfer for that queue.
//!
//! ## URL
//!
//! `redisson://[user[:password]@]host[:port][/db][?queue=Q[@CODEC]&codec=CODEC&…]`
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `queue` | an overdue queue to watch for items Java services offer, optionally with its codec (`queue=order.close@json`); repeat it or separate by commas | none (queues overdue schedules into are watched anyway) |
//! | `codec` | the codec of every other queue: `string`, `json` or `bytes` ([`Codec`]) | `string` |
//! | `name_prefix` | prepended to an overdue queue name to get the Redisson name | empty |
//! | `member` | member layout: `Bc0Lc0` (current Redisson) or `dLc0` (older Redisson) | `Bc0Lc0` |
//! | `deliver` | `list`: a `Done` pushes the value to the destination list; `none`: it does not | `list` |
//! | `prefix` | first part of overdue's side keys; 1-64 of `[A-Za-z0-9._:-]` | `overdue` |
//! | `node` | this node's name | `<host>-<pid>-<random>` |
//!
//! Every other parameter goes to the Redis driver. Bad values are an [`Error::Config`] before
//! anything is connected or written.

pub mod codec;
pub mod layout;
pub mod member;
mod scripts;

use std::collections::{BTreeMap, HashMap};
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

pub use self::codec::Codec;
pub use self::layout::{GlobalKeys, QueueKeys};
pub use self::member::MemberFormat;
use self::scripts::Scripts;

/// The backend name in errors and capabilities.
pub(crate) const BACKEND: &str = "redisson";
/// Default side-key prefix.
pub const DEFAULT_PREFIX: &str = "overdue";
/// The key prefix of timers adopted from members a Redisson client offered.
pub const ADOPTED_KEY_PREFIX: &str = "redisson:";
/// How long opening waits for Redis.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call waits for its reply before failing (transiently).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// `now` argument that tells a script to stamp adoptions with the Redis server's `TIME`.
const SERVER_TIME: i64 = -1;
/// Longest `name_prefix`.
const MAX_NAME_PREFIX: usize = 128;

/// How to open a [`RedissonStore`]; [`RedissonOptions::from_url`] reads these from the URL.
#[derive(Clone, Debug)]
pub struct RedissonOptions {
    /// First part of overdue's side keys.
    pub prefix: String,
    /// Prepended to an overdue queue name to form the Redisson queue name.
    pub name_prefix: String,
    /// The codec of queues without one of their own.
    pub codec: Codec,
    /// Queues watched from the start, with their own codec if given.
    pub queues: BTreeMap<String, Option<Codec>>,
    /// The member layout.
    pub member: MemberFormat,
    /// Whether `Done` pushes the value to the destination list.
    pub deliver: bool,
    /// This node's name; `None` picks a unique one.
    pub node: Option<String>,
}

impl Default for RedissonOptions {
    fn default() -> Self {
        RedissonOptions {
            prefix: DEFAULT_PREFIX.to_owned(),
            name_prefix: String::new(),
            codec: Codec::default(),
            queues: BTreeMap::new(),
            member: MemberFormat::default(),
            deliver: true,
            node: None,
        }
    }
}

fn name_chars_ok(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl RedissonOptions {
    /// Splits overdue's own parameters off a `redisson://` URL; returns them and the
    /// `redis://` URL for the driver.
    pub fn from_url(url: &str) -> Result<(RedissonOptions, String)> {
        let bad = |m: String| Error::Config(format!("invalid redisson url: {m}"));
        let Some(rest) = url.strip_prefix("redisson://") else {
            return Err(bad(format!("{:?} does not start with redisson://", redact(url))));
        };
        let mut opts = RedissonOptions::default();
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut pass = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "prefix" => {
                    if v.is_empty() || v.len() > 64 || !name_chars_ok(v) {
                        return Err(bad(format!(
                            "prefix={v:?} must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
                        )));
                    }
                    opts.prefix = v.to_owned();
                }
                "name_prefix" => {
                    if v.len() > MAX_NAME_PREFIX || !name_chars_ok(v) {
                        return Err(bad(format!(
                            "name_prefix={v:?} must be at most {MAX_NAME_PREFIX} characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'"
                        )));
                    }
                    opts.name_prefix = v.to_owned();
                }
                "codec" => {
                    opts.codec = Codec::parse(v)
                        .ok_or_else(|| bad(format!("codec={v:?} is not one of string, json, bytes")))?;
                }
                "queue" => {
                    for item in v.split(',').filter(|s| !s.is_empty()) {
                        let (name, codec) = match item.split_once('@') {
                            Some((n, c)) => (
                                n,
                                Some(Codec::parse(c).ok_or_else(|| {
                                    bad(format!("queue={item:?}: codec {c:?} is not one of string, json, bytes"))
                                })?),
                            ),
                            None => (item, None),
                        };
                        overdue_core::limits::check_queue(name)
                            .map_err(|e| bad(format!("queue={item:?}: {e}")))?;
                        opts.queues.insert(name.to_owned(), codec);
                    }
                    if v.split(',').all(str::is_empty) {
                        return Err(bad("queue= needs a queue name".into()));
                    }
                }
                "member" => {
                    opts.member = MemberFormat::parse(v)
                        .ok_or_else(|| bad(format!("member={v:?} is not Bc0Lc0 (current redisson) or dLc0 (older redisson)")))?;
                }
                "deliver" => {
                    opts.deliver = match v {
                        "list" => true,
                        "none" => false,
                        _ => return Err(bad(format!("deliver={v:?} is not list or none"))),
                    };
                }
                "node" => {
                    if v.is_empty() || v.len() > 200 || v.chars().any(char::is_control) {
                        return Err(bad(format!("node={v:?} must be 1-200 printable characters")));
                    }
                    opts.node = Some(v.to_owned());
                }
                _ => pass.push(pair),
            }
        }
        let driver =
            if pass.is_empty() { format!("redis://{base}") } else { format!("redis://{base}?{}", pass.join("&")) };
        Ok((opts, driver))
    }

    /// The codec of `queue`.
    pub fn codec_of(&self, queue: &str) -> Codec {
        self.queues.get(queue).copied().flatten().unwrap_or(self.codec)
    }

    /// The Redisson name of overdue queue `queue`.
    pub fn redisson_name(&self, queue: &str) -> String {
        format!("{}{queue}", self.name_prefix)
    }
}

/// Turns a driver error into a store error; connection trouble, timeouts and a Redis that is
/// loading, read-only or failing over are transient.
fn redis_err(e: redis::RedisError) -> Error {
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

fn bad_reply(what: &str) -> Error {
    Error::Store { backend: BACKEND, message: format!("unexpected reply from redis: {what}"), transient: false, source: None }
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

fn random_node() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "node".to_owned() } else { host };
    format!("{host}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xff_ffff)
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => {
            let s = std::str::from_utf8(b).map_err(|_| bad_reply("a number that is not text"))?;
            s.parse::<i64>()
                .or_else(|_| s.parse::<f64>().map(|f| f.ceil() as i64))
                .map_err(|_| bad_reply("a number that does not parse"))
        }
        Value::SimpleString(s) => s.parse().map_err(|_| bad_reply("a number that does not parse")),
        Value::Double(f) => Ok(f.ceil() as i64),
        _ => Err(bad_reply("expected a number")),
    }
}

fn bytes(v: Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Nil => Ok(Vec::new()),
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

/// A record header `<gen>,<attempts>,<created>,<updated - created>,`.
struct Header {
    generation: u64,
    attempts: u32,
    created_at: i64,
    updated_at: i64,
}

fn parse_header(v: &[u8]) -> Result<Header> {
    let s = std::str::from_utf8(v).map_err(|_| bad_reply("a timer record header"))?;
    let mut f = s.split(',').map(|x| x.parse::<i64>());
    let mut next = || f.next().and_then(|r| r.ok()).ok_or_else(|| bad_reply("a timer record field"));
    let (g, a, c, du) = (next()?, next()?, next()?, next()?);
    Ok(Header { generation: g.max(0) as u64, attempts: a.clamp(0, u32::MAX as i64) as u32, created_at: c, updated_at: c + du })
}

/// Parses a dead letter (`<id>,<gen>,<due>,<attempts>,<failed_at>,<key len>,<error len>,<key><error><payload>`).
fn parse_dead(queue: &str, mut v: Vec<u8>) -> Result<DeadLetter> {
    let mut fields = [0i64; 7];
    let mut pos = 0;
    for f in &mut fields {
        let end = v[pos..].iter().position(|b| *b == b',').ok_or_else(|| bad_reply("a truncated dead letter"))?;
        let s = std::str::from_utf8(&v[pos..pos + end]).map_err(|_| bad_reply("a dead letter"))?;
        *f = s.parse().map_err(|_| bad_reply("a dead-letter field"))?;
        pos += end + 1;
    }
    let (kl, el) = (fields[5].max(0) as usize, fields[6].max(0) as usize);
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
        generation: fields[1].max(0) as u64,
        due_at: fields[2],
        payload,
        attempts: fields[3].max(0) as u32,
        error,
        failed_at: fields[4],
    })
}

struct Inner {
    con: ConnectionManager,
    scripts: Scripts,
    opts: RedissonOptions,
    global: GlobalKeys,
    node: String,
    healthy: AtomicBool,
}

/// Timers in Redisson's `RDelayedQueue` layout. Cheap to clone; clones share one multiplexed
/// connection. See the crate docs.
#[derive(Clone)]
pub struct RedissonStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedissonStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedissonStore")
            .field("prefix", &self.inner.opts.prefix)
            .field("name_prefix", &self.inner.opts.name_prefix)
            .field("codec", &self.inner.opts.codec)
            .field("member", &self.inner.opts.member)
            .field("node", &self.inner.node)
            .finish_non_exhaustive()
    }
}

/// Queue names of a call in byte order, and each name's 1-based index.
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

/// A range row: queue, key, due, the rest of the row.
type Row = (String, String, i64, Vec<Value>);

impl RedissonStore {
    /// Opens the store a `redisson://` URL names (see the crate docs for its parameters).
    pub async fn open_url(url: &str) -> Result<RedissonStore> {
        let (opts, driver) = RedissonOptions::from_url(url)?;
        RedissonStore::open(&driver, opts).await
    }

    /// Connects to the `redis://` URL, loads the scripts and registers the watched queues.
    pub async fn open(driver_url: &str, opts: RedissonOptions) -> Result<RedissonStore> {
        let client = redis::Client::open(driver_url)
            .map_err(|e| Error::Config(format!("invalid redisson url {}: {e}", redact(driver_url))))?;
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
        let scripts = Scripts::new(opts.member);
        for s in scripts.all() {
            s.prepare_invoke().load_async(&mut con).await.map_err(redis_err)?;
        }
        let global = GlobalKeys::new(&opts.prefix);
        if !opts.queues.is_empty() {
            let names: Vec<&String> = opts.queues.keys().collect();
            let _: i64 = redis::cmd("SADD").arg(&global.queues).arg(&names).query_async(&mut con).await.map_err(redis_err)?;
        }
        let node = opts.node.clone().unwrap_or_else(random_node);
        Ok(RedissonStore { inner: Arc::new(Inner { con, scripts, global, opts, node, healthy: AtomicBool::new(true) }) })
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &RedissonOptions {
        &self.inner.opts
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The store-wide side keys.
    pub fn global_keys(&self) -> &GlobalKeys {
        &self.inner.global
    }

    /// The keys of overdue queue `queue` (Redisson's and the side keys).
    pub fn queue_keys(&self, queue: &str) -> QueueKeys {
        QueueKeys::new(&self.inner.opts.prefix, &self.inner.opts.redisson_name(queue))
    }

    /// The connection, for callers that read the keys themselves.
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

    /// A random id for a new member, as Redisson draws one per offer.
    fn random_id(&self) -> Vec<u8> {
        match self.inner.opts.member {
            MemberFormat::Bc0Lc0 => rand::random::<[u8; 8]>().to_vec(),
            MemberFormat::DLc0 => rand::random::<i64>().to_string().into_bytes(),
        }
    }

    /// Every known queue, sorted.
    async fn queues(&self) -> Result<Vec<String>> {
        let mut con = self.con();
        let mut q: Vec<String> =
            self.track(redis::cmd("SMEMBERS").arg(&self.inner.global.queues).query_async(&mut con).await)?;
        q.sort_unstable();
        Ok(q)
    }

    /// Global keys, one group of keys per queue, and the `nq, names…` argument header.
    fn invocation<'s>(&self, script: &'s redis::Script, queues: &[&str]) -> redis::ScriptInvocation<'s> {
        let mut inv = script.prepare_invoke();
        for k in self.inner.global.all() {
            inv.key(k);
        }
        for q in queues {
            for k in self.queue_keys(q).all() {
                inv.key(k);
            }
        }
        inv.arg(queues.len());
        for q in queues {
            inv.arg(*q);
        }
        inv
    }

    async fn range(
        &self,
        queues: &[&str],
        after: Option<&(i64, String, String)>,
        due_from: Option<i64>,
        until: i64,
        limit: u32,
        // `Some(now)`: full timers, as `list` returns them; `None`: references only.
        details: Option<i64>,
    ) -> Result<Vec<Row>> {
        let (now, details) = match details {
            Some(now) => (now, true),
            // No `now` for references: a member adopted while paging gets the Redis server's
            // TIME as its created_at (a label, never a due time).
            None => (SERVER_TIME, false),
        };
        if queues.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = self.invocation(&self.inner.scripts.range, queues);
        inv.arg(until).arg(limit).arg(if details { "1" } else { "0" }).arg(now);
        for q in queues {
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
        let width = if details { 8 } else { 4 };
        let flat = array(r)?;
        if flat.len() % width != 0 {
            return Err(bad_reply("a range of the wrong width"));
        }
        let mut out = Vec::with_capacity(flat.len() / width);
        let mut it = flat.into_iter();
        while let Some(qi) = it.next() {
            let qi = int(&qi)? as usize;
            let queue = queues.get(qi.wrapping_sub(1)).ok_or_else(|| bad_reply("a queue index"))?;
            let key = text(it.next().unwrap_or_default())?;
            let due = int(&it.next().unwrap_or_default())?;
            let rest: Vec<Value> = it.by_ref().take(width - 3).collect();
            out.push(((*queue).to_owned(), key, due, rest));
        }
        out.sort_unstable_by(|a, b| (a.2, &a.0, &a.1).cmp(&(b.2, &b.0, &b.1)));
        out.truncate(limit as usize);
        Ok(out)
    }
}

/// A timer from (header, lease_until, owner, last_error, value).
fn timer_from(queue: String, key: String, due_at: i64, rest: Vec<Value>, now: i64) -> Result<Timer> {
    let mut it = rest.into_iter();
    let h = parse_header(&bytes(it.next().unwrap_or_default())?)?;
    let lease = opt(it.next().unwrap_or_default()).map(|v| int(&v)).transpose()?;
    let owner = opt(it.next().unwrap_or_default()).map(text).transpose()?;
    let last_error = opt(it.next().unwrap_or_default()).map(text).transpose()?;
    let payload = bytes(it.next().unwrap_or_default())?;
    let state = match (owner, lease) {
        (Some(owner), Some(until)) if until > now => TimerState::InFlight { owner, lease_until: until },
        _ => TimerState::Pending,
    };
    Ok(Timer {
        queue,
        key,
        due_at,
        payload,
        generation: h.generation,
        attempts: h.attempts,
        last_error,
        state,
        created_at: h.created_at,
        updated_at: h.updated_at,
    })
}

#[async_trait]
impl Store for RedissonStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities { name: BACKEND, durable: true, shared: true }
    }

    async fn schedule(&self, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        for t in &timers {
            self.inner.opts.codec_of(&t.queue).check(&t.queue, &t.key, &t.payload)?;
        }
        let qs = QueueSet::of(timers.iter().map(|t| t.queue.as_str()));
        let mut inv = self.invocation(&self.inner.scripts.schedule, &qs.names);
        inv.arg(now).arg(timers.len());
        for t in &timers {
            inv.arg(qs.idx(&t.queue)).arg(&t.key).arg(t.due_at).arg(self.random_id()).arg(&t.payload[..]);
        }
        let mut con = self.con();
        let gens: Vec<u64> = self.track(inv.invoke_async(&mut con).await)?;
        if gens.len() != timers.len() {
            return Err(bad_reply("schedule returned the wrong number of generations"));
        }
        Ok(gens)
    }

    async fn cancel(&self, queue: &str, key: &str) -> Result<Option<u64>> {
        let mut inv = self.invocation(&self.inner.scripts.cancel, &[queue]);
        // No `now` for cancel: a queue adopted by a `redisson:<sha1>` lookup is stamped with the
        // server's TIME.
        inv.arg(key).arg(SERVER_TIME);
        let mut con = self.con();
        self.track(inv.invoke_async(&mut con).await)
    }

    async fn reschedule(&self, queue: &str, key: &str, due_at: i64, now: i64) -> Result<Option<u64>> {
        let mut inv = self.invocation(&self.inner.scripts.reschedule, &[queue]);
        inv.arg(key).arg(due_at).arg(now);
        let mut con = self.con();
        self.track(inv.invoke_async(&mut con).await)
    }

    async fn get(&self, queue: &str, key: &str, now: i64) -> Result<Option<Timer>> {
        let mut inv = self.invocation(&self.inner.scripts.get, &[queue]);
        inv.arg(key).arg(now);
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let Some(r) = opt(r) else { return Ok(None) };
        let mut a = array(r)?.into_iter();
        let header = a.next().unwrap_or_default();
        let due = int(&a.next().unwrap_or_default())?;
        let mut rest = vec![header];
        rest.extend(a);
        timer_from(queue.to_owned(), key.to_owned(), due, rest, now).map(Some)
    }

    async fn list(&self, query: &ListQuery, now: i64) -> Result<Vec<Timer>> {
        let all = self.queues().await?;
        let queues: Vec<&str> = match &query.queue {
            Some(q) => all.iter().map(String::as_str).filter(|n| n == q).collect(),
            None => all.iter().map(String::as_str).collect(),
        };
        let until = query.due_to.unwrap_or(i64::MAX / 2);
        let found = self
            .range(&queues, query.after.as_ref(), query.due_from, until, query.effective_limit(), Some(now))
            .await?;
        found.into_iter().map(|(q, k, d, rest)| timer_from(q, k, d, rest, now)).collect()
    }

    async fn counts(&self, now: i64) -> Result<Vec<QueueCount>> {
        let all = self.queues().await?;
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut inv = self.invocation(&self.inner.scripts.counts, &names);
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
        let found = self.range(&names, after, None, until, limit, None).await?;
        found
            .into_iter()
            .map(|(queue, key, due_at, rest)| {
                let generation = int(rest.first().ok_or_else(|| bad_reply("a range without generation"))?)? as u64;
                Ok(TimerRef { queue, key, generation, due_at })
            })
            .collect()
    }

    async fn claim(&self, timers: &[TimerRef], owner: &str, now: i64, lease_until: i64) -> Result<Vec<Claimed>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let qs = QueueSet::of(timers.iter().map(|t| t.queue.as_str()));
        let mut inv = self.invocation(&self.inner.scripts.claim, &qs.names);
        inv.arg(now).arg(lease_until).arg(owner);
        for t in timers {
            inv.arg(qs.idx(&t.queue)).arg(&t.key).arg(t.generation);
        }
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let mut out = Vec::new();
        let mut it = array(r)?.into_iter();
        while let Some(i) = it.next() {
            let i = int(&i)? as usize;
            let t = timers.get(i.wrapping_sub(1)).ok_or_else(|| bad_reply("a claim index"))?;
            let due_at = int(&it.next().unwrap_or_default())?;
            let attempts = int(&it.next().unwrap_or_default())?.max(0) as u32;
            let payload = bytes(it.next().unwrap_or_default())?;
            out.push(Claimed { timer: TimerRef { due_at, ..t.clone() }, payload, attempts });
        }
        Ok(out)
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
        let mut inv = self.invocation(&self.inner.scripts.claim_due, &names);
        inv.arg(now).arg(due_before.min(now)).arg(limit).arg(owner).arg(lease_until);
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let mut out = Vec::new();
        let mut it = array(r)?.into_iter();
        while let Some(qi) = it.next() {
            let qi = int(&qi)? as usize;
            let queue = names.get(qi.wrapping_sub(1)).ok_or_else(|| bad_reply("a queue index"))?;
            let key = text(it.next().unwrap_or_default())?;
            let generation = int(&it.next().unwrap_or_default())? as u64;
            let due_at = int(&it.next().unwrap_or_default())?;
            let attempts = int(&it.next().unwrap_or_default())?.max(0) as u32;
            let payload = bytes(it.next().unwrap_or_default())?;
            out.push(Claimed { timer: TimerRef { queue: (*queue).to_owned(), key, generation, due_at }, payload, attempts });
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
        let mut inv = self.invocation(&self.inner.scripts.settle, &qs.names);
        inv.arg(now).arg(if self.inner.opts.deliver { "1" } else { "0" });
        for s in &batch {
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
        let mut inv = self.invocation(&self.inner.scripts.dead, &names);
        inv.arg(query.after_id.unwrap_or(i64::MIN).max(-1)).arg(limit);
        let mut con = self.con();
        let r: Value = self.track(inv.invoke_async(&mut con).await)?;
        let mut out = Vec::new();
        let mut it = array(r)?.into_iter();
        while let Some(qi) = it.next() {
            let qi = int(&qi)? as usize;
            let queue = names.get(qi.wrapping_sub(1)).ok_or_else(|| bad_reply("a queue index"))?;
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
        let mut inv = self.invocation(&self.inner.scripts.replay, &[queue.as_str()]);
        inv.arg(id).arg(due_at).arg(now).arg(self.random_id());
        self.track(inv.invoke_async(&mut con).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_split_from_the_driver_url() {
        let (o, d) = RedissonOptions::from_url(
            "redisson://u:pw@127.0.0.1:6379/2?queue=order.close@json,refund&queue=x&codec=bytes&name_prefix=shop:&member=dLc0&deliver=none&prefix=p1&node=n1&protocol=resp3",
        )
        .expect("valid");
        assert_eq!(d, "redis://u:pw@127.0.0.1:6379/2?protocol=resp3");
        assert_eq!((o.prefix.as_str(), o.name_prefix.as_str(), o.node.as_deref()), ("p1", "shop:", Some("n1")));
        assert_eq!((o.codec, o.member, o.deliver), (Codec::Bytes, MemberFormat::DLc0, false));
        assert_eq!(o.queues.keys().map(String::as_str).collect::<Vec<_>>(), ["order.close", "refund", "x"]);
        assert_eq!((o.codec_of("order.close"), o.codec_of("refund"), o.codec_of("other")), (Codec::Json, Codec::Bytes, Codec::Bytes));
        assert_eq!(o.redisson_name("order.close"), "shop:order.close");
        let (o, d) = RedissonOptions::from_url("redisson://127.0.0.1").expect("valid");
        assert_eq!((o.prefix.as_str(), o.codec, o.member, o.deliver, d.as_str()), (DEFAULT_PREFIX, Codec::String, MemberFormat::Bc0Lc0, true, "redis://127.0.0.1"));
    }

    #[test]
    fn bad_url_parameters_are_clear_config_errors() {
        for (url, needle) in [
            ("redis://x", "does not start with redisson://"),
            ("redisson://u:secret@h?codec=kryo", "codec=\"kryo\" is not one of string, json, bytes"),
            ("redisson://h?queue=a@fst", "codec \"fst\""),
            ("redisson://h?queue=", "needs a queue name"),
            ("redisson://h?queue=a%20b", "queue=\"a%20b\""),
            ("redisson://h?queue=a{b}", "queue=\"a{b}\""),
            ("redisson://h?member=ddd", "member=\"ddd\""),
            ("redisson://h?deliver=maybe", "deliver=\"maybe\""),
            ("redisson://h?prefix=", "prefix"),
            ("redisson://h?name_prefix=a{", "name_prefix"),
            ("redisson://h?node=", "node"),
        ] {
            let e = RedissonOptions::from_url(url).expect_err(url);
            assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(needle) && e.starts_with("invalid configuration: invalid redisson url"), "{url}: {e}");
            assert!(!e.contains("secret"), "{url}: the password leaked: {e}");
        }
    }

    #[test]
    fn headers_and_dead_letters_parse() {
        let h = parse_header(b"42,3,1000,5,").expect("header");
        assert_eq!((h.generation, h.attempts, h.created_at, h.updated_at), (42, 3, 1000, 1005));
        let d = parse_dead("q", b"7,42,1000,3,2000,3,4,k,1boomp\0".to_vec()).expect("dead");
        assert_eq!((d.id, d.key.as_str(), d.error.as_str(), d.payload.as_slice()), (7, "k,1", "boom", &b"p\0"[..]));
        assert!(parse_dead("q", b"7,42,1000,3,2000,300,4,k".to_vec()).is_err());
    }
}
