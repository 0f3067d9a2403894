"""The Lua scripts of the `redis` state backend (gateway/store/redis.py), one per operation, so each is
atomic on the server. The single operations touch one scope's keys (one hash tag, one Cluster slot);
`take` and `give` touch every scope of a request at once, which standalone Redis runs in one script
whatever the hash tags (Cluster refuses it: there redis.py falls back to single operations).

Times are integer milliseconds; numbers go back as '%.17g' strings, so doubles round-trip exactly.
"""

from __future__ import annotations

from gateway.store import EPSILON

NOW = """
local function now_ms(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(x) return string.format('%.17g', x) end
local EPSILON = """ + repr(EPSILON) + """
-- a window's or period's count (a hash of start 's' and count 'n'), and whether `start` is the one held
local function held(key, start)
  local h = redis.call('HMGET', key, 's', 'n')
  if tonumber(h[1]) == start then return tonumber(h[2]), true end
  return 0, false
end
-- a fixed-window hit: {allowed, count after, ms to the window's end}
local function hit(key, cost, limit, window, anchor, now)
  local start = now - (now - anchor) % window  -- Lua's % is floored, like Python's
  local count, current = held(key, start)
  local allowed = 0
  if cost < 0 then  -- a refund: only a count held in this window goes down, to 0 at most
    allowed = 1
    if current then
      count = math.max(0, count + cost)
      redis.call('HSET', key, 'n', num(count))
    end
  elseif count + cost <= limit + EPSILON then
    allowed = 1
    count = count + cost
    redis.call('HSET', key, 's', num(start), 'n', num(count))
    redis.call('PEXPIRE', key, start + window - now + 1000)
  end
  return {allowed, num(count), num(start + window - now)}
end
-- settle (or, with actual 0, release) reservation `ident` of the period starting at `start`
local function settle(spent, reserved, ident, start, actual)
  local amount = redis.call('HGET', reserved, ident)
  if not amount then return 0 end
  redis.call('HDEL', reserved, ident)
  local total, current = held(spent, start)
  if current then
    redis.call('HSET', spent, 'n', num(math.max(0, total - tonumber(amount) + actual)))
  end
  return 1
end
-- a lease set keeps its keys until its last lease expires
local function keep(leases, now)
  local last = redis.call('ZRANGE', leases, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIRE', leases, tonumber(last[2]) - now + 1000) end
end
"""

HIT = NOW + """
return hit(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5]), now_ms(ARGV[4]))
"""

RESERVE = NOW + """
local amount, cap, period, anchor = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[6])
local now = now_ms(ARGV[4])
local start = now - (now - anchor) % period
local total, current = held(KEYS[1], start)
if not current then redis.call('DEL', KEYS[2]) end
if total + amount > cap + EPSILON then return false end
redis.call('HSET', KEYS[1], 's', num(start), 'n', num(total + amount))
redis.call('HSET', KEYS[2], ARGV[5], num(amount))
local ttl = start + period - now + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return num(start)
"""

TAKE = NOW + """
return settle(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
"""

SPENT = NOW + """
local period, anchor = tonumber(ARGV[1]), tonumber(ARGV[3])
local now = now_ms(ARGV[2])
return num(held(KEYS[1], now - (now - anchor) % period))
"""

LEASES = NOW + """
local now = now_ms(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"""

ACQUIRE = LEASES + """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
keep(KEYS[1], now)
return 1
"""

RENEW = LEASES + """
if not redis.call('ZSCORE', KEYS[1], ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[3]), ARGV[4])
keep(KEYS[1], now)
return 1
"""

TAKE_STEP = 7
"""ARGV per step of BATCH_TAKE: op ('h' hit, 'a' acquire, 'r' reserve), required ('1' or '0'), four
numbers (hit: cost, limit, window, anchor; reserve: amount, cap, period, anchor; acquire: slots, ttl,
0, 0) and the lease's or reservation's id. KEYS: two per step (hit: the counter twice; acquire: the
lease set twice; reserve: the spent hash and the reservations hash)."""

BATCH_TAKE = NOW + """
local now = now_ms(ARGV[1])
local n = (#ARGV - 1) / """ + str(TAKE_STEP) + """
local function step(i)
  local b = 2 + (i - 1) * """ + str(TAKE_STEP) + """
  return ARGV[b], ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]),
    tonumber(ARGV[b + 5]), ARGV[b + 6], KEYS[2 * i - 1], KEYS[2 * i]
end
-- pass 1, check: each step against the state plus the steps before it that fit (`total`: a key's
-- count, spending or lease count as of the steps so far); nothing is written
local total, fit, was, after, admitted = {}, {}, {}, {}, 1
for i = 1, n do
  local op, required, a, b, c, d, _, key = step(i)
  local now_held
  if op == 'a' then
    now_held = total[key] or redis.call('ZCOUNT', key, '(' .. num(now), '+inf')
    fit[i] = now_held < a
    after[i] = now_held + 1
  else
    now_held = total[key] or held(key, now - (now - d) % c)
    fit[i] = now_held + a <= b + EPSILON
    after[i] = now_held + a
  end
  was[i] = now_held
  if fit[i] then total[key] = after[i] elseif required == '1' then admitted = 0 end
end
-- pass 2, apply (only when no required step was refused), and the answer: per step fit, figure, ms left
local out = {admitted}
for i = 1, n do
  local op, _, a, b, c, d, ident, key, key2 = step(i)
  local apply, figure, left = admitted == 1 and fit[i], '', ''
  if op == 'h' then
    local start = now - (now - d) % c
    figure, left = num(was[i]), num(start + c - now)
    if apply then
      redis.call('HSET', key, 's', num(start), 'n', num(after[i]))
      redis.call('PEXPIRE', key, start + c - now + 1000)
      figure = num(after[i])
    end
  elseif op == 'r' and apply then
    local start = now - (now - d) % c
    local _, current = held(key, start)
    if not current then redis.call('DEL', key2) end
    redis.call('HSET', key, 's', num(start), 'n', num(after[i]))
    redis.call('HSET', key2, ident, num(a))
    redis.call('PEXPIRE', key, start + c - now + 1000)
    redis.call('PEXPIRE', key2, start + c - now + 1000)
    figure = num(start)
  elseif op == 'a' and apply then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    redis.call('ZADD', key, now + b, ident)
    keep(key, now)
  end
  out[#out + 1] = fit[i] and 1 or 0
  out[#out + 1] = figure
  out[#out + 1] = left
end
return out
"""

GIVE_ITEM = 5
"""ARGV per item of BATCH_GIVE: op ('s' settle or release, 'l' release a lease, 'c' count a hit) and
four values (settle: id, period start, actual; lease: id; count: cost, limit, window, anchor). KEYS: two
per item (settle: spent hash, reservations hash; lease: the set twice; count: the counter twice)."""

BATCH_GIVE = NOW + """
local now = now_ms(ARGV[1])
for i = 1, (#ARGV - 1) / """ + str(GIVE_ITEM) + """ do
  local b = 2 + (i - 1) * """ + str(GIVE_ITEM) + """
  local op, key, key2 = ARGV[b], KEYS[2 * i - 1], KEYS[2 * i]
  if op == 's' then
    settle(key, key2, ARGV[b + 1], tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]))
  elseif op == 'l' then
    redis.call('ZREM', key, ARGV[b + 1])
  else
    hit(key, tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), now)
  end
end
return 1
"""
