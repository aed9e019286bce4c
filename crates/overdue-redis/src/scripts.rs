//! The Lua scripts. Every mutation is one script, so Redis runs it atomically (no other command
//! runs while a script does).
//!
//! Each script gets the keys of the queues it touches as `KEYS`, seven per queue in the order of
//! [`crate::layout::QueueKeys::all`]: `due`, `t`, `fly`, `lease`, `owner`, `err`, `dead`. A
//! group starting at index `b` has `due = KEYS[b]`, `t = KEYS[b+1]`, and so on.
//!
//! A timer's record (the field `key` of the `t` hash) is
//! `<generation>,<attempts>,<created_at>,<updated - created>,<due - created>,<payload bytes>`.
//! A pending timer is in `due` as `<key>\0<generation>` (scored by its due time, so the window
//! load reads the generation without the records); a claimed one is in `fly` as `<key>`, scored
//! by the id of the claim that holds it. One claim (a batch) is one lease: `lease` scores the id
//! by `lease_until` and `owner` maps it to the node (its field `0` is the last id issued), so a
//! claim writes two entries per batch, not two per timer.

/// Helpers every script starts with.
const PRELUDE: &str = r#"
local HEAD = '^(%d+),(%d+),(%d+),(-?%d+),(-?%d+),'
local function fmt(n) return string.format('%d', n) end
-- generation, attempts, created, updated - created, due - created, end of the head
local function parse(v)
  local _, e, g, a, c, du, dd = string.find(v, HEAD)
  return g, a, c, du, dd, e
end
-- Whether record v holds generation g (a prefix test: no string is made).
local function gen_is(v, g)
  return string.byte(v, #g + 1) == 44 and string.find(v, g, 1, true) == 1
end
-- The due time a record holds.
local function due_in(v)
  local _, _, _, _, c, _, dd = string.find(v, HEAD)
  return fmt(tonumber(c) + tonumber(dd))
end
-- Most arguments a variadic call gets at once (Lua's unpack stops near 8,000); an even number,
-- so ZADD/HSET pairs are never split.
local VCHUNK = 4000
-- One variadic command over a flat list of arguments, in chunks: a batch of n timers costs
-- n/VCHUNK calls instead of n (a redis.call from Lua costs more than the work of a small one).
-- Returns the sum of the integer replies.
local function vcall(cmd, key, args)
  local i, n, sum = 1, #args, 0
  while i <= n do
    local j = math.min(i + VCHUNK - 1, n)
    sum = sum + redis.call(cmd, key, unpack(args, i, j))
    i = j + 1
  end
  return sum
end
-- Like vcall for a reading command (HMGET, ZMSCORE): the replies concatenated, nil as false.
local function vget(cmd, key, args)
  local n = #args
  if n == 0 then return {} end
  -- One chunk (the usual batch): the reply as it is, not copied.
  if n <= VCHUNK then return redis.call(cmd, key, unpack(args)) end
  local out = {}
  local i = 1
  while i <= n do
    local j = math.min(i + VCHUNK - 1, n)
    local r = redis.call(cmd, key, unpack(args, i, j))
    for x = 1, #r do out[#out + 1] = r[x] end
    i = j + 1
  end
  return out
end
-- The due set's member for key at generation g, and back (keys hold no control characters;
-- the generation is the digits after the last NUL either way).
local function mem(key, g) return key .. '\0' .. g end
local function split(m) return string.match(m, '^(.*)%z(%d+)$') end
local function record(g, attempts, created, updated, due, payload)
  local c = tonumber(created)
  return g .. ',' .. attempts .. ',' .. fmt(c) .. ',' .. fmt(tonumber(updated) - c) .. ',' ..
    fmt(tonumber(due) - c) .. ',' .. payload
end
-- Forgets lease id l (its `lease` entry and its owner).
local function forget(b, l)
  redis.call('ZREM', KEYS[b + 3], l)
  redis.call('HDEL', KEYS[b + 4], l)
end
-- Forgets those of the lease ids (a list, repeats and false allowed) that hold no timer any
-- more, so `lease` names live claims only and a sweep for expired ones finds a dead node's at
-- once. One ZCOUNT per distinct id: a settle batch names one claim or a few.
local function spend(b, lids)
  local seen = {}
  for j = 1, #lids do
    local l = lids[j]
    if l and not seen[l] then
      seen[l] = true
      if redis.call('ZCOUNT', KEYS[b + 2], l, l) == 0 then forget(b, l) end
    end
  end
end
-- Takes those of keys that are in fly out of it and forgets the claims that leaves empty: one
-- ZMSCORE, and a ZREM only when some were in flight. Returns each key's lease id, false for a
-- key that was not in flight.
local function unfly(b, keys)
  local lids = vget('ZMSCORE', KEYS[b + 2], keys)
  local flying = {}
  for j = 1, #keys do
    if lids[j] then flying[#flying + 1] = keys[j] end
  end
  if #flying > 0 then
    vcall('ZREM', KEYS[b + 2], flying)
    spend(b, lids)
  end
  return lids
end
local function drop(b, key, g)
  redis.call('ZREM', KEYS[b], mem(key, g))
  redis.call('HDEL', KEYS[b + 1], key)
  unfly(b, {key})
  redis.call('HDEL', KEYS[b + 5], key)
end
-- Drops the claim (if any) and makes the timer (generation g) pending, due at due.
local function unlease(b, key, g, due)
  unfly(b, {key})
  redis.call('ZADD', KEYS[b], due, mem(key, g))
end
-- With nothing in flight every lease is spent (`spend` has usually forgotten them already): drop
-- the keys, the last-id counter with them (lease ids start again at 1, which is safe because no
-- timer names an old one).
local function sweep_leases(b)
  if redis.call('ZCARD', KEYS[b + 2]) == 0 then redis.call('DEL', KEYS[b + 3], KEYS[b + 4]) end
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
-- Upserts one timer with generation g: attempts 0, no error, no claim; keeps created_at.
local function upsert(b, key, due, payload, g, now)
  local created = now
  local old = redis.call('HGET', KEYS[b + 1], key)
  if old then
    local og, _, c = parse(old)
    if c then created = c end
    redis.call('ZREM', KEYS[b], mem(key, og))
    unfly(b, {key})
    redis.call('HDEL', KEYS[b + 5], key)
  end
  redis.call('HSET', KEYS[b + 1], key, record(fmt(g), 0, created, now, due, payload))
  redis.call('ZADD', KEYS[b], due, mem(key, fmt(g)))
end
-- Puts keys (distinct, just taken out of due or from expired claims) in flight under one new
-- lease for owner until lease_until: one ZADD for the timers, two writes for the lease.
local function hold(b, keys, owner, lease_until)
  local lid = redis.call('HINCRBY', KEYS[b + 4], '0', 1)
  local fly = {}
  for x = 1, #keys do
    fly[#fly + 1] = lid
    fly[#fly + 1] = keys[x]
  end
  vcall('ZADD', KEYS[b + 2], fly)
  redis.call('ZADD', KEYS[b + 3], lease_until, lid)
  redis.call('HSET', KEYS[b + 4], lid, owner)
end
-- Claims, in the group of queue keys at b, those of keys (distinct) whose record exists, whose
-- generation equals gens[j] (any generation if gens is nil), that are due at now (the record
-- holds the due time) and either pending or held by a lease that has expired (or is gone); as
-- one new lease for owner until lease_until. A handful of variadic calls for the whole list, and
-- two writes for the lease. Returns, per claimed key, {j, record} in the order of keys.
local function take_all(b, keys, gens, now, owner, lease_until)
  local recs = vget('HMGET', KEYS[b + 1], keys)
  local won, ks, ms = {}, {}, {}
  for j = 1, #keys do
    local v = recs[j]
    if v then
      local _, e, g, a, c, _, dd = string.find(v, HEAD)
      local d = tonumber(c) + tonumber(dd)
      if (gens == nil or g == gens[j]) and d <= now then
        won[#won + 1] = {j, v}
        ks[#ks + 1] = keys[j]
        ms[#ms + 1] = mem(keys[j], g)
      end
    end
  end
  if #won == 0 then return won end
  local taken = nil
  -- A timer is in exactly one of due and fly, so when ZREM takes every candidate out of due (the
  -- usual case) none was in flight and no lookup is needed.
  if vcall('ZREM', KEYS[b], ms) < #ms then
    -- Those in fly are claimable only under a lease that has expired or is gone; the others were
    -- pending and have just left due.
    local ls = vget('ZMSCORE', KEYS[b + 2], ks)
    taken = ls
    local ids, seen = {}, {}
    for x = 1, #ks do
      local l = ls[x]
      if l and not seen[l] then
        seen[l] = true
        ids[#ids + 1] = l
      end
    end
    local live = {}
    if #ids > 0 then
      local untils = vget('ZMSCORE', KEYS[b + 3], ids)
      for x = 1, #ids do
        if untils[x] and tonumber(untils[x]) > now then live[ids[x]] = true end
      end
    end
    local keep, kk = {}, {}
    for x = 1, #ks do
      local l = ls[x]
      if not (l and live[l]) then
        keep[#keep + 1] = won[x]
        kk[#kk + 1] = ks[x]
      end
    end
    won, ks = keep, kk
    if #won == 0 then return won end
  end
  hold(b, ks, owner, lease_until)
  -- Expired claims this one took timers from go once they hold nothing.
  if taken then spend(b, taken) end
  return won
end
-- Claims by reference, in the group at b: keys[j] named with its due member ms[j]
-- (`<key>\0<generation>`). One ZMSCORE of the members tells which are pending under that
-- generation and when they are due, so those due by now (the usual case) are taken without a
-- record field read in Lua: the records go back to the caller as they are. A key not pending
-- under its member (in flight, perhaps under an expired lease, replaced, or gone) goes through
-- take_all, which checks its record. Returns flat pairs (j, record) of what was claimed.
local function take_refs(b, keys, ms, now, owner, lease_until)
  local sc = vget('ZMSCORE', KEYS[b], ms)
  local wk, wm, wj, rk, rg, rj = {}, {}, {}, {}, {}, {}
  for j = 1, #ms do
    local s = sc[j]
    if s then
      if tonumber(s) <= now then
        local n = #wk + 1
        wk[n], wm[n], wj[n] = keys[j], ms[j], j
      end
    else
      local n = #rk + 1
      local _, g = split(ms[j])
      rk[n], rg[n], rj[n] = keys[j], g, j
    end
  end
  local out = {}
  if #wk > 0 then
    vcall('ZREM', KEYS[b], wm)
    local recs = vget('HMGET', KEYS[b + 1], wk)
    local held = {}
    for x = 1, #wk do
      if recs[x] then
        held[#held + 1] = wk[x]
        out[#out + 1] = wj[x]
        out[#out + 1] = recs[x]
      end
    end
    if #held > 0 then hold(b, held, owner, lease_until) end
  end
  if #rk > 0 then
    local won = take_all(b, rk, rg, now, owner, lease_until)
    for x = 1, #won do
      out[#out + 1] = rj[won[x][1]]
      out[#out + 1] = won[x][2]
    end
  end
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
  -- A key named twice in the batch: only its last entry is written (the earlier generation is
  -- replaced at once).
  local last = {}
  for x = 1, #g do last[ARGV[g[x] + 2]] = x end
  local keys, at = {}, {}
  for x = 1, #g do
    if last[ARGV[g[x] + 2]] == x then
      keys[#keys + 1] = ARGV[g[x] + 2]
      at[#at + 1] = g[x]
    end
  end
  local olds = vget('HMGET', KEYS[b + 1], keys)
  local replaced, stale, recs, dues = {}, {}, {}, {}
  for x = 1, #keys do
    local oi = at[x]
    local created, key = nnow, keys[x]
    if olds[x] then
      local og, c = string.match(olds[x], '^(%d+),%d+,(%d+),')
      if c then created = tonumber(c) end
      replaced[#replaced + 1] = key
      stale[#stale + 1] = mem(key, og)
    end
    local gen = fmt(first + (oi - 3 - nq) / 4)
    recs[#recs + 1] = key
    recs[#recs + 1] = gen .. ',0,' .. fmt(created) .. ',' .. fmt(nnow - created) .. ',' ..
      fmt(tonumber(ARGV[oi + 3]) - created) .. ',' .. ARGV[oi + 4]
    dues[#dues + 1] = ARGV[oi + 3]
    dues[#dues + 1] = mem(key, gen)
  end
  if #replaced > 0 then
    -- A replaced timer leaves due under its old generation, and loses its claim and last error.
    vcall('ZREM', KEYS[b], stale)
    unfly(b, replaced)
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
drop(1, ARGV[1], g)
return tonumber(g)
"#;

/// KEYS: gen, one group (from 2). ARGV: key, due_at, now. New generation, attempts 0, no lease.
const RESCHEDULE: &str = r#"
local v = redis.call('HGET', KEYS[3], ARGV[1])
if not v then return false end
local g, a, c, du, dd, e = parse(v)
local ng = redis.call('INCR', KEYS[1])
upsert(2, ARGV[1], ARGV[2], string.sub(v, e + 1), ng, ARGV[3])
return ng
"#;

/// KEYS: one group. ARGV: key. Returns {record, due, lease_until, owner, last_error} or nil.
const GET: &str = r#"
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then return false end
local l = redis.call('ZSCORE', KEYS[3], ARGV[1])
local lu, ow = false, false
if l then
  lu = redis.call('ZSCORE', KEYS[4], l)
  ow = redis.call('HGET', KEYS[5], l)
end
return {v, due_in(v), lu, ow, redis.call('HGET', KEYS[6], ARGV[1])}
"#;

/// KEYS: a group per queue. ARGV: now, lease_until, owner, then (queue index, key, due member)
/// triples, the member being `<key>\0<generation>`. Returns (entry index, record) per claimed
/// timer.
const CLAIM: &str = r#"
local now, lease_until, owner = tonumber(ARGV[1]), ARGV[2], ARGV[3]
-- Per queue: distinct keys with their members and entry indexes.
local groups = {}
local i = 0
for o = 4, #ARGV, 3 do
  i = i + 1
  local qi = tonumber(ARGV[o])
  local g = groups[qi]
  if not g then
    g = {keys = {}, ms = {}, idx = {}, seen = {}}
    groups[qi] = g
  end
  local key = ARGV[o + 1]
  if not g.seen[key] then
    g.seen[key] = true
    local n = #g.keys + 1
    g.keys[n], g.ms[n], g.idx[n] = key, ARGV[o + 2], i
  end
end
local out = {}
for qi, g in pairs(groups) do
  local won = take_refs(1 + (qi - 1) * 7, g.keys, g.ms, now, owner, lease_until)
  for x = 1, #won, 2 do
    out[#out + 1] = g.idx[won[x]]
    out[#out + 1] = won[x + 1]
  end
end
return out
"#;

/// KEYS: a group per queue (queues in byte order). ARGV: now, due_before, limit, owner,
/// lease_until. Takes up to limit timers that are pending and due by due_before, or in flight
/// under an expired lease, earliest first. Returns (queue index, key, record) per claim.
const CLAIM_DUE: &str = r#"
local now, due_before, limit, owner, lease_until =
  tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local cands = {}
for qi = 1, #KEYS / 7 do
  local b = 1 + (qi - 1) * 7
  local r = redis.call('ZRANGEBYSCORE', KEYS[b], '-inf', due_before, 'WITHSCORES', 'LIMIT', 0, limit)
  for j = 1, #r, 2 do cands[#cands + 1] = {tonumber(r[j + 1]), qi, (split(r[j]))} end
  -- Expired leases: their timers are due again (at their own due times). A lease that holds
  -- no timer any more (its timers were cancelled or rescheduled in flight) is spent and goes,
  -- without using up the room: up to `budget` of them per call, so a pile of them never hides a
  -- dead node's claims behind it for more than a sweep or two.
  local room, off, budget = limit, 0, 4 * limit + 1000
  while room > 0 and budget > 0 do
    local x = redis.call('ZRANGEBYSCORE', KEYS[b + 3], '-inf', now, 'LIMIT', off, limit)
    if #x == 0 then break end
    for j = 1, #x do
      if room <= 0 or budget <= 0 then break end
      local ks = redis.call('ZRANGEBYSCORE', KEYS[b + 2], x[j], x[j], 'LIMIT', 0, room)
      if #ks == 0 then
        forget(b, x[j])
        budget = budget - 1
      else
        off = off + 1
        local vs = vget('HMGET', KEYS[b + 1], ks)
        for y = 1, #ks do
          if vs[y] then
            local d = tonumber(due_in(vs[y]))
            if d <= tonumber(due_before) then cands[#cands + 1] = {d, qi, ks[y]} end
          else
            redis.call('ZREM', KEYS[b + 2], ks[y])
          end
        end
        room = room - #ks
      end
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
    out[#out + 1] = w[2]
  end
end
return out
"#;

/// KEYS: dead-letter id counter, dead-letter index, then a group per queue. ARGV: now, nq, the
/// queue names, nd, then nd `Done` entries (queue index, key, generation) of keys named once in
/// the batch, then the other entries, 7 fields each (kind, queue index, key, generation, x1,
/// x2, x3), in batch order: `D` done; `L` release; `R` retry (x1 due, x2 attempts, x3 error);
/// `X` dead letter (x1 attempts, x2 error, x3 failed_at). Each applies only if the generation
/// is unchanged.
const SETTLE: &str = r#"
local now, nq = ARGV[1], tonumber(ARGV[2])
local nd = tonumber(ARGV[3 + nq])
local applied = 0
-- The Done entries (the common case: the caller has put those of keys named once in the batch
-- first) are applied together, a few variadic calls per queue; the rest run one by one, in
-- batch order, afterwards.
local done = {}
local o = 4 + nq
for _ = 1, nd do
  local qi = tonumber(ARGV[o])
  local g = done[qi]
  if not g then
    g = {keys = {}, gens = {}}
    done[qi] = g
  end
  g.keys[#g.keys + 1] = ARGV[o + 1]
  g.gens[#g.gens + 1] = ARGV[o + 2]
  o = o + 3
end
local first_rest = o
for qi, g in pairs(done) do
  local b = 3 + (qi - 1) * 7
  local recs = vget('HMGET', KEYS[b + 1], g.keys)
  local del, gs = {}, {}
  for j = 1, #g.keys do
    local v = recs[j]
    if v and gen_is(v, g.gens[j]) then
      del[#del + 1] = g.keys[j]
      gs[#gs + 1] = g.gens[j]
    end
  end
  if #del > 0 then
    applied = applied + #del
    vcall('HDEL', KEYS[b + 1], del)
    -- A timer is in exactly one of due and fly: those not in flight (none, usually) leave due.
    -- The claims they were under go once they hold nothing.
    local lids = unfly(b, del)
    local dm = {}
    for j = 1, #del do
      if not lids[j] then dm[#dm + 1] = mem(del[j], gs[j]) end
    end
    if #dm > 0 then vcall('ZREM', KEYS[b], dm) end
    if redis.call('EXISTS', KEYS[b + 5]) == 1 then vcall('HDEL', KEYS[b + 5], del) end
  end
end
for o = first_rest, #ARGV, 7 do
  local kind, qi, key, gen = ARGV[o], tonumber(ARGV[o + 1]), ARGV[o + 2], ARGV[o + 3]
  local b = 3 + (qi - 1) * 7
  local v = redis.call('HGET', KEYS[b + 1], key)
  if v then
    local g, a, c, du, dd, e = parse(v)
    if g == gen then
      applied = applied + 1
      if kind == 'D' then
        drop(b, key, g)
      elseif kind == 'L' then
        unlease(b, key, g, due_in(v))
      elseif kind == 'R' then
        redis.call('HSET', KEYS[b + 1], key, record(g, ARGV[o + 5], c, now, ARGV[o + 4], string.sub(v, e + 1)))
        redis.call('HSET', KEYS[b + 5], key, ARGV[o + 6])
        unlease(b, key, g, ARGV[o + 4])
      elseif kind == 'X' then
        local id = redis.call('INCR', KEYS[1])
        local due = due_in(v)
        local err = ARGV[o + 5]
        local m = fmt(id) .. ',' .. g .. ',' .. due .. ',' .. ARGV[o + 4] .. ',' .. ARGV[o + 6] .. ',' ..
          fmt(#key) .. ',' .. fmt(#err) .. ',' .. key .. err .. string.sub(v, e + 1)
        redis.call('ZADD', KEYS[b + 6], id, m)
        redis.call('HSET', KEYS[2], fmt(id), ARGV[2 + qi])
        drop(b, key, g)
      end
    end
  end
end
for qi = 1, nq do sweep_leases(3 + (qi - 1) * 7) end
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
upsert(3, key, ARGV[2], payload, ng, ARGV[3])
return ng
"#;

/// KEYS: a group per queue. ARGV: until, limit, details (0/1), then per queue (mode, lo, key):
/// mode `a` from -inf, `i` due >= lo, `x` due > lo, `k` (due, key) > (lo, key). Reads the
/// pending set of each queue (its members carry the generation: without details no record is
/// read) and, with details, the in-flight set too (scored by lease id, so
/// read whole: it holds what is claimed, at most the nodes' `max_in_flight`). Returns per timer
/// (queue index, key, due, record, lease_until, owner, last_error); without details (queue
/// index, due member, due), the member being `<key>\0<generation>`.
const RANGE: &str = r#"
local upto, limit, details = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local nupto = tonumber(upto)
local function rng(z, mode, lo, ck)
  if mode == 'k' then
    local start = redis.call('ZCOUNT', z, '-inf', '(' .. lo)
    local hi = start + redis.call('ZCOUNT', z, lo, lo)
    -- First rank in [start, hi) whose member sorts after ck (members of one score are in byte order).
    while start < hi do
      local mid = math.floor((start + hi) / 2)
      local m = redis.call('ZRANGE', z, mid, mid)[1]
      if lt(ck, (split(m))) then hi = mid else start = mid + 1 end
    end
    return redis.call('ZRANGE', z, start, start + limit - 1, 'WITHSCORES')
  end
  local min = '-inf'
  if mode == 'i' then min = lo elseif mode == 'x' then min = '(' .. lo end
  return redis.call('ZRANGEBYSCORE', z, min, upto, 'WITHSCORES', 'LIMIT', 0, limit)
end
-- Whether (d, key) is inside the bounds of mode and lo/ck.
local function inside(d, key, mode, lo, ck)
  if d > nupto then return false end
  if mode == 'a' then return true end
  local l = tonumber(lo)
  if mode == 'i' then return d >= l end
  if mode == 'x' then return d > l end
  return d > l or (d == l and lt(ck, key))
end
local out = {}
local function emit(qi, b, key, due, v, lid)
  out[#out + 1] = qi
  out[#out + 1] = key
  out[#out + 1] = due
  out[#out + 1] = v
  if lid then
    out[#out + 1] = redis.call('ZSCORE', KEYS[b + 3], lid)
    out[#out + 1] = redis.call('HGET', KEYS[b + 4], lid)
  else
    out[#out + 1] = false
    out[#out + 1] = false
  end
  out[#out + 1] = redis.call('HGET', KEYS[b + 5], key)
end
for qi = 1, #KEYS / 7 do
  local b = 1 + (qi - 1) * 7
  local o = 4 + (qi - 1) * 3
  local mode, lo, ck = ARGV[o], ARGV[o + 1], ARGV[o + 2]
  local r = rng(KEYS[b], mode, lo, ck)
  if not details then
    -- The generation is in the member: no record is read, and the member goes back whole (the
    -- caller splits it).
    for j = 1, #r, 2 do
      if tonumber(r[j + 1]) > nupto then break end
      out[#out + 1] = qi
      out[#out + 1] = r[j]
      out[#out + 1] = r[j + 1]
    end
  else
    local ks = {}
    for j = 1, #r, 2 do
      if tonumber(r[j + 1]) > nupto then break end
      ks[#ks + 1] = (split(r[j]))
    end
    if #ks > 0 then
      local vs = vget('HMGET', KEYS[b + 1], ks)
      for x = 1, #ks do
        if vs[x] then emit(qi, b, ks[x], r[2 * x], vs[x], nil) end
      end
    end
    local f = redis.call('ZRANGE', KEYS[b + 2], 0, -1, 'WITHSCORES')
    local fk = {}
    for j = 1, #f, 2 do fk[#fk + 1] = f[j] end
    if #fk > 0 then
      local vs = vget('HMGET', KEYS[b + 1], fk)
      local rows = {}
      for x = 1, #fk do
        local v = vs[x]
        if v then
          local d = tonumber(due_in(v))
          if inside(d, fk[x], mode, lo, ck) then rows[#rows + 1] = {d, fk[x], v, f[2 * x]} end
        end
      end
      table.sort(rows, function(p, q)
        if p[1] ~= q[1] then return p[1] < q[1] end
        return lt(p[2], q[2])
      end)
      for x = 1, math.min(limit, #rows) do
        local w = rows[x]
        emit(qi, b, w[2], fmt(w[1]), w[3], w[4])
      end
    end
  end
end
return out
"#;

/// KEYS: a group per queue. ARGV: now. Returns (stored, held under a live lease, dead) per
/// queue.
const COUNTS: &str = r#"
local out = {}
for qi = 1, #KEYS / 7 do
  local b = 1 + (qi - 1) * 7
  out[#out + 1] = redis.call('ZCARD', KEYS[b]) + redis.call('ZCARD', KEYS[b + 2])
  local held = 0
  for _, lid in ipairs(redis.call('ZRANGEBYSCORE', KEYS[b + 3], '(' .. ARGV[1], '+inf')) do
    held = held + redis.call('ZCOUNT', KEYS[b + 2], lid, lid)
  end
  out[#out + 1] = held
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
