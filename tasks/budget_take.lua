-- Take n calls from one connection's budget, or peek at it, in one atomic step.
--
-- KEYS[1]  sorted set, the sliding log: one member per granted call, score = member = the
--          call's stamp in microseconds (Redis TIME, made strictly increasing per key so that
--          members are unique and a clock stepping back never frees anything early)
-- KEYS[2]  hash {remaining, reset_at_us}: HipChat's own ceiling (budget_ceiling.lua writes it)
-- ARGV[1]  capacity C: calls allowed in any window
-- ARGV[2]  window W in microseconds
-- ARGV[3]  n, the calls wanted, 1 <= n <= C (the caller checks)
-- ARGV[4]  "1" to take, "0" to peek (peek writes nothing)
--
-- Returns {allowed, remaining, retry_after_us}, all integers:
--   allowed         1 if the n calls were granted (peek: would be granted now), else 0
--   remaining       calls still allowed right now, after this take; capped by the ceiling
--   retry_after_us  0 if allowed, else the exact wait until n calls fit, if nobody else
--                   takes meanwhile: the later of "enough logged calls have left the window"
--                   and "HipChat's reset"
--
-- A call stamped s counts while s > now - W, so any two granted calls C apart in the log are
-- at least W apart: no half-open window of W microseconds ever holds more than C calls.

local log, ceiling = KEYS[1], KEYS[2]
local capacity = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local take = ARGV[4] == '1'

local unpack = table.unpack or unpack

-- Numbers go to Redis as integer strings: Lua's default formatting would round microsecond
-- stamps (16 digits) to 14 significant digits.
local function int(x)
  return string.format('%.0f', x)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local since = '(' .. int(now - window)

local used
if take then
  -- Forget calls that left the window; then the log holds exactly the calls that count.
  redis.call('ZREMRANGEBYSCORE', log, '-inf', int(now - window))
  used = redis.call('ZCARD', log)
else
  used = redis.call('ZCOUNT', log, since, '+inf')
end
local free = math.max(capacity - used, 0)
local wait = 0

if used + n > capacity then
  -- The call that must leave the window first is the (used + n - C)-th oldest still in it.
  local oldest = redis.call('ZRANGEBYSCORE', log, since, '+inf', 'WITHSCORES', 'LIMIT',
    used + n - capacity - 1, 1)
  wait = tonumber(oldest[2]) + window - now
end

local cap = redis.call('HMGET', ceiling, 'remaining', 'reset_at_us')
local cap_active = cap[1] and cap[2] and tonumber(cap[2]) > now
if cap_active then
  local cap_remaining = math.max(tonumber(cap[1]), 0)
  free = math.min(free, cap_remaining)
  if cap_remaining < n then
    wait = math.max(wait, tonumber(cap[2]) - now)
  end
end

if wait > 0 then
  return {0, free, wait}
end
if not take then
  return {1, free, 0}
end

local newest = redis.call('ZRANGE', log, -1, -1, 'WITHSCORES')
local stamp = now
if newest[2] and tonumber(newest[2]) >= stamp then
  stamp = tonumber(newest[2]) + 1
end
local args = {}
for i = 0, n - 1 do
  args[#args + 1] = int(stamp + i)
  args[#args + 1] = int(stamp + i)
end
redis.call('ZADD', log, unpack(args))
-- The log is needed until its newest call leaves the window; then it vanishes by itself.
redis.call('PEXPIRE', log, int(math.ceil((stamp + n - 1 + window - now) / 1000)))
if cap_active then
  redis.call('HINCRBY', ceiling, 'remaining', int(-n))
end
return {1, free - n, 0}
