-- Record HipChat's own budget for one connection: at most `remaining` more calls until reset.
--
-- KEYS[1]  hash, the budget's state: remaining and reset (microseconds) are written here;
--          budget_take.lua enforces them and counts them down as it grants calls; refused
--          is the latest reset a 429 stated (microseconds)
-- ARGV[1]  remaining, >= 0 (0 for a 429)
-- ARGV[2]  reset: when HipChat's window resets, epoch microseconds
-- ARGV[3]  "429" when HipChat refused a call, "headers" for X-Ratelimit-* on any response
--
-- Returns 1 if the ceiling changed, 0 if the report was ignored.
--
-- Responses from parallel workers arrive out of order, so a report merges instead of
-- overwriting:
--   * a reset already past says nothing about the future: ignored;
--   * headers with the stored reset (same HipChat window): keep the smaller remaining, since
--     calls may have been granted here after HipChat counted, or HipChat counted calls we
--     did not see;
--   * headers with a later reset: a new window, replace;
--   * headers with an earlier reset: a late response from an older window, ignored;
--   * a 429 means zero now, whatever earlier headers said: zero until its reset, unless a
--     stored zero already lasts longer;
--   * and until a 429's reset no headers lift its zero: an answer that comes in after the 429
--     may have left HipChat before it (a call in flight on another worker), and announce a
--     later reset with calls to spare. HipChat's refusal is its latest word.

local key = KEYS[1]
local remaining = tonumber(ARGV[1])
local reset = tonumber(ARGV[2])
local refused = ARGV[3] == '429'

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if reset <= now then
  return 0
end

local cur = redis.call('HMGET', key, 'remaining', 'reset', 'refused')
local refused_until = tonumber(cur[3] or '0')
if refused then
  if reset > refused_until then
    redis.call('HSET', key, 'refused', string.format('%.0f', reset))
  end
elseif refused_until > now then
  return 0
end
if cur[1] and cur[2] and tonumber(cur[2]) > now then
  local cur_remaining, cur_reset = tonumber(cur[1]), tonumber(cur[2])
  if refused then
    if cur_remaining <= 0 and cur_reset >= reset then
      return 0
    end
  elseif reset < cur_reset then
    return 0
  elseif reset == cur_reset and remaining >= cur_remaining then
    return 0
  end
end

redis.call('HSET', key, 'remaining', string.format('%.0f', remaining),
  'reset', string.format('%.0f', reset))
return 1
