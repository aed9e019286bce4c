//! The Lua scripts. Every mutation is one script, so Redis runs it atomically (no other command
//! runs while a script does).
//!
//! Each script gets the keys of the queues it touches as `KEYS`, seven per queue in the order of
//! [`crate::layout::QueueKeys::all`]: `due`, `t`, `fly`, `lease`, `owner`, `err`, `dead`. A
//! group starting at index `b` has `due = KEYS[b]`, `t = KEYS[b+1]`, and so on.
//!
//! A timer's record (the field `key` of the `t` hash) is
//! `<generation>,<attempts>,<created_at>,<updated - created>,<payload bytes>`; its due time is its
//! score in `due` (pending) or `fly` (claimed), so it is not repeated in the record.

/// Helpers every script starts with.
const PRELUDE: &str = r#"
local function parse(v)
  local _, e, g, a, c, du = string.find(v, '^(%d+),(%d+),(%d+),(%d+),')
  return g, a, c, du, e
end
local function fmt(n) return string.format('%d', n) end
local function record(g, attempts, created, updated, payload)
  return g .. ',' .. attempts .. ',' .. created .. ',' .. fmt(tonumber(updated) - tonumber(created)) .. ',' .. payload
end
local function drop(b, key)
  redis.call('ZREM', KEYS[b], key)
  redis.call('HDEL', KEYS[b + 1], key)
  redis.call('ZREM', KEYS[b + 2], key)
  redis.call('ZREM', KEYS[b + 3], key)
  redis.call('HDEL', KEYS[b + 4], key)
  redis.call('HDEL', KEYS[b + 5], key)
end
-- Drops the claim and makes the timer pending again, due at due (or where it was).
local function unlease(b, key, due)
  local d = redis.call('ZSCORE', KEYS[b + 2], key)
  if d then
    redis.call('ZREM', KEYS[b + 2], key)
    redis.call('ZREM', KEYS[b + 3], key)
    redis.call('HDEL', KEYS[b + 4], key)
  end
  due = due or d
  if due then redis.call('ZADD', KEYS[b], due, key) end
end
-- The due time of a stored timer, pending or in flight.
local function due_of(b, key)
  return redis.call('ZSCORE', KEYS[b], key) or redis.call('ZSCORE', KEYS[b + 2], key)
end
-- Byte-wise string order (Lua's < follows the server's locale).
local function lt(x, y)
  local n = math.min(#x, #y)
  for i = 1, n do
    local p, q = string.byte(x, i), string.byte(y, i)
    if p ~= q then return p < q end
  end
  return #x < #y
end
-- Upserts one timer with generation g: attempts 0, no error, no lease; keeps created_at.
local function upsert(b, key, due, payload, g, now)
  local created = now
  local old = redis.call('HGET', KEYS[b + 1], key)
  if old then
    local _, _, c = parse(old)
    if c then created = c end
    redis.call('ZREM', KEYS[b + 2], key)
    redis.call('ZREM', KEYS[b + 3], key)
    redis.call('HDEL', KEYS[b + 4], key)
    redis.call('HDEL', KEYS[b + 5], key)
  end
  redis.call('HSET', KEYS[b + 1], key, record(fmt(g), 0, created, now, payload))
  redis.call('ZADD', KEYS[b], due, key)
end
-- If key (record v) is due at now and not under a live lease, claims it for owner until
-- lease_until and returns due, attempts, payload.
local function take(b, key, v, now, owner, lease_until)
  local due = redis.call('ZSCORE', KEYS[b], key)
  if due then
    if tonumber(due) > now then return nil end
    redis.call('ZREM', KEYS[b], key)
    redis.call('ZADD', KEYS[b + 2], due, key)
  else
    local l = redis.call('ZSCORE', KEYS[b + 3], key)
    if not l or tonumber(l) > now then return nil end
    due = redis.call('ZSCORE', KEYS[b + 2], key)
    if not due or tonumber(due) > now then return nil end
  end
  redis.call('ZADD', KEYS[b + 3], lease_until, key)
  redis.call('HSET', KEYS[b + 4], key, owner)
  local g, a, c, du, e = parse(v)
  return due, tonumber(a), string.sub(v, e + 1)
end
"#;

/// KEYS: gen, queues, then a group per queue. ARGV: now, n, nq, the nq queue names, then n
/// entries of (queue index, key, due_at, payload). Returns the generations in input order.
const SCHEDULE: &str = r#"
local now, n, nq = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, nq do redis.call('SADD', KEYS[2], ARGV[3 + i]) end
local last = redis.call('INCRBY', KEYS[1], n)
local first = last - n + 1
local out = {}
local o = 3 + nq
for i = 0, n - 1 do
  local qi = tonumber(ARGV[o + 1])
  upsert(3 + (qi - 1) * 7, ARGV[o + 2], ARGV[o + 3], ARGV[o + 4], first + i, now)
  out[i + 1] = first + i
  o = o + 4
end
return out
"#;

/// KEYS: one group. ARGV: key. Returns the removed generation or nil.
const CANCEL: &str = r#"
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return false end
local g = parse(v)
drop(1, ARGV[1])
return tonumber(g)
"#;

/// KEYS: gen, one group (from 2). ARGV: key, due_at, now. New generation, attempts 0, no lease.
const RESCHEDULE: &str = r#"
local v = redis.call('HGET', KEYS[3], ARGV[1])
if not v then return false end
local g, a, c, du, e = parse(v)
local ng = redis.call('INCR', KEYS[1])
upsert(2, ARGV[1], ARGV[2], string.sub(v, e + 1), ng, ARGV[3])
return ng
"#;

/// KEYS: one group. ARGV: key. Returns {record, due, lease_until, owner, last_error} or nil.
const GET: &str = r#"
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return false end
return {v, due_of(1, ARGV[1]), redis.call('ZSCORE', KEYS[4], ARGV[1]),
        redis.call('HGET', KEYS[5], ARGV[1]), redis.call('HGET', KEYS[6], ARGV[1])}
"#;

/// KEYS: a group per queue. ARGV: now, lease_until, owner, then (queue index, key, generation)
/// triples. Returns (entry index, due, attempts, payload) per claimed timer.
const CLAIM: &str = r#"
local now, lease_until, owner = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local out = {}
local i = 0
for o = 4, #ARGV, 3 do
  i = i + 1
  local b, key = 1 + (tonumber(ARGV[o]) - 1) * 7, ARGV[o + 1]
  local v = redis.call('HGET', KEYS[b + 1], key)
  if v and parse(v) == ARGV[o + 2] then
    local d, a, p = take(b, key, v, now, owner, lease_until)
    if d then
      out[#out + 1] = i
      out[#out + 1] = d
      out[#out + 1] = a
      out[#out + 1] = p
    end
  end
end
return out
"#;

/// KEYS: a group per queue (queues in byte order). ARGV: now, due_before, limit, owner,
/// lease_until. Takes up to limit timers that are pending and due by due_before, or in flight
/// under an expired lease, earliest first. Returns (queue index, key, generation, due,
/// attempts, payload) per claim.
const CLAIM_DUE: &str = r#"
local now, due_before, limit, owner, lease_until =
  tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local cands = {}
for qi = 1, #KEYS / 7 do
  local b = 1 + (qi - 1) * 7
  local r = redis.call('ZRANGEBYSCORE', KEYS[b], '-inf', due_before, 'WITHSCORES', 'LIMIT', 0, limit)
  for j = 1, #r, 2 do cands[#cands + 1] = {tonumber(r[j + 1]), qi, r[j]} end
  local x = redis.call('ZRANGEBYSCORE', KEYS[b + 3], '-inf', now, 'LIMIT', 0, limit)
  for j = 1, #x do
    local d = redis.call('ZSCORE', KEYS[b + 2], x[j])
    if d and tonumber(d) <= tonumber(due_before) then cands[#cands + 1] = {tonumber(d), qi, x[j]} end
  end
end
table.sort(cands, function(x, y)
  if x[1] ~= y[1] then return x[1] < y[1] end
  if x[2] ~= y[2] then return x[2] < y[2] end
  return lt(x[3], y[3])
end)
local out = {}
for j = 1, math.min(limit, #cands) do
  local qi, key = cands[j][2], cands[j][3]
  local b = 1 + (qi - 1) * 7
  local v = redis.call('HGET', KEYS[b + 1], key)
  if v then
    local g = parse(v)
    local d, a, p = take(b, key, v, now, owner, lease_until)
    if d then
      out[#out + 1] = qi
      out[#out + 1] = key
      out[#out + 1] = tonumber(g)
      out[#out + 1] = d
      out[#out + 1] = a
      out[#out + 1] = p
    end
  end
end
return out
"#;

/// KEYS: dead-letter id counter, dead-letter index, then a group per queue. ARGV: now, nq, the
/// queue names, then 7-field entries (kind, queue index, key, generation, x1, x2, x3):
/// `D` done; `L` release; `R` retry (x1 due, x2 attempts, x3 error); `X` dead letter (x1
/// attempts, x2 error, x3 failed_at). Each applies only if the generation is unchanged.
const SETTLE: &str = r#"
local now, nq = ARGV[1], tonumber(ARGV[2])
local applied = 0
for o = 3 + nq, #ARGV, 7 do
  local kind, qi, key, gen = ARGV[o], tonumber(ARGV[o + 1]), ARGV[o + 2], ARGV[o + 3]
  local b = 3 + (qi - 1) * 7
  local v = redis.call('HGET', KEYS[b + 1], key)
  if v then
    local g, a, c, du, e = parse(v)
    if g == gen then
      applied = applied + 1
      if kind == 'D' then
        drop(b, key)
      elseif kind == 'L' then
        unlease(b, key, nil)
      elseif kind == 'R' then
        redis.call('HSET', KEYS[b + 1], key, record(g, ARGV[o + 5], c, now, string.sub(v, e + 1)))
        redis.call('HSET', KEYS[b + 5], key, ARGV[o + 6])
        unlease(b, key, ARGV[o + 4])
      elseif kind == 'X' then
        local id = redis.call('INCR', KEYS[1])
        local due = due_of(b, key) or '0'
        local err = ARGV[o + 5]
        local m = fmt(id) .. ',' .. g .. ',' .. due .. ',' .. ARGV[o + 4] .. ',' .. ARGV[o + 6] .. ',' ..
          fmt(#key) .. ',' .. fmt(#err) .. ',' .. key .. err .. string.sub(v, e + 1)
        redis.call('ZADD', KEYS[b + 6], id, m)
        redis.call('HSET', KEYS[2], fmt(id), ARGV[2 + qi])
        drop(b, key)
      end
    end
  end
end
return applied
"#;

/// KEYS: gen, dead-letter index, one group (from 3). ARGV: id, due_at, now. Moves the dead
/// letter back into the timers with a new generation. Returns it, or nil.
const REPLAY: &str = r#"
local r = redis.call('ZRANGEBYSCORE', KEYS[9], ARGV[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if #r == 0 then return false end
local m = r[1]
local _, e, id, g, d, a, f, kl, el = string.find(m, '^(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),')
local key = string.sub(m, e + 1, e + tonumber(kl))
local payload = string.sub(m, e + tonumber(kl) + tonumber(el) + 1)
redis.call('ZREM', KEYS[9], m)
local ng = redis.call('INCR', KEYS[1])
redis.call('ZREM', KEYS[3], key)
upsert(3, key, ARGV[2], payload, ng, ARGV[3])
return ng
"#;

/// KEYS: a group per queue. ARGV: until, limit, details (0/1), then per queue (mode, lo, key):
/// mode `a` from -inf, `i` due >= lo, `x` due > lo, `k` (due, key) > (lo, key). Reads the
/// pending set and the in-flight set of each queue. Returns per timer (queue index, key, due,
/// record-or-generation, lease_until, owner, last_error); without details only the first four,
/// with the generation instead of the record.
const RANGE: &str = r#"
local upto, limit, details = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local function rng(z, mode, lo, ck)
  if mode == 'k' then
    local start = redis.call('ZCOUNT', z, '-inf', '(' .. lo)
    local hi = start + redis.call('ZCOUNT', z, lo, lo)
    -- First rank in [start, hi) whose member sorts after ck (members of one score are in byte order).
    while start < hi do
      local mid = math.floor((start + hi) / 2)
      local m = redis.call('ZRANGE', z, mid, mid)[1]
      if lt(ck, m) then hi = mid else start = mid + 1 end
    end
    return redis.call('ZRANGE', z, start, start + limit - 1, 'WITHSCORES')
  end
  local min = '-inf'
  if mode == 'i' then min = lo elseif mode == 'x' then min = '(' .. lo end
  return redis.call('ZRANGEBYSCORE', z, min, upto, 'WITHSCORES', 'LIMIT', 0, limit)
end
local out = {}
for qi = 1, #KEYS / 7 do
  local b = 1 + (qi - 1) * 7
  local o = 4 + (qi - 1) * 3
  for _, z in ipairs({KEYS[b], KEYS[b + 2]}) do
    local r = rng(z, ARGV[o], ARGV[o + 1], ARGV[o + 2])
    for j = 1, #r, 2 do
      if tonumber(r[j + 1]) > tonumber(upto) then break end
      local key = r[j]
      local v = redis.call('HGET', KEYS[b + 1], key)
      if v then
        out[#out + 1] = qi
        out[#out + 1] = key
        out[#out + 1] = r[j + 1]
        if details then
          out[#out + 1] = v
          out[#out + 1] = redis.call('ZSCORE', KEYS[b + 3], key)
          out[#out + 1] = redis.call('HGET', KEYS[b + 4], key)
          out[#out + 1] = redis.call('HGET', KEYS[b + 5], key)
        else
          out[#out + 1] = parse(v)
        end
      end
    end
  end
end
return out
"#;

/// KEYS: a group per queue. ARGV: now. Returns (stored, live leases, dead) per queue.
const COUNTS: &str = r#"
local out = {}
for qi = 1, #KEYS / 7 do
  local b = 1 + (qi - 1) * 7
  out[#out + 1] = redis.call('ZCARD', KEYS[b]) + redis.call('ZCARD', KEYS[b + 2])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[b + 3], '(' .. ARGV[1], '+inf')
  out[#out + 1] = redis.call('ZCARD', KEYS[b + 6])
end
return out
"#;

/// KEYS: a group per queue. ARGV: after_id, limit. Returns (queue index, member) per dead
/// letter, each queue's in id order.
const DEAD: &str = r#"
local out = {}
for qi = 1, #KEYS / 7 do
  local r = redis.call('ZRANGEBYSCORE', KEYS[qi * 7], '(' .. ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
  for j = 1, #r do
    out[#out + 1] = qi
    out[#out + 1] = r[j]
  end
end
return out
"#;

/// The loaded scripts.
#[derive(Debug)]
pub(crate) struct Scripts {
    pub schedule: redis::Script,
    pub cancel: redis::Script,
    pub reschedule: redis::Script,
    pub get: redis::Script,
    pub claim: redis::Script,
    pub claim_due: redis::Script,
    pub settle: redis::Script,
    pub replay: redis::Script,
    pub range: redis::Script,
    pub counts: redis::Script,
    pub dead: redis::Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        let s = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        Scripts {
            schedule: s(SCHEDULE),
            cancel: s(CANCEL),
            reschedule: s(RESCHEDULE),
            get: s(GET),
            claim: s(CLAIM),
            claim_due: s(CLAIM_DUE),
            settle: s(SETTLE),
            replay: s(REPLAY),
            range: s(RANGE),
            counts: s(COUNTS),
            dead: s(DEAD),
        }
    }

    pub(crate) fn all(&self) -> [&redis::Script; 11] {
        [
            &self.schedule,
            &self.cancel,
            &self.reschedule,
            &self.get,
            &self.claim,
            &self.claim_due,
            &self.settle,
            &self.replay,
            &self.range,
            &self.counts,
            &self.dead,
        ]
    }
}
