//! The Redisson layout itself: exact key names, the member bytes, and round trips in both
//! directions with the Java side simulated by the scripts Redisson runs (no JVM here). The
//! `JAVA_*` scripts below do, command for command, what `RedissonDelayedQueue.offerAsync`,
//! `QueueTransferTask`'s `pushTaskAsync`, `readAllAsync` and `pollAsync` send to Redis
//! (redisson/src/main/java/org/redisson/RedissonDelayedQueue.java, current source; the `dLc0`
//! variant as in its 2019 source), with the same `struct` format strings.

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use overdue_core::{DeadLetterQuery, Error, ListQuery, Outcome, Settlement, Store, TimerRef, TimerSpec};
use overdue_redisson::{RedissonStore, member};

const T0: i64 = 1_700_000_000_000;
type Con = redis::aio::MultiplexedConnection;

/// offerAsync: KEYS = destination, timeout set, ordered list, channel; ARGV = due ms, random id,
/// encoded value.
const JAVA_OFFER: &str = r"
local value = struct.pack('Bc0Lc0', string.len(ARGV[2]), ARGV[2], string.len(ARGV[3]), ARGV[3])
redis.call('zadd', KEYS[2], ARGV[1], value)
redis.call('rpush', KEYS[3], value)
local v = redis.call('zrange', KEYS[2], 0, 0)
if v[1] == value then redis.call('publish', KEYS[4], ARGV[1]) end
";

/// The same for Redisson versions whose member is `dLc0` (ARGV[2] = a random long in decimal).
const JAVA_OFFER_DLC0: &str = r"
local value = struct.pack('dLc0', tonumber(ARGV[2]), string.len(ARGV[3]), ARGV[3])
redis.call('zadd', KEYS[2], ARGV[1], value)
redis.call('rpush', KEYS[3], value)
local v = redis.call('zrange', KEYS[2], 0, 0)
if v[1] == value then redis.call('publish', KEYS[4], ARGV[1]) end
";

/// QueueTransferTask.pushTaskAsync: KEYS = destination, timeout set, ordered list; ARGV = now,
/// batch (100). `%FMT%` is the member format. Returns the next due time.
const JAVA_TRANSFER: &str = r"
local expired = redis.call('zrangebyscore', KEYS[2], 0, ARGV[1], 'limit', 0, ARGV[2])
if #expired > 0 then
  for i, v in ipairs(expired) do
    local randomId, value = struct.unpack('%FMT%', v)
    redis.call('rpush', KEYS[1], value)
    redis.call('lrem', KEYS[3], 1, v)
  end
  redis.call('zrem', KEYS[2], unpack(expired))
end
local v = redis.call('zrange', KEYS[2], 0, 0, 'WITHSCORES')
if v[1] ~= nil then return v[2] end
return nil
";

/// readAllAsync: KEYS = ordered list. The decoded values in offer order.
const JAVA_READ_ALL: &str = r"
local result = {}
local items = redis.call('lrange', KEYS[1], 0, -1)
for i, v in ipairs(items) do
  local randomId, value = struct.unpack('Bc0Lc0', v)
  table.insert(result, value)
end
return result
";

/// pollAsync: KEYS = ordered list, timeout set.
const JAVA_POLL: &str = r"
local v = redis.call('lpop', KEYS[1])
if v ~= false then
  redis.call('zrem', KEYS[2], v)
  local randomId, value = struct.unpack('Bc0Lc0', v)
  return value
end
return nil
";

async fn java_offer(con: &mut Con, name: &str, due: i64, id: &[u8], value: &[u8]) {
    let k = overdue_redisson::QueueKeys::new("unused", name);
    let _: () = redis::Script::new(JAVA_OFFER)
        .key(&k.destination)
        .key(&k.timeout)
        .key(&k.ordered)
        .key(&k.channel)
        .arg(due)
        .arg(id)
        .arg(value)
        .invoke_async(con)
        .await
        .expect("java offer");
}

async fn java_transfer(con: &mut Con, name: &str, format: &str, now: i64) -> Option<i64> {
    let k = overdue_redisson::QueueKeys::new("unused", name);
    redis::Script::new(&JAVA_TRANSFER.replace("%FMT%", format))
        .key(&k.destination)
        .key(&k.timeout)
        .key(&k.ordered)
        .arg(now)
        .arg(100)
        .invoke_async(con)
        .await
        .expect("java transfer")
}

async fn zrange(con: &mut Con, key: &str) -> Vec<(Vec<u8>, i64)> {
    redis::cmd("ZRANGE").arg(key).arg(0).arg(-1).arg("WITHSCORES").query_async(con).await.expect("ZRANGE")
}

async fn lrange(con: &mut Con, key: &str) -> Vec<Vec<u8>> {
    redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query_async(con).await.expect("LRANGE")
}

async fn sha1hex(con: &mut Con, bytes: &[u8]) -> String {
    redis::Script::new("return redis.sha1hex(ARGV[1])").arg(bytes).invoke_async(con).await.expect("sha1hex")
}

async fn open(url: &str) -> RedissonStore {
    RedissonStore::open_url(url).await.expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_timer_is_an_rdelayedqueue_item_byte_for_byte() {
    let Some(f) = common::Fresh::new("codec=string&node=n1").await else { return };
    let store = open(&f.url).await;
    let n = f.name("order.close");
    let k = store.queue_keys("order.close");
    assert_eq!(
        k.all(),
        [
            format!("redisson_delay_queue_timeout:{{{n}}}").as_str(),
            format!("redisson_delay_queue:{{{n}}}").as_str(),
            n.as_str(),
            format!("redisson_delay_queue_channel:{{{n}}}").as_str(),
            format!("{}:t:{{{n}}}", f.tag).as_str(),
            format!("{}:m:{{{n}}}", f.tag).as_str(),
            format!("{}:fly:{{{n}}}", f.tag).as_str(),
            format!("{}:lease:{{{n}}}", f.tag).as_str(),
            format!("{}:owner:{{{n}}}", f.tag).as_str(),
            format!("{}:err:{{{n}}}", f.tag).as_str(),
            format!("{}:dead:{{{n}}}", f.tag).as_str(),
        ]
    );
    let g = store.global_keys();
    let t = &f.tag;
    assert_eq!(g.all(), [format!("{t}:gen").as_str(), &format!("{t}:queues"), &format!("{t}:dlid"), &format!("{t}:dlq")]);

    // A subscriber on Redisson's channel hears the due time of the new head, as from offer().
    let client = redis::Client::open(common::server_url()).expect("client");
    let mut sub = client.get_async_pubsub().await.expect("pubsub");
    sub.subscribe(&k.channel).await.expect("subscribe");
    let gens = store.schedule(vec![TimerSpec::new("order.close", "o-1", T0 + 5_000).with_payload("o-1 ünï")], T0).await.expect("schedule");
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.on_message().next()).await.expect("a notice").expect("message");
    assert_eq!(msg.get_payload::<String>().expect("text"), (T0 + 5_000).to_string());

    let mut con = f.con();
    let members = zrange(&mut con, &k.timeout).await;
    assert_eq!(members.len(), 1, "{members:?}");
    let (m, score) = &members[0];
    assert_eq!(*score, T0 + 5_000);
    // 0x08, 8 random bytes, the value length as u64 little-endian, the UTF-8 value.
    let value = "o-1 ünï".as_bytes();
    assert_eq!(m.len(), 1 + 8 + 8 + value.len());
    assert_eq!(m[0], 8);
    assert_eq!(&m[9..17], (value.len() as u64).to_le_bytes());
    assert_eq!(&m[17..], value);
    assert_eq!(*m, member::pack_bc0lc0(&m[1..9], value));
    assert_eq!(lrange(&mut con, &k.ordered).await, vec![m.clone()]);
    // Redisson reads it back: readAll() unpacks it with struct.unpack('Bc0Lc0').
    let all: Vec<Vec<u8>> = redis::Script::new(JAVA_READ_ALL).key(&k.ordered).invoke_async(&mut con).await.expect("readAll");
    assert_eq!(all, vec![value.to_vec()]);
    // overdue's bookkeeping: record and reverse map under the same hash tag.
    let rec: Vec<u8> = redis::cmd("HGET").arg(&k.timers).arg("o-1").query_async(&mut con).await.expect("HGET");
    assert_eq!(rec, [format!("{},0,{T0},0,", gens[0]).as_bytes(), m].concat());
    let key: String = redis::cmd("HGET").arg(&k.members).arg(m).query_async(&mut con).await.expect("HGET");
    assert_eq!(key, "o-1");

    // Firing: the claim takes the member out of Redisson's keys, Done pushes the value.
    let r = TimerRef { queue: "order.close".into(), key: "o-1".into(), generation: gens[0], due_at: T0 + 5_000 };
    let c = store.claim(std::slice::from_ref(&r), "n1", T0 + 5_000, T0 + 65_000).await.expect("claim");
    assert_eq!((c.len(), c[0].payload.as_slice()), (1, value));
    assert!(zrange(&mut con, &k.timeout).await.is_empty() && lrange(&mut con, &k.ordered).await.is_empty());
    // Redisson's transfer, running meanwhile, cannot move a claimed timer.
    assert_eq!(java_transfer(&mut con, &n, "Bc0Lc0", T0 + 10_000).await, None);
    assert!(lrange(&mut con, &k.destination).await.is_empty());
    store.settle(vec![Settlement::Done(r)], T0 + 5_001).await.expect("settle");
    assert_eq!(lrange(&mut con, &k.destination).await, vec![value.to_vec()]);
    let left: i64 = redis::cmd("EXISTS").arg(&k.timers).arg(&k.members).arg(&k.fly).arg(&k.lease).arg(&k.owner).query_async(&mut con).await.expect("EXISTS");
    assert_eq!(left, 0, "side keys left after done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_java_offer_is_an_overdue_timer_and_lands_where_redissons_transfer_puts_it() {
    let Some(f) = common::Fresh::new("codec=json").await else { return };
    let store = open(&f.url).await;
    let mut con = f.con();
    let (a, b) = (f.name("a"), f.name("b"));
    let value = br#"{"@class":"com.shop.OrderClose","orderId":"o-7"}"#;
    let id = [9u8, 8, 7, 6, 5, 4, 3, 2];
    // The same offer into two queues: overdue fires `a`, Redisson's own transfer moves `b`.
    java_offer(&mut con, &a, T0 + 1_000, &id, value).await;
    java_offer(&mut con, &b, T0 + 1_000, &id, value).await;
    let m = member::pack_bc0lc0(&id, value);
    let ka = store.queue_keys("a");
    assert_eq!(zrange(&mut con, &ka.timeout).await, vec![(m.clone(), T0 + 1_000)], "the hand-built member is what Redisson's offer wrote");

    // overdue sees it (the URL did not name the queue: list it by name once it is known).
    let _: i64 = redis::cmd("SADD").arg(&store.global_keys().queues).arg("a").query_async(&mut con).await.expect("SADD");
    let key = format!("redisson:{}", sha1hex(&mut con, &m).await);
    let listed = store.list(&ListQuery::default(), T0).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].key.as_str(), listed[0].due_at, listed[0].payload.as_slice(), listed[0].attempts), (key.as_str(), T0 + 1_000, &value[..], 0));
    let t = store.get("a", &key, T0).await.expect("get").expect("adopted");
    assert_eq!(t.generation, listed[0].generation);
    // Nothing due yet; then overdue claims and fires it.
    assert!(store.claim_due(T0 + 999, T0 + 999, 10, "n", T0 + 60_000).await.expect("claim").is_empty());
    let c = store.claim_due(T0 + 1_000, T0 + 1_000, 10, "n", T0 + 60_000).await.expect("claim");
    assert_eq!(c.len(), 1);
    assert_eq!((c[0].timer.key.as_str(), c[0].payload.as_slice()), (key.as_str(), &value[..]));
    store.settle(vec![Settlement::Done(c[0].timer.clone())], T0 + 1_001).await.expect("settle");
    assert_eq!(java_transfer(&mut con, &b, "Bc0Lc0", T0 + 1_000).await, None);
    let (da, db) = (lrange(&mut con, &a).await, lrange(&mut con, &b).await);
    assert_eq!(da, vec![value.to_vec()]);
    assert_eq!(da, db, "overdue's transfer and Redisson's put the same bytes in the destination");
    for q in [&ka, &store.queue_keys("b")] {
        assert!(zrange(&mut con, &q.timeout).await.is_empty() && lrange(&mut con, &q.ordered).await.is_empty());
    }
    assert!(store.get("a", &key, T0 + 2_000).await.expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_redisson_moved_or_polled_is_gone_for_overdue_too() {
    let Some(f) = common::Fresh::new("codec=string").await else { return };
    let store = open(&f.url).await;
    let mut con = f.con();
    let gens = store
        .schedule(vec![TimerSpec::new("q", "moved", T0 + 10).with_payload("m"), TimerSpec::new("q", "polled", T0 + 20).with_payload("p")], T0)
        .await
        .expect("schedule");
    let k = store.queue_keys("q");
    // Redisson's poll() takes the first item of the ordered list (offer order).
    let polled: Option<Vec<u8>> = redis::Script::new(JAVA_POLL).key(&k.ordered).key(&k.timeout).invoke_async(&mut con).await.expect("poll");
    assert_eq!(polled.as_deref(), Some(&b"m"[..]));
    // Redisson's transfer moves the other one when due.
    assert_eq!(java_transfer(&mut con, &f.name("q"), "Bc0Lc0", T0 + 20).await, None);
    assert_eq!(lrange(&mut con, &k.destination).await, vec![b"p".to_vec()]);
    for (key, g) in [("moved", gens[0]), ("polled", gens[1])] {
        assert!(store.get("q", key, T0 + 30).await.expect("get").is_none(), "{key}");
        let r = TimerRef { queue: "q".into(), key: key.into(), generation: g, due_at: T0 };
        assert!(store.claim(&[r], "n", T0 + 30, T0 + 90).await.expect("claim").is_empty(), "{key}");
        assert_eq!(store.cancel("q", key).await.expect("cancel"), None);
    }
    assert!(store.counts(T0 + 30).await.expect("counts").is_empty());
    let left: i64 = redis::cmd("EXISTS").arg(&k.timers).arg(&k.members).query_async(&mut con).await.expect("EXISTS");
    assert_eq!(left, 0, "stale records are dropped once seen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlc0_members_round_trip_with_older_redisson() {
    let Some(f) = common::Fresh::new("codec=json&member=dLc0").await else { return };
    let store = open(&f.url).await;
    let mut con = f.con();
    let (n, k) = (f.name("q"), store.queue_keys("q"));
    // Java (old layout) offers; overdue adopts and fires it.
    let _: () = redis::Script::new(JAVA_OFFER_DLC0)
        .key(&k.destination)
        .key(&k.timeout)
        .key(&k.ordered)
        .key(&k.channel)
        .arg(T0 + 5)
        .arg("5220409939115423359")
        .arg(br#""helloworld00""#)
        .invoke_async(&mut con)
        .await
        .expect("offer");
    let m = member::pack_dlc0(5_220_409_939_115_423_359, br#""helloworld00""#);
    assert_eq!(zrange(&mut con, &k.timeout).await, vec![(m, T0 + 5)]);
    let c = store.claim_due(T0 + 5, T0 + 5, 10, "n", T0 + 100).await.expect("claim");
    assert!(c.is_empty(), "queue not known yet: {c:?}");
    let store = open(&f.url_with("queue=q")).await;
    let c = store.claim_due(T0 + 5, T0 + 5, 10, "n", T0 + 100).await.expect("claim");
    assert_eq!(c.iter().map(|c| c.payload.as_slice()).collect::<Vec<_>>(), [&br#""helloworld00""#[..]]);
    store.settle(vec![Settlement::Done(c[0].timer.clone())], T0 + 6).await.expect("settle");
    // overdue offers in the old layout; the old transfer script moves it.
    store.schedule(vec![TimerSpec::new("q", "o", T0 + 7).with_payload(&br#"["java.lang.Long",7]"#[..])], T0).await.expect("schedule");
    let ms = zrange(&mut con, &k.timeout).await;
    assert_eq!(member::unpack(member::MemberFormat::DLc0, &ms[0].0).map(|(_, v)| v.to_vec()), Ok(br#"["java.lang.Long",7]"#.to_vec()));
    assert_eq!(java_transfer(&mut con, &n, "dLc0", T0 + 7).await, None);
    assert_eq!(lrange(&mut con, &k.destination).await, vec![br#""helloworld00""#.to_vec(), br#"["java.lang.Long",7]"#.to_vec()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_foreign_members_are_dead_lettered_and_block_nothing() {
    let Some(f) = common::Fresh::new("codec=bytes&queue=q").await else { return };
    let store = open(&f.url).await;
    let mut con = f.con();
    let k = store.queue_keys("q");
    let bad: [&[u8]; 4] = [b"", b"\x08short", b"\x00\xff\xff\xff\xff\xff\xff\xff\xffx", b"\x08abcdefgh\x09\x00\x00\x00\x00\x00\x00\x00abc"];
    for (i, m) in bad.iter().enumerate() {
        let _: i64 = redis::cmd("ZADD").arg(&k.timeout).arg(T0 + i as i64).arg(*m).query_async(&mut con).await.expect("ZADD");
        let _: i64 = redis::cmd("RPUSH").arg(&k.ordered).arg(*m).query_async(&mut con).await.expect("RPUSH");
    }
    java_offer(&mut con, &f.name("q"), T0 + 2, b"12345678", b"good").await;
    let c = store.claim_due(T0 + 10, T0 + 10, 100, "n", T0 + 100).await.expect("a malformed member is not an error");
    assert_eq!(c.iter().map(|c| c.payload.as_slice()).collect::<Vec<_>>(), [&b"good"[..]]);
    let dead = store.dead_letters(&DeadLetterQuery::default()).await.expect("dead");
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for d in &dead {
        assert!(d.error.starts_with("malformed redisson member: ") && d.error.contains("Bc0Lc0"), "{}", d.error);
        assert!(d.key.starts_with("redisson:") && d.key.len() == 49, "{}", d.key);
        assert!(bad.contains(&d.payload.as_slice()), "the raw member is kept: {:?}", d.payload);
    }
    assert!(zrange(&mut con, &k.timeout).await.is_empty());
    assert!(lrange(&mut con, &k.ordered).await.is_empty(), "malformed members leave the ordered list too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_payloads_are_config_errors_that_change_nothing() {
    let Some(f) = common::Fresh::new("codec=json&queue=raw@bytes").await else { return };
    for url in [f.url_with("codec=kryo"), f.url_with("member=x"), f.url_with("queue=a b"), f.url.replacen("redisson://", "redis://", 1)] {
        let e = RedissonStore::open_url(&url).await.expect_err(&url);
        assert!(matches!(e, Error::Config(_)), "{url}: {e:?}");
    }
    let store = open(&f.url).await;
    for (what, payload) in [("not json", &b"o-1"[..]), ("untyped object", br#"{"a":1}"#), ("null", b"null")] {
        let batch = vec![TimerSpec::new("q", "good", T0).with_payload(&br#""ok""#[..]), TimerSpec::new("q", "bad", T0).with_payload(payload)];
        let e = store.schedule(batch, T0).await.expect_err(what);
        assert!(matches!(&e, Error::Config(m) if m.contains("(q, bad)") && m.contains("JsonJacksonCodec")), "{what}: {e}");
    }
    let mut con = f.con();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("*{}.q*", f.tag)).query_async(&mut con).await.expect("KEYS");
    assert!(keys.is_empty(), "a refused batch wrote {keys:?}");
    // The per-queue codec: bytes are fine on `raw`.
    store.schedule(vec![TimerSpec::new("raw", "b", T0).with_payload(vec![0xff, 0])], T0).await.expect("bytes codec");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_none_leaves_the_destination_to_the_handler() {
    let Some(f) = common::Fresh::new("codec=string&deliver=none").await else { return };
    let store = open(&f.url).await;
    let g = store.schedule(vec![TimerSpec::new("q", "k", T0).with_payload("v")], T0).await.expect("schedule");
    let r = TimerRef { queue: "q".into(), key: "k".into(), generation: g[0], due_at: T0 };
    assert_eq!(store.claim(std::slice::from_ref(&r), "n", T0, T0 + 1_000).await.expect("claim").len(), 1);
    store.settle(vec![Settlement::Done(r)], T0).await.expect("settle");
    let mut con = f.con();
    assert!(lrange(&mut con, &f.name("q")).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_fires_java_offers_and_redisson_consumers_get_overdues() {
    let Some(f) = common::Fresh::new("codec=json&queue=order.close").await else { return };
    let mut con = f.con();
    let n = f.name("order.close");
    java_offer(&mut con, &n, T0 + 1_000, b"javajava", br#""from-java""#).await;
    let store: Arc<dyn Store> = Arc::new(open(&f.url).await);
    let clock = overdue_core::ManualClock::new(T0);
    let seen = Arc::new(recorded::Seen::default());
    let s2 = seen.clone();
    let engine = overdue_engine::Engine::builder(store.clone())
        .clock(Arc::new(clock.clone()))
        .handler("order.close", overdue_engine::QueueConfig::default(), move |fr: overdue_core::Firing| {
            let s = s2.clone();
            async move {
                s.push(fr.payload);
                Outcome::Done
            }
        })
        .start()
        .await
        .expect("start");
    engine.schedule(TimerSpec::new("order.close", "o-2", T0 + 2_000).with_payload(&br#""from-rust""#[..])).await.expect("schedule");
    clock.set(T0 + 1_999);
    engine.settle().await;
    assert_eq!(seen.take(), vec![br#""from-java""#.to_vec()], "the java offer fires at its due time");
    clock.set(T0 + 2_000);
    engine.settle().await;
    assert_eq!(seen.take(), vec![br#""from-rust""#.to_vec()]);
    // A Java consumer's take() pops from the head of the destination list.
    assert_eq!(lrange(&mut con, &n).await, vec![br#""from-java""#.to_vec(), br#""from-rust""#.to_vec()]);
    engine.shutdown(Duration::from_secs(1)).await;
}

/// A tiny shared Vec without another dependency.
mod recorded {
    #[derive(Default)]
    pub struct Seen(std::sync::Mutex<Vec<Vec<u8>>>);
    impl Seen {
        pub fn push(&self, v: Vec<u8>) {
            if let Ok(mut g) = self.0.lock() {
                g.push(v);
            }
        }
        pub fn take(&self) -> Vec<Vec<u8>> {
            self.0.lock().map(|mut g| std::mem::take(&mut *g)).unwrap_or_default()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_nodes_and_a_java_transfer_deliver_each_value_exactly_once() {
    let Some(f) = common::Fresh::new("codec=string&queue=q").await else { return };
    let (a, b) = (open(&f.url_with("node=a")).await, open(&f.url_with("node=b")).await);
    let mut con = f.con();
    let n = f.name("q");
    let specs: Vec<TimerSpec> =
        (0..1_000).map(|i| TimerSpec::new("q", format!("o{i}"), T0 + i % 50).with_payload(format!("o{i}"))).collect();
    a.schedule(specs, T0).await.expect("schedule");
    for i in 0..1_000u64 {
        java_offer(&mut con, &n, T0 + (i % 50) as i64, &i.to_le_bytes(), format!("j{i}").as_bytes()).await;
    }
    let drain = |s: RedissonStore| async move {
        loop {
            let c = s.claim_due(T0 + 100, T0 + 100, 100, s.node(), T0 + 60_000).await.expect("claim");
            if c.is_empty() {
                break;
            }
            s.settle(c.into_iter().map(|c| Settlement::Done(c.timer)).collect(), T0 + 100).await.expect("settle");
        }
    };
    let java = async {
        let mut con = f.con();
        while java_transfer(&mut con, &n, "Bc0Lc0", T0 + 100).await.is_some() {}
    };
    tokio::join!(drain(a.clone()), drain(b.clone()), java);
    drain(a.clone()).await;
    let mut got: Vec<String> =
        lrange(&mut con, &n).await.into_iter().map(|v| String::from_utf8(v).expect("utf-8")).collect();
    got.sort();
    let mut want: Vec<String> = (0..1_000).flat_map(|i| [format!("o{i}"), format!("j{i}")]).collect();
    want.sort();
    assert_eq!(got.len(), want.len(), "values delivered more or less than once");
    assert_eq!(got, want);
    let k = a.queue_keys("q");
    let left: i64 = redis::cmd("EXISTS")
        .arg(&k.timeout)
        .arg(&k.ordered)
        .arg(&k.fly)
        .arg(&k.lease)
        .query_async(&mut con)
        .await
        .expect("EXISTS");
    assert_eq!(left, 0);
    assert!(a.list(&ListQuery::default(), T0 + 200).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_java_offer_can_be_read_moved_and_cancelled_by_its_key_before_any_scan() {
    let Some(f) = common::Fresh::new("codec=string&queue=q").await else { return };
    let store = open(&f.url).await;
    let mut con = f.con();
    let n = f.name("q");
    java_offer(&mut con, &n, T0 + 500, b"aaaaaaaa", b"first").await;
    java_offer(&mut con, &n, T0 + 600, b"bbbbbbbb", b"second").await;
    let key = |id: &[u8], v: &[u8]| member::pack_bc0lc0(id, v);
    let k1 = format!("redisson:{}", sha1hex(&mut con, &key(b"aaaaaaaa", b"first")).await);
    let k2 = format!("redisson:{}", sha1hex(&mut con, &key(b"bbbbbbbb", b"second")).await);
    let t = store.get("q", &k1, T0).await.expect("get").expect("found by its key");
    assert_eq!((t.due_at, t.payload.as_slice()), (T0 + 500, &b"first"[..]));
    let g = store.reschedule("q", &k1, T0 + 700, T0).await.expect("reschedule").expect("found");
    assert!(g > t.generation);
    let zk = store.queue_keys("q");
    assert_eq!(zrange(&mut con, &zk.timeout).await.iter().map(|(_, s)| *s).collect::<Vec<_>>(), [T0 + 600, T0 + 700]);
    assert!(store.cancel("q", &k2).await.expect("cancel").is_some());
    assert_eq!(store.cancel("q", &k2).await.expect("cancel"), None);
    let all: Vec<Vec<u8>> = redis::Script::new(JAVA_READ_ALL).key(&zk.ordered).invoke_async(&mut con).await.expect("readAll");
    assert_eq!(all, vec![b"first".to_vec()], "the cancelled offer left the ordered list");
    assert!(store.get("q", "redisson:0000000000000000000000000000000000000000", T0).await.expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_claims_keep_the_ordered_list_exact() {
    let Some(f) = common::Fresh::new("codec=string").await else { return };
    let store = open(&f.url).await;
    let mut con = f.con();
    let k = store.queue_keys("q");
    // 40 timers offered in key order, due in an interleaved order; claim the 23 due first in one
    // batch (the one-scan path), then 2 more (the LREM path).
    let due = |i: i64| T0 + (i * 7) % 40;
    let specs: Vec<TimerSpec> = (0..40).map(|i| TimerSpec::new("q", format!("k{i:02}"), due(i)).with_payload(format!("v{i:02}"))).collect();
    store.schedule(specs, T0).await.expect("schedule");
    let before = lrange(&mut con, &k.ordered).await;
    assert_eq!(before.len(), 40);
    let c = store.claim_due(T0 + 22, T0 + 22, 100, "n", T0 + 1_000).await.expect("claim");
    assert_eq!(c.len(), 23);
    let c2 = store.claim_due(T0 + 24, T0 + 24, 100, "n", T0 + 1_000).await.expect("claim");
    assert_eq!(c2.len(), 2);
    let gone: std::collections::HashSet<Vec<u8>> = c.iter().chain(&c2).map(|c| c.payload.clone()).collect();
    let want: Vec<Vec<u8>> = before
        .into_iter()
        .filter(|m| member::unpack(member::MemberFormat::Bc0Lc0, m).is_ok_and(|(_, v)| !gone.contains(v)))
        .collect();
    assert_eq!(want.len(), 15);
    assert_eq!(lrange(&mut con, &k.ordered).await, want, "the rest stays, in offer order");
    let mut z: Vec<Vec<u8>> = zrange(&mut con, &k.timeout).await.into_iter().map(|(m, _)| m).collect();
    let mut w = want.clone();
    z.sort();
    w.sort();
    assert_eq!(z, w, "the ordered list and the timeout set hold the same members");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_a_millisecond_tie_returns_every_timer_once_in_key_order() {
    let Some(f) = common::Fresh::new("codec=string").await else { return };
    let store = open(&f.url).await;
    let specs: Vec<TimerSpec> = (0..300).map(|i| TimerSpec::new("q", format!("k{i:03}"), T0 + 5).with_payload("v")).collect();
    store.schedule(specs, T0).await.expect("schedule");
    store.schedule(vec![TimerSpec::new("q", "after", T0 + 6)], T0).await.expect("schedule");
    let mut seen = Vec::new();
    let mut q = ListQuery { limit: 40, ..Default::default() };
    loop {
        let page = store.list(&q, T0).await.expect("list");
        assert!(page.len() <= 40, "a page of {}", page.len());
        let Some(last) = page.last() else { break };
        q.after = Some((last.due_at, last.queue.clone(), last.key.clone()));
        seen.extend(page.into_iter().map(|t| t.key));
    }
    let mut want: Vec<String> = (0..300).map(|i| format!("k{i:03}")).collect();
    want.push("after".into());
    assert_eq!(seen, want);
    let refs = store.due_refs(None, T0 + 5, 1_000).await.expect("refs");
    assert_eq!(refs.len(), 300);
}
