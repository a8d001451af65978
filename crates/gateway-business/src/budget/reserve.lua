-- Budgets: check every budget of one request and reserve its amount in all of them, or in
-- none. The Redis twin of the database backend's reservation (src/budget/database.rs); the
-- rule for "fits" is budget.rs `fits`: change them together.
--
-- KEYS[2i-1]  budget i's hash: spent (settled nano-USD), reserved (nano-USD of the live
--             reservations), alert:<percent> flags
-- KEYS[2i]    budget i's live reservations: a sorted set of "<id>:<nano-USD>" scored by
--             expiry (Unix ms)
-- ARGV[1]     now, Unix ms (the caller's clock, as in the other backends)
-- ARGV[2]     this reservation's member, "<id>:<nano-USD>"
-- ARGV[3]     the amount to reserve, nano-USD; 0 checks only that some room is left
-- ARGV[4]     when this reservation expires, Unix ms
-- ARGV[3+2i]  budget i's limit, nano-USD
-- ARGV[4+2i]  when budget i's keys may go, Unix s (a week after its period ends)
-- Returns     {index of the first budget without room (0: admitted), spent_1..n, reserved_1..n}
--
-- Lua numbers are doubles: sums are exact below 2^53 nano-USD (9 million USD per budget).

local now = tonumber(ARGV[1])
local member = ARGV[2]
local amount = tonumber(ARGV[3])
local n = #KEYS / 2

local spent, reserved = {}, {}
local failed = 0
for i = 1, n do
  local hash, live = KEYS[2 * i - 1], KEYS[2 * i]
  -- Release what expired (its replica died, or it was never settled) before counting.
  local gone = redis.call('ZRANGEBYSCORE', live, '-inf', now)
  if #gone > 0 then
    local freed = 0
    for _, m in ipairs(gone) do
      freed = freed + (tonumber(string.match(m, ':(%d+)$')) or 0)
    end
    redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
    if freed > 0 then
      redis.call('HINCRBY', KEYS[2 * i - 1], 'reserved', string.format('%.0f', -freed))
    end
  end
  local state = redis.call('HMGET', hash, 'spent', 'reserved')
  spent[i] = tonumber(state[1]) or 0
  reserved[i] = tonumber(state[2]) or 0
  local limit = tonumber(ARGV[3 + 2 * i])
  local used = spent[i] + reserved[i]
  local room
  if amount > 0 then
    room = used + amount <= limit
  else
    room = used < limit
  end
  if failed == 0 and not room then
    failed = i
  end
end

if failed == 0 and amount > 0 then
  for i = 1, n do
    local hash, live = KEYS[2 * i - 1], KEYS[2 * i]
    redis.call('ZADD', live, ARGV[4], member)
    redis.call('HINCRBY', hash, 'reserved', ARGV[3])
    redis.call('EXPIREAT', hash, ARGV[4 + 2 * i])
    redis.call('EXPIREAT', live, ARGV[4 + 2 * i])
  end
end

local reply = {failed}
for i = 1, n do
  reply[#reply + 1] = spent[i]
end
for i = 1, n do
  reply[#reply + 1] = reserved[i]
end
return reply
