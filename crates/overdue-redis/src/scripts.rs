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
-- Most arguments a variadic call gets at once (Lua's unpack stops near 8,000); an even number,
-- so ZADD/HSET pairs are never split.
local VCHUNK = 4000
-- One variadic command over a flat list of arguments, in chunks: a batch of n timers costs
-- n/VCHUNK calls instead of n (a redis.call from Lua costs more than the work of a small one).
local function vcall(cmd, key, args)
  local i, n = 1, #args
  while i <= n do
    local j = math.min(i + VCHUNK - 1, n)
    redis.call(cmd, key, unpack(args, i, j))
    i = j + 1
  end
end
-- Like vcall for a reading command (HMGET, ZMSCORE): the replies concatenated, nil as false.
local function vget(cmd, key, args)
  local out = {}
  local i, n = 1, #args
  while i <= n do
    local j = math.min(i + VCHUNK - 1, n)
    local r = redis.call(cmd, key, unpack(args, i, j))
    for x = 1, #r do out[#out + 1] = r[x] end
    i = j + 1
  end
  return out
end
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
-- Claims, in the group of queue keys at b, those of keys (distinct) whose record exists, whose
-- generation equals gens[j] (any generation if gens is nil), that are due at now and not under
-- a live lease; for owner until lease_until. A handful of variadic calls for the whole list.
-- Returns, per claimed key, {j, generation, due, attempts, payload} in the order of keys.
local function take_all(b, keys, gens, now, owner, lease_until)
  local recs = vget('HMGET', KEYS[b + 1], keys)
  local dues = vget('ZMSCORE', KEYS[b], keys)
  local won, moved, again = {}, {}, {}
  for j = 1, #keys do
    local v = recs[j]
    if v then
      local g = string.match(v, '^(%d+),')
      if gens == nil or g == gens[j] then
        local d = dues[j]
        if d then
          if tonumber(d) <= now then
            won[#won + 1] = {j, g, d, v}
            moved[#moved + 1] = j
          end
        else
          again[#again + 1] = j
        end
      end
    end
  end
  if #again > 0 then
    -- Not pending: claimable only if in flight under an expired lease.
    local ks = {}
    for x = 1, #again do ks[x] = keys[again[x]] end
    local ls = vget('ZMSCORE', KEYS[b + 3], ks)
    local fs = vget('ZMSCORE', KEYS[b + 2], ks)
    for x = 1, #again do
      if ls[x] and tonumber(ls[x]) <= now and fs[x] and tonumber(fs[x]) <= now then
        local j = again[x]
        won[#won + 1] = {j, string.match(recs[j], '^(%d+),'), fs[x], recs[j]}
      end
    end
    table.sort(won, function(x, y) return x[1] < y[1] end)
  end
  if #won == 0 then return won end
  local rem, fly, lease, own = {}, {}, {}, {}
  for x = 1, #moved do
    local j = moved[x]
    rem[#rem + 1] = keys[j]
    fly[#fly + 1] = dues[j]
    fly[#fly + 1] = keys[j]
  end
  local out = {}
  for x = 1, #won do
    local w = won[x]
    local key = keys[w[1]]
    lease[#lease + 1] = lease_until
    lease[#lease + 1] = key
    own[#own + 1] = key
    own[#own + 1] = owner
    local _, e, _, a = string.find(w[4], '^(%d+),(%d+),%d+,%d+,')
    out[x] = {w[1], w[2], w[3], tonumber(a), string.sub(w[4], e + 1)}
  end
  vcall('ZREM', KEYS[b], rem)
  vcall('ZADD', KEYS[b + 2], fly)
  vcall('ZADD', KEYS[b + 3], lease)
  vcall('HSET', KEYS[b + 4], own)
  return out
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
-- Per queue: the keys and their entries, so each queue costs a few variadic calls.
local groups = {}
local o = 3 + nq
for i = 0, n - 1 do
  local qi = tonumber(ARGV[o + 1])
  local g = groups[qi]
  if not g then
    g = {}
    groups[qi] = g
  end
  g[#g + 1] = o
  out[i + 1] = first + i
  o = o + 4
end
local nnow = tonumber(now)
for qi, g in pairs(groups) do
  local b = 3 + (qi - 1) * 7
  local keys = {}
  for x = 1, #g do keys[x] = ARGV[g[x] + 2] end
  local olds = vget('HMGET', KEYS[b + 1], keys)
  local replaced, recs, dues = {}, {}, {}
  for x = 1, #g do
    local oi = g[x]
    local created, key = nnow, keys[x]
    if olds[x] then
      local c = string.match(olds[x], '^%d+,%d+,(%d+),')
      if c then created = tonumber(c) end
      replaced[#replaced + 1] = key
    end
    local gen = first + (oi - 3 - nq) / 4
    recs[#recs + 1] = key
    recs[#recs + 1] = fmt(gen) .. ',0,' .. fmt(created) .. ',' .. fmt(nnow - created) .. ',' .. ARGV[oi + 4]
    dues[#dues + 1] = ARGV[oi + 3]
    dues[#dues + 1] = key
  end
  if #replaced > 0 then
    -- A replaced timer loses its claim and its last error.
    vcall('ZREM', KEYS[b + 2], replaced)
    vcall('ZREM', KEYS[b + 3], replaced)
    vcall('HDEL', KEYS[b + 4], replaced)
    vcall('HDEL', KEYS[b + 5], replaced)
  end
  vcall('HSET', KEYS[b + 1], recs)
  vcall('ZADD', KEYS[b], dues)
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
-- Per queue: distinct keys with their generations and entry indexes.
local groups = {}
local i = 0
for o = 4, #ARGV, 3 do
  i = i + 1
  local qi = tonumber(ARGV[o])
  local g = groups[qi]
  if not g then
    g = {keys = {}, gens = {}, idx = {}, seen = {}}
    groups[qi] = g
  end
  local key = ARGV[o + 1]
  if not g.seen[key] then
    g.seen[key] = true
    local n = #g.keys + 1
    g.keys[n], g.gens[n], g.idx[n] = key, ARGV[o + 2], i
  end
end
local out = {}
for qi, g in pairs(groups) do
  local won = take_all(1 + (qi - 1) * 7, g.keys, g.gens, now, owner, lease_until)
  for x = 1, #won do
    local w = won[x]
    out[#out + 1] = g.idx[w[1]]
    out[#out + 1] = w[3]
    out[#out + 1] = w[4]
    out[#out + 1] = w[5]
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
  if #x > 0 then
    local ds = vget('ZMSCORE', KEYS[b + 2], x)
    for j = 1, #x do
      local d = ds[j]
      if d and tonumber(d) <= tonumber(due_before) then cands[#cands + 1] = {tonumber(d), qi, x[j]} end
    end
  end
end
table.sort(cands, function(x, y)
  if x[1] ~= y[1] then return x[1] < y[1] end
  if x[2] ~= y[2] then return x[2] < y[2] end
  return lt(x[3], y[3])
end)
-- The first limit candidates, claimed queue by queue; the caller sorts the result.
local groups = {}
for j = 1, math.min(limit, #cands) do
  local qi = cands[j][2]
  local g = groups[qi]
  if not g then
    g = {}
    groups[qi] = g
  end
  g[#g + 1] = cands[j][3]
end
local out = {}
for qi, keys in pairs(groups) do
  local won = take_all(1 + (qi - 1) * 7, keys, nil, now, owner, lease_until)
  for x = 1, #won do
    local w = won[x]
    out[#out + 1] = qi
    out[#out + 1] = keys[w[1]]
    out[#out + 1] = tonumber(w[2])
    out[#out + 1] = w[3]
    out[#out + 1] = w[4]
    out[#out + 1] = w[5]
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
-- Done entries (the common case) of keys named once in the batch are applied together, a few
-- variadic calls per queue; every other entry runs one by one, in batch order, afterwards.
local count = {}
for o = 3 + nq, #ARGV, 7 do
  local ck = ARGV[o + 1] .. ',' .. ARGV[o + 2]
  count[ck] = (count[ck] or 0) + 1
end
local done, rest = {}, {}
for o = 3 + nq, #ARGV, 7 do
  local qi = tonumber(ARGV[o + 1])
  if ARGV[o] == 'D' and count[ARGV[o + 1] .. ',' .. ARGV[o + 2]] == 1 then
    local g = done[qi]
    if not g then
      g = {keys = {}, gens = {}}
      done[qi] = g
    end
    g.keys[#g.keys + 1] = ARGV[o + 2]
    g.gens[#g.gens + 1] = ARGV[o + 3]
  else
    rest[#rest + 1] = o
  end
end
for qi, g in pairs(done) do
  local b = 3 + (qi - 1) * 7
  local recs = vget('HMGET', KEYS[b + 1], g.keys)
  local del = {}
  for j = 1, #g.keys do
    local v = recs[j]
    if v and string.match(v, '^(%d+),') == g.gens[j] then del[#del + 1] = g.keys[j] end
  end
  if #del > 0 then
    applied = applied + #del
    vcall('HDEL', KEYS[b + 1], del)
    -- A timer is in exactly one of due and fly, and lease and owner name only fly's members:
    -- when every one was in flight (the usual case) due, lease and owner need no lookups.
    local flying = 0
    for x = 1, #del, VCHUNK do
      flying = flying + redis.call('ZREM', KEYS[b + 2], unpack(del, x, math.min(x + VCHUNK - 1, #del)))
    end
    if flying < #del then vcall('ZREM', KEYS[b], del) end
    if flying > 0 then
      vcall('ZREM', KEYS[b + 3], del)
      vcall('HDEL', KEYS[b + 4], del)
    end
    if redis.call('EXISTS', KEYS[b + 5]) == 1 then vcall('HDEL', KEYS[b + 5], del) end
  end
end
for _, o in ipairs(rest) do
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
    local ks = {}
    for j = 1, #r, 2 do
      if tonumber(r[j + 1]) > tonumber(upto) then break end
      ks[#ks + 1] = r[j]
    end
    local vs = {}
    if #ks > 0 then vs = vget('HMGET', KEYS[b + 1], ks) end
    for x = 1, #ks do
      local j = 2 * x - 1
      local key = r[j]
      local v = vs[x]
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
