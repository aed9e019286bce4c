//! The Lua scripts. Every mutation is one script, so Redis runs it atomically: no Redisson
//! client's offer, poll or transfer can run in the middle of one.
//!
//! `KEYS`: the four global keys (`gen`, `queues`, `dlid`, `dlq`), then eleven per queue in the
//! order of [`crate::layout::QueueKeys::all`]: `timeout`, `ordered`, `destination`, `channel`,
//! `t`, `m`, `fly`, `lease`, `owner`, `err`, `dead`. Queue `qi` (1-based) starts at
//! `G(qi) = 5 + (qi - 1) * 11`.
//!
//! `ARGV`: `nq`, the `nq` overdue queue names (for dead-letter bookkeeping), then the script's
//! own arguments from `ARGV[A + 1]`, `A = nq + 1`.
//!
//! Members are packed with Redis's `struct.pack` and the very format strings of Redisson's offer
//! script, and unpacked by hand (the same bytes `struct.unpack` reads), because `struct.unpack`
//! raises an error on a short member and one foreign malformed member would then fail every
//! script that touches it, for ever.

use crate::member::MemberFormat;

/// Helpers every script starts with. `%FMT%` is replaced by the member format.
const PRELUDE: &str = r#"
local FMT = '%FMT%'
local NQ = tonumber(ARGV[1])
local A = NQ + 1
local function G(qi) return 5 + (qi - 1) * 11 end
local function fmt(n) return string.format('%d', n) end
-- `now` as given, or the Redis server's TIME in ms when it is -1 (calls without a clock).
local function clock(now)
  if now ~= '-1' then return now end
  local t = redis.call('TIME')
  return fmt(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
-- A score as whole milliseconds, rounded up, clamped to [0, 2^53].
local function dnum(d)
  local n = math.ceil(tonumber(d) or 0)
  if n ~= n or n < 0 then n = 0 elseif n > 9007199254740992 then n = 9007199254740992 end
  return fmt(n)
end
local function parse(v)
  local _, e, g, a, c, du = string.find(v, '^(%d+),(%d+),(%d+),(%d+),')
  return g, a, c, du, e
end
local function member_of(v)
  local _, _, _, _, e = parse(v)
  return string.sub(v, e + 1)
end
local function record(g, attempts, created, updated, member)
  return g .. ',' .. attempts .. ',' .. created .. ',' .. fmt(tonumber(updated) - tonumber(created)) .. ',' .. member
end
-- Redisson's offer script's packing, verbatim.
local function pack(id, value)
  if FMT == 'dLc0' then return struct.pack('dLc0', tonumber(id), string.len(value), value) end
  return struct.pack('Bc0Lc0', string.len(id), id, string.len(value), value)
end
-- The value inside a member, or nil if it does not unpack. Little-endian u64 length.
local function unpack_value(m)
  local off
  if FMT == 'dLc0' then
    off = 8
  else
    if #m < 1 then return nil end
    off = 1 + string.byte(m, 1)
  end
  if #m < off + 8 then return nil end
  local n = 0
  for k = 8, 1, -1 do n = n * 256 + string.byte(m, off + k) end
  if off + 8 + n > #m then return nil end
  return string.sub(m, off + 9, off + 8 + n)
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
local function publish_if_head(b, m, due)
  local h = redis.call('ZRANGE', KEYS[b], 0, 0)
  if h[1] == m then redis.call('PUBLISH', KEYS[b + 3], due) end
end
-- What Redisson's offer does with a packed member: timeout set, ordered list, head notice.
local function offer(b, m, due)
  redis.call('ZADD', KEYS[b], due, m)
  redis.call('RPUSH', KEYS[b + 1], m)
  publish_if_head(b, m, due)
end
-- Takes a member out of Redisson's keys (LREM is O(n) in the ordered list). True if pending.
local function withdraw(b, m)
  if redis.call('ZREM', KEYS[b], m) == 1 then
    redis.call('LREM', KEYS[b + 1], 1, m)
    return true
  end
  return false
end
-- Below this many removals from one ordered list, one LREM each (scans from the head to the
-- member); from it on, one scan from the head that tombstones every member (LSET) and one LREM of
-- the tombstones: O(position of the last one) instead of O(sum of positions).
local LIST_SCAN_MIN = 4
local LIST_CHUNK = 512
local TOMB = '\255\255overdue:removed:b1f0c2e4-6d2a-4c1e-9f3a-7e5d8c9b0a11\255\255'
local function unlist(b, ms)
  if #ms < LIST_SCAN_MIN then
    for _, m in ipairs(ms) do redis.call('LREM', KEYS[b + 1], 1, m) end
    return
  end
  local want = {}
  for _, m in ipairs(ms) do want[m] = true end
  local left, found, pos = #ms, 0, 0
  while left > 0 do
    local chunk = redis.call('LRANGE', KEYS[b + 1], pos, pos + LIST_CHUNK - 1)
    if #chunk == 0 then break end
    for i, v in ipairs(chunk) do
      if want[v] then
        want[v] = nil
        redis.call('LSET', KEYS[b + 1], pos + i - 1, TOMB)
        found = found + 1
        left = left - 1
        if left == 0 then break end
      end
    end
    pos = pos + #chunk
  end
  if found > 0 then redis.call('LREM', KEYS[b + 1], found, TOMB) end
end
-- Members taken out of the timeout set by this script whose ordered-list entries are removed
-- together at its end (flush), per queue.
local UNLIST = {}
local function zrem_later(b, m)
  if redis.call('ZREM', KEYS[b], m) == 1 then
    UNLIST[b] = UNLIST[b] or {}
    local l = UNLIST[b]
    l[#l + 1] = m
    return true
  end
  return false
end
local function flush()
  for b, ms in pairs(UNLIST) do unlist(b, ms) end
  UNLIST = {}
end
local function unlease(b, key)
  redis.call('ZREM', KEYS[b + 6], key)
  redis.call('ZREM', KEYS[b + 7], key)
  redis.call('HDEL', KEYS[b + 8], key)
end
-- Forgets overdue's bookkeeping of key (member m); Redisson's keys are not touched.
local function forget(b, key, m)
  redis.call('HDEL', KEYS[b + 4], key)
  redis.call('HDEL', KEYS[b + 5], m)
  unlease(b, key)
  redis.call('HDEL', KEYS[b + 9], key)
end
-- 'p' and the due time if member m is pending, 'f' and the due time if key is claimed, or nil
-- when a Redisson client took the member meanwhile (its transfer, poll or remove).
local function state(b, key, m)
  local d = redis.call('ZSCORE', KEYS[b], m)
  if d then return 'p', d end
  d = redis.call('ZSCORE', KEYS[b + 6], key)
  if d then return 'f', d end
  return nil
end
-- The record of key if the timer still exists (a stale record is dropped): v, m, state, due.
local function live(b, key)
  local v = redis.call('HGET', KEYS[b + 4], key)
  if not v then return nil end
  local m = member_of(v)
  local s, d = state(b, key, m)
  if not s then
    forget(b, key, m)
    return nil
  end
  return v, m, s, d
end
local function bury(b, qi, key, g, due, attempts, err, failed_at, payload)
  local id = redis.call('INCR', KEYS[3])
  local d = fmt(id) .. ',' .. g .. ',' .. due .. ',' .. attempts .. ',' .. failed_at .. ',' ..
    fmt(#key) .. ',' .. fmt(#err) .. ',' .. key .. err .. payload
  redis.call('ZADD', KEYS[b + 10], id, d)
  redis.call('HSET', KEYS[4], fmt(id), ARGV[1 + qi])
end
-- The timer key of member m, adopting a member a Redisson client offered: its key is
-- 'redisson:' .. sha1hex(member), its generation a fresh one. A member that does not unpack is
-- moved to the dead letters (payload = the raw member) and nil is returned.
local function adopt(b, qi, m, now)
  local key = redis.call('HGET', KEYS[b + 5], m)
  if key then return key end
  key = 'redisson:' .. redis.sha1hex(m)
  if not unpack_value(m) then
    local d = redis.call('ZSCORE', KEYS[b], m)
    withdraw(b, m)
    bury(b, qi, key, '0', dnum(d), '0', 'malformed redisson member: ' .. fmt(#m) ..
      ' bytes that do not unpack as struct ' .. FMT, now, m)
    return nil
  end
  local g = redis.call('INCR', KEYS[1])
  redis.call('HSET', KEYS[b + 4], key, record(fmt(g), 0, now, now, m))
  redis.call('HSET', KEYS[b + 5], m, key)
  return key
end
-- Adopts every member of a queue (O(n)): only for a lookup of a 'redisson:<sha1>' key that
-- has not been seen yet.
local function adopt_all(b, qi, now)
  local all = redis.call('ZRANGE', KEYS[b], 0, -1)
  for _, m in ipairs(all) do adopt(b, qi, m, now) end
end
local function lookup(b, key, now)
  local v, m, s, d = live(b, key)
  if not v and #key == 49 and string.find(key, '^redisson:%x+$') then
    adopt_all(b, 1, now)
    v, m, s, d = live(b, key)
  end
  return v, m, s, d
end
-- Upserts key with generation g: a new member (random id `id`) offered as Redisson does.
local function upsert(b, key, due, payload, g, now, id)
  local created = now
  local old = redis.call('HGET', KEYS[b + 4], key)
  if old then
    local _, _, c = parse(old)
    local om = member_of(old)
    if zrem_later(b, om) or redis.call('ZSCORE', KEYS[b + 6], key) then created = c end
    forget(b, key, om)
  end
  local m = pack(id, payload)
  redis.call('HSET', KEYS[b + 4], key, record(fmt(g), 0, created, now, m))
  redis.call('HSET', KEYS[b + 5], m, key)
  offer(b, m, due)
end
-- Claims key (record v, member m) if due at now and not under a live lease: the member leaves
-- Redisson's keys (no Redisson transfer can move it while a handler runs). Returns due,
-- attempts, value.
local function take(b, key, v, m, now, owner, lease_until)
  local s, due = state(b, key, m)
  if not s then
    forget(b, key, m)
    return nil
  end
  if tonumber(due) > now then return nil end
  if s == 'p' then
    zrem_later(b, m)
    redis.call('ZADD', KEYS[b + 6], due, key)
  else
    local l = redis.call('ZSCORE', KEYS[b + 7], key)
    if l and tonumber(l) > now then return nil end
  end
  redis.call('ZADD', KEYS[b + 7], lease_until, key)
  redis.call('HSET', KEYS[b + 8], key, owner)
  local _, a = parse(v)
  return dnum(due), tonumber(a), unpack_value(m) or ''
end
"#;

/// ARGV: now, n, then n × (queue index, key, due_at, random id, payload). Returns the
/// generations in input order.
const SCHEDULE: &str = r#"
local now, n = ARGV[A + 1], tonumber(ARGV[A + 2])
for i = 1, NQ do redis.call('SADD', KEYS[2], ARGV[1 + i]) end
local last = redis.call('INCRBY', KEYS[1], n)
local first = last - n + 1
local out = {}
local o = A + 2
for i = 0, n - 1 do
  upsert(G(tonumber(ARGV[o + 1])), ARGV[o + 2], ARGV[o + 3], ARGV[o + 5], first + i, now, ARGV[o + 4])
  out[i + 1] = first + i
  o = o + 5
end
flush()
return out
"#;

/// One queue. ARGV: key, now (-1: the server's TIME). Returns the removed generation or nil.
const CANCEL: &str = r#"
local key, now = ARGV[A + 1], clock(ARGV[A + 2])
local v, m = lookup(5, key, now)
if not v then return false end
withdraw(5, m)
forget(5, key, m)
return tonumber((parse(v)))
"#;

/// One queue. ARGV: key, due_at, now. New generation, attempts 0, no lease, same member.
const RESCHEDULE: &str = r#"
local key, due, now = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
local v, m, s = lookup(5, key, now)
if not v then return false end
local g, a, c = parse(v)
local ng = redis.call('INCR', KEYS[1])
redis.call('HDEL', KEYS[14], key)
if s == 'f' then
  unlease(5, key)
  offer(5, m, due)
else
  redis.call('ZADD', KEYS[5], due, m)
  publish_if_head(5, m, due)
end
redis.call('HSET', KEYS[9], key, record(fmt(ng), 0, c, now, m))
return ng
"#;

/// One queue. ARGV: key, now. Returns {header, due, lease_until, owner, last_error, value} or nil.
const GET: &str = r#"
local key, now = ARGV[A + 1], ARGV[A + 2]
local v, m, s, d = lookup(5, key, now)
if not v then return false end
local _, _, _, _, e = parse(v)
return {string.sub(v, 1, e), dnum(d), redis.call('ZSCORE', KEYS[12], key), redis.call('HGET', KEYS[13], key),
        redis.call('HGET', KEYS[14], key), unpack_value(m) or ''}
"#;

/// ARGV: now, lease_until, owner, then (queue index, key, generation) triples. Returns (entry
/// index, due, attempts, value) per claimed timer.
const CLAIM: &str = r#"
local now, lease_until, owner = tonumber(ARGV[A + 1]), ARGV[A + 2], ARGV[A + 3]
local out = {}
local i = 0
for o = A + 4, #ARGV, 3 do
  i = i + 1
  local b, key = G(tonumber(ARGV[o])), ARGV[o + 1]
  local v = redis.call('HGET', KEYS[b + 4], key)
  if v and parse(v) == ARGV[o + 2] then
    local d, a, p = take(b, key, v, member_of(v), now, owner, lease_until)
    if d then
      out[#out + 1] = i
      out[#out + 1] = d
      out[#out + 1] = a
      out[#out + 1] = p
    end
  end
end
flush()
return out
"#;

/// ARGV: now, due_before, limit, owner, lease_until. Takes up to limit timers that are pending
/// and due by due_before (adopting Redisson's members on the way), or claimed under an expired
/// lease, earliest first. Returns (queue index, key, generation, due, attempts, value) per claim.
const CLAIM_DUE: &str = r#"
local now, due_before, limit, owner, lease_until =
  tonumber(ARGV[A + 1]), ARGV[A + 2], tonumber(ARGV[A + 3]), ARGV[A + 4], ARGV[A + 5]
local cands = {}
for qi = 1, NQ do
  local b = G(qi)
  local r = redis.call('ZRANGEBYSCORE', KEYS[b], '-inf', due_before, 'WITHSCORES', 'LIMIT', 0, limit)
  for j = 1, #r, 2 do
    local key = adopt(b, qi, r[j], ARGV[A + 1])
    if key then cands[#cands + 1] = {tonumber(r[j + 1]), qi, key} end
  end
  local x = redis.call('ZRANGEBYSCORE', KEYS[b + 7], '-inf', now, 'LIMIT', 0, limit)
  for j = 1, #x do
    local d = redis.call('ZSCORE', KEYS[b + 6], x[j])
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
  local b = G(qi)
  local v = redis.call('HGET', KEYS[b + 4], key)
  if v then
    local g = parse(v)
    local d, a, p = take(b, key, v, member_of(v), now, owner, lease_until)
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
flush()
return out
"#;

/// ARGV: now, deliver (1/0), then 7-field entries (kind, queue index, key, generation, x1, x2,
/// x3): `D` done (the value is RPUSHed to the destination list when deliver is 1, as Redisson's
/// transfer does); `L` release; `R` retry (x1 due, x2 attempts, x3 error); `X` dead letter (x1
/// attempts, x2 error, x3 failed_at). Each applies only if the generation is unchanged.
const SETTLE: &str = r#"
local now, deliver = ARGV[A + 1], ARGV[A + 2] == '1'
local applied = 0
for o = A + 3, #ARGV, 7 do
  local kind, qi, key, gen = ARGV[o], tonumber(ARGV[o + 1]), ARGV[o + 2], ARGV[o + 3]
  local b = G(qi)
  local v = redis.call('HGET', KEYS[b + 4], key)
  if v then
    local g, a, c = parse(v)
    if g == gen then
      local m = member_of(v)
      local s, due = state(b, key, m)
      if not s then
        forget(b, key, m)
      else
        applied = applied + 1
        if kind == 'D' then
          withdraw(b, m)
          forget(b, key, m)
          if deliver then redis.call('RPUSH', KEYS[b + 2], unpack_value(m) or '') end
        elseif kind == 'L' then
          if s == 'f' then
            unlease(b, key)
            offer(b, m, due)
          end
        elseif kind == 'R' then
          redis.call('HSET', KEYS[b + 4], key, record(g, ARGV[o + 5], c, now, m))
          redis.call('HSET', KEYS[b + 9], key, ARGV[o + 6])
          if s == 'f' then
            unlease(b, key)
            offer(b, m, ARGV[o + 4])
          else
            redis.call('ZADD', KEYS[b], ARGV[o + 4], m)
            publish_if_head(b, m, ARGV[o + 4])
          end
        elseif kind == 'X' then
          withdraw(b, m)
          bury(b, qi, key, g, dnum(due), ARGV[o + 4], ARGV[o + 5], ARGV[o + 6], unpack_value(m) or '')
          forget(b, key, m)
        end
      end
    end
  end
end
return applied
"#;

/// One queue. ARGV: id, due_at, now, random id. Moves the dead letter back into the timers with
/// a new generation and a new member. Returns it, or nil.
const REPLAY: &str = r#"
local id, due, now, rid = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4]
local r = redis.call('ZRANGEBYSCORE', KEYS[15], id, id)
redis.call('HDEL', KEYS[4], id)
if #r == 0 then return false end
local d = r[1]
local _, e, _, _, _, _, _, kl, el = string.find(d, '^(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),(%d+),')
local key = string.sub(d, e + 1, e + tonumber(kl))
local payload = string.sub(d, e + tonumber(kl) + tonumber(el) + 1)
redis.call('ZREM', KEYS[15], d)
local ng = redis.call('INCR', KEYS[1])
upsert(5, key, due, payload, ng, now, rid)
flush()
return ng
"#;

/// ARGV: until, limit, details (0/1), now (-1: the server's TIME), then per queue (mode, lo, key): mode `a` from -inf,
/// `i` due >= lo, `x` due > lo, `k` (due, key) > (lo, key). Reads the pending members (adopting
/// Redisson's) and the claimed timers of each queue. A tie of one due time is always read
/// whole (members of one score sort by their bytes, not by timer key) and sorted by key, so a page
/// never splits one wrongly. Returns per timer (queue index, key, due, then with details header, lease_until, owner,
/// last_error, value; without, the generation).
const RANGE: &str = r#"
local upto, limit, details, now = ARGV[A + 1], tonumber(ARGV[A + 2]), ARGV[A + 3] == '1', ARGV[A + 4]
now = clock(now)
local out = {}
local function emit(qi, b, key, due, v, m)
  out[#out + 1] = qi
  out[#out + 1] = key
  out[#out + 1] = dnum(due)
  if details then
    local _, _, _, _, e = parse(v)
    out[#out + 1] = string.sub(v, 1, e)
    out[#out + 1] = redis.call('ZSCORE', KEYS[b + 7], key)
    out[#out + 1] = redis.call('HGET', KEYS[b + 8], key)
    out[#out + 1] = redis.call('HGET', KEYS[b + 9], key)
    out[#out + 1] = unpack_value(m) or ''
  else
    out[#out + 1] = parse(v)
  end
end
local cands
local function pending(qi, b, m, due, after)
  local key = adopt(b, qi, m, now)
  if key and (not after or lt(after, key)) then cands[#cands + 1] = {tonumber(due), key, m} end
end
for qi = 1, NQ do
  local b = G(qi)
  cands = {}
  local o = A + 5 + (qi - 1) * 3
  local mode, lo, ck = ARGV[o], ARGV[o + 1], ARGV[o + 2]
  -- Pending: the Redisson timeout set.
  local min = '-inf'
  if mode == 'k' then
    if tonumber(lo) <= tonumber(upto) then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[b], lo, lo)) do pending(qi, b, m, lo, ck) end
    end
    min = '(' .. lo
  elseif mode == 'i' then
    min = lo
  elseif mode == 'x' then
    min = '(' .. lo
  end
  local r = redis.call('ZRANGEBYSCORE', KEYS[b], min, upto, 'WITHSCORES', 'LIMIT', 0, limit)
  local cut = nil
  if #r >= 2 * limit then cut = r[#r] end
  for j = 1, #r, 2 do
    if cut and r[j + 1] == cut then break end
    pending(qi, b, r[j], r[j + 1], nil)
  end
  if cut then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[b], cut, cut)) do pending(qi, b, m, cut, nil) end
  end
  -- Whole ties were read; only this queue's first `limit` in (due, key) order can be on the page.
  if #cands > limit then
    table.sort(cands, function(x, y)
      if x[1] ~= y[1] then return x[1] < y[1] end
      return lt(x[2], y[2])
    end)
  end
  for j = 1, math.min(#cands, limit) do
    local c = cands[j]
    local v = redis.call('HGET', KEYS[b + 4], c[2])
    if v then emit(qi, b, c[2], c[1], v, c[3]) end
  end
  -- Claimed: members are timer keys, so a tie is already in key order.
  local z = KEYS[b + 6]
  local f
  if mode == 'k' then
    local start = redis.call('ZCOUNT', z, '-inf', '(' .. lo)
    local hi = start + redis.call('ZCOUNT', z, lo, lo)
    while start < hi do
      local mid = math.floor((start + hi) / 2)
      local mm = redis.call('ZRANGE', z, mid, mid)[1]
      if lt(ck, mm) then hi = mid else start = mid + 1 end
    end
    f = redis.call('ZRANGE', z, start, start + limit - 1, 'WITHSCORES')
  else
    f = redis.call('ZRANGEBYSCORE', z, min, upto, 'WITHSCORES', 'LIMIT', 0, limit)
  end
  for j = 1, #f, 2 do
    if tonumber(f[j + 1]) > tonumber(upto) then break end
    local v = redis.call('HGET', KEYS[b + 4], f[j])
    if v then emit(qi, b, f[j], f[j + 1], v, member_of(v)) end
  end
end
return out
"#;

/// ARGV: now. Returns (stored, live leases, dead) per queue. Redisson members not yet adopted
/// count as pending.
const COUNTS: &str = r#"
local out = {}
for qi = 1, NQ do
  local b = G(qi)
  out[#out + 1] = redis.call('ZCARD', KEYS[b]) + redis.call('ZCARD', KEYS[b + 6])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[b + 7], '(' .. ARGV[A + 1], '+inf')
  out[#out + 1] = redis.call('ZCARD', KEYS[b + 10])
end
return out
"#;

/// ARGV: after_id, limit. Returns (queue index, dead letter) pairs, each queue's in id order.
const DEAD: &str = r#"
local out = {}
for qi = 1, NQ do
  local r = redis.call('ZRANGEBYSCORE', KEYS[G(qi) + 10], '(' .. ARGV[A + 1], '+inf', 'LIMIT', 0, ARGV[A + 2])
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
    pub(crate) fn new(format: MemberFormat) -> Scripts {
        let prelude = PRELUDE.replace("%FMT%", format.as_str());
        let s = |body: &str| redis::Script::new(&format!("{prelude}{body}"));
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
