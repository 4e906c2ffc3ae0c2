-- Claim one poll interval of a connection: "never polled twice in one interval".
--
-- KEYS[1]  string: the poll slot, whose value is the last claimed interval index
-- ARGV[1]  interval index, an integer (for example floor(epoch / poll interval))
-- ARGV[2]  ttl in milliseconds
--
-- Returns 1 if this interval is now claimed by the caller, 0 if it (or a later one) was
-- already claimed. A plain SET NX would refuse a new interval while the previous claim has
-- not yet expired; comparing indexes lets the next interval through at once.

local stored = redis.call('GET', KEYS[1])
local claimed = stored and tonumber(stored)
local wanted = tonumber(ARGV[1])
if claimed and claimed >= wanted then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
