-- Rate limits (GCRA) for every limit of one request, checked and committed in one step.
-- This is limits/gcra.rs (`decide`) line for line; change both together.
--
-- KEYS[i]      one limit: a scope, a dimension and a name
-- ARGV[1]      "1": charge only if every limit has room, else charge none;
--              "0": apply the charges as they are (settling tokens: refunds are negative,
--              extra usage may run into debt)
-- ARGV[2i]     the per-minute limit of KEYS[i] (at least 1)
-- ARGV[2i+1]   units to charge KEYS[i]; 0 only reports
-- Returns      {admitted (1 or 0), then for each key: remaining, reset_us, retry_us}
--
-- A key holds "<server time, us>:<debt, us>". Time is the server's own (TIME), so replicas
-- with skewed clocks agree; a key expires when its debt is paid off, when it is worth no
-- more than a missing key.

-- Redis before 5 refuses writes after TIME unless effects are replicated; later ones always do.
if redis.replicate_commands then
  redis.replicate_commands()
end

local WINDOW = 60000000
local SLACK = 0.01

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local checking = ARGV[1] == '1'

local function debt_of(key)
  local stored = redis.call('GET', key)
  if not stored then
    return 0
  end
  local at, debt = string.match(stored, '^(%d+):(.+)$')
  at, debt = tonumber(at), tonumber(debt)
  if not at or not debt then
    return 0
  end
  local left = debt - math.max(now - at, 0)
  if left > 0 then
    return left
  end
  return 0
end

local function remaining(debt, limit)
  local r = math.floor((WINDOW - debt + SLACK) * limit / WINDOW)
  if r < 0 then
    return 0
  elseif r > limit then
    return limit
  end
  return r
end

local function ceil_us(us)
  us = us - SLACK
  if us <= 0 then
    return 0
  end
  return math.ceil(us)
end

local n = #KEYS
local limits, units, debts, after = {}, {}, {}, {}
for i = 1, n do
  limits[i] = tonumber(ARGV[2 * i])
  units[i] = tonumber(ARGV[2 * i + 1])
  debts[i] = debt_of(KEYS[i])
  after[i] = debts[i] + units[i] * WINDOW / limits[i]
end

local function over(i)
  return units[i] > 0 and after[i] > WINDOW + SLACK
end

local admitted = true
if checking then
  for i = 1, n do
    if over(i) then
      admitted = false
    end
  end
end

local reply = {admitted and 1 or 0}
for i = 1, n do
  if admitted then
    local debt = math.max(after[i], 0)
    if units[i] ~= 0 then
      if debt > 0 then
        redis.call('SET', KEYS[i], string.format('%.0f:%.17g', now, debt),
          'PX', string.format('%.0f', math.ceil(debt / 1000) + 1))
      else
        redis.call('DEL', KEYS[i])
      end
    end
    reply[#reply + 1] = remaining(debt, limits[i])
    reply[#reply + 1] = ceil_us(debt)
    reply[#reply + 1] = 0
  else
    reply[#reply + 1] = remaining(debts[i], limits[i])
    reply[#reply + 1] = ceil_us(debts[i])
    if over(i) then
      reply[#reply + 1] = ceil_us(after[i] - WINDOW)
    else
      reply[#reply + 1] = 0
    end
  end
end
return reply
