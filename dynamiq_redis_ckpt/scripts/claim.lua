-- claim.lua: a worker claims a run whose lease ran out (mode 'orphan') or whose timer is due (mode 'due').
-- Atomic: of many workers exactly one gets a run; the due entry is removed in the same script that claims it.
-- Times are the server's (TIME), never a worker's clock.
--
-- KEYS[1] the run's lease hash   KEYS[2] the flow's lease index   KEYS[3] the flow's due timers
-- KEYS[4] the flow's dead letters
-- ARGV[1] the run's key   ARGV[2] owner   ARGV[3] ttl (ms)   ARGV[4] 'orphan' | 'due'   ARGV[5] max attempts
--
-- Reply: {'OK', token, head checkpoint id, attempt, waited} | {'NOT_DUE'} | {'DEAD', head} | {'WRONGTYPE', key}
--        waited: ms since the run became claimable (its lease ran out, its timer fell due, a person answered);
--        '' when not known (an answer stored by a version that scored answers 0)

local expected = {'hash', 'zset', 'zset', 'zset'}
for i = 1, 4 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= expected[i] then return {'WRONGTYPE', KEYS[i]} end
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local run = ARGV[1]
local l = redis.call('HMGET', KEYS[1], 'owner', 'exp', 'head')
if not l[3] then
  redis.call('ZREM', KEYS[2], run)
  redis.call('ZREM', KEYS[3], run)
  return {'NOT_DUE'}
end
local at
if ARGV[4] == 'orphan' then
  at = tonumber(redis.call('ZSCORE', KEYS[2], run) or '')
  if not at or at > now_ms then return {'NOT_DUE'} end
  local exp = tonumber(l[2]) or 0
  if l[1] ~= '' and exp > now_ms then
    redis.call('ZADD', KEYS[2], exp, run)  -- renewed since the index was read: it is not an orphan
    return {'NOT_DUE'}
  end
else
  at = tonumber(redis.call('ZSCORE', KEYS[3], run) or '')
  if not at or at > now_ms then return {'NOT_DUE'} end
  redis.call('ZREM', KEYS[3], run)
  if l[1] ~= '' and (tonumber(l[2]) or 0) > now_ms then
    return {'NOT_DUE'}  -- someone resumed it already (a person, a process) and holds it
  end
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempt > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'owner', '', 'exp', 0)
  redis.call('ZREM', KEYS[2], run)
  redis.call('ZADD', KEYS[4], now_ms, run)
  return {'DEAD', l[3]}
end
local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
local exp = string.format('%.0f', now_ms + tonumber(ARGV[3]))
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'exp', exp)
redis.call('ZADD', KEYS[2], exp, run)
redis.call('PERSIST', KEYS[1])
local waited = at > 0 and string.format('%.0f', now_ms - at) or ''
return {'OK', tostring(token), l[3], tostring(attempt), waited}
