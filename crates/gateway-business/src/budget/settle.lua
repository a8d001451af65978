-- Budgets: replace a reservation by the real cost in every budget of one request, and record
-- the alert thresholds this crosses (HSETNX: whichever replica gets there first sends it).
--
-- KEYS        as in reserve.lua, two per budget
-- ARGV[1]     the reservation's member, "<id>:<nano-USD>"
-- ARGV[2]     its amount, nano-USD (released if it is still live)
-- ARGV[3]     the real cost, nano-USD
-- ARGV[4]     T, how many thresholds each budget has
-- then, per budget: when its keys may go (Unix s), then T pairs of
--             percent, and the spending (nano-USD) that reaches it (-1: do not check)
-- Returns     {spent_1, fired_1, ..., spent_n, fired_n}: fired_i has bit j-1 set when this
--             call recorded budget i's threshold j

local member = ARGV[1]
local amount = tonumber(ARGV[2])
local t = tonumber(ARGV[4])
local n = #KEYS / 2

local reply = {}
local pos = 5
for i = 1, n do
  local hash, live = KEYS[2 * i - 1], KEYS[2 * i]
  local expire_at = ARGV[pos]
  pos = pos + 1
  -- Gone already when it expired and a reservation check released it: nothing to release.
  if amount > 0 and redis.call('ZREM', live, member) == 1 then
    redis.call('HINCRBY', hash, 'reserved', '-' .. ARGV[2])
  end
  local spent = redis.call('HINCRBY', hash, 'spent', ARGV[3])
  redis.call('EXPIREAT', hash, expire_at)
  local fired = 0
  for j = 1, t do
    local percent, at = ARGV[pos], tonumber(ARGV[pos + 1])
    pos = pos + 2
    if at >= 0 and spent >= at and redis.call('HSETNX', hash, 'alert:' .. percent, '1') == 1 then
      fired = fired + 2 ^ (j - 1)
    end
  end
  reply[#reply + 1] = spent
  reply[#reply + 1] = fired
end
return reply
