-- Take n calls from one connection's budget, reserve them for later, or peek, in one step.
--
-- The budget's constants are written into the script when it is loaded (string.Template:
-- $capacity, $window, $horizon, $tolerance, $grace), so a call sends only what varies.
--   capacity   C, calls allowed in any window
--   window     W in microseconds, safety margin included
--   horizon    microseconds: no reservation is made further ahead than this
--   tolerance  microseconds: a reservation is honoured from its stamp to stamp + this
--   grace      microseconds: a call the window allows now but that must be stamped after the
--              newest stamp (callers within the same microsecond) still goes now, up to this
--              far ahead
--
-- KEYS[1]  list, the log: the stamps (Redis TIME, microseconds) of the newest granted or
--          reserved calls, newest first; stamps strictly decrease along it. It keeps between
--          2C and 3C of them: C for the rule, C more so that usage can still be counted.
-- KEYS[2]  hash, the state: epoch (when this budget's log began: its absence means Redis lost
--          the log), remaining and reset (HipChat's own budget; budget_ceiling.lua writes them)
-- ARGV[1]  n, the calls wanted, 1 <= n <= C (the caller checks)
-- ARGV[2]  mode: "take" (now or never), "reserve" (now, or the first moment n calls fit,
--          written into the log so that later takers queue behind), "peek" (writes nothing)
-- ARGV[3]  a reservation this caller holds, "<epoch>:<stamp>:<calls reserved>", or "" for none
--
-- Returns 0 when the calls are granted now (a held reservation that is due counts as this);
-- a positive integer when refused: the microseconds until n calls fit, if nobody else takes
-- first; or, when reserved, {wait_us, stamp, epoch}: call in wait_us, holding
-- "<epoch>:<stamp>:<n>". (Plain integers keep the common answers cheap to send and to read.)
--
-- Rules, for every window of W microseconds to hold at most C stamps:
--   * a new stamp s must satisfy s >= (the C-n+1-th newest stamp) + W;
--   * s is also after the newest stamp, so reservations queue in order and nobody jumps them;
--   * while HipChat's remaining (if its reset is still ahead) is below n, s waits for reset.
-- A missing state means the log was lost (Redis restarted empty, or was flushed): up to C
-- calls may have gone out in the last W, so the whole next window is refused (the state is
-- written with remaining 0 until now + W). budget.py's initialise() writes a fresh state for a
-- new connection, which has made no calls.

local log, state = KEYS[1], KEYS[2]
local capacity = $capacity
local window = $window
local horizon = $horizon
local tolerance = $tolerance
local grace = $grace
local n = tonumber(ARGV[1])
local mode = ARGV[2]
local held = ARGV[3]

-- Stamps go to Redis as integer strings: Lua's default formatting would round microsecond
-- stamps (16 digits) to 14 significant digits.
local function int(x)
  return string.format('%.0f', x)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local st = redis.call('HMGET', state, 'epoch', 'remaining', 'reset')
if not st[1] then
  if mode == 'peek' then
    return window
  end
  redis.call('DEL', log)
  redis.call('HSET', state, 'epoch', int(now), 'remaining', '0', 'reset', int(now + window))
  st = {int(now), '0', int(now + window)}
end
local epoch = st[1]
local reset = tonumber(st[3] or '0')
local capped = st[2] and reset > now
local remaining = capped and tonumber(st[2]) or 0

-- A held reservation (of this epoch: older ones went with the lost log) covers the calls it
-- reserved, no more (one more would be a call the log does not hold):
--   * early (a clock or a timer ran fast): the same reservation, with what is left of its wait;
--   * due: the caller's to use, it is already in the log;
--   * late (a busy worker came back after the tolerance), or wanting more calls than it
--     reserved: its slot goes unused, so its stamps leave the log (they stood for no call) and
--     the caller queues again like anyone else.
if held ~= '' and mode == 'reserve' then
  local sep = string.find(held, ':', 1, true)
  local sep2 = string.find(held, ':', sep + 1, true)
  local stamp = tonumber(string.sub(held, sep + 1, (sep2 or 0) - 1))
  local reserved = sep2 and tonumber(string.sub(held, sep2 + 1)) or 1
  if string.sub(held, 1, sep - 1) == epoch then
    if n <= reserved and now < stamp then
      return {stamp - now, stamp, epoch}
    end
    if n <= reserved and now <= stamp + tolerance then
      if capped and remaining < n then
        return reset - now
      end
      if capped then
        redis.call('HINCRBY', state, 'remaining', -n)
      end
      return 0
    end
    for i = 0, reserved - 1 do
      redis.call('LREM', log, 1, int(stamp + i))
    end
  end
end

local earliest = now
local bound = redis.call('LINDEX', log, capacity - n)
if bound and tonumber(bound) + window > earliest then
  earliest = tonumber(bound) + window
end
if capped and remaining < n and reset > earliest then
  earliest = reset
end
-- The window and HipChat allow no early call; the newest stamp only orders (the grace).
local forbidden = earliest > now
local newest = redis.call('LINDEX', log, 0)
if newest and tonumber(newest) + 1 > earliest then
  earliest = tonumber(newest) + 1
end
local waits = forbidden or earliest - now > grace

if waits and (mode ~= 'reserve' or earliest - now > horizon) then
  return earliest - now
end
if mode == 'peek' then
  return 0
end

local stamps = {}
for i = 0, n - 1 do
  stamps[#stamps + 1] = int(earliest + i)
end
if redis.call('LPUSH', log, unpack(stamps)) > 3 * capacity then
  redis.call('LTRIM', log, 0, 2 * capacity - 1)
end
if capped and earliest < reset then
  redis.call('HINCRBY', state, 'remaining', -n)
end
if waits then
  return {earliest - now, earliest, epoch}
end
return 0
