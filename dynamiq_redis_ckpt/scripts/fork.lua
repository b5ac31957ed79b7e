-- fork.lua: hand a forked run to the workers: its lease, with no owner and the fork's checkpoint as head, claimable
-- at once (in the flow's lease index at the server's now). The caller announces the flow on its wake shard after it.
-- Only a new run: a lease that exists already (the run key is taken) is left alone.
--
-- KEYS[1] P:lease:{F}:<run>   KEYS[2] P:flow:{F}:leases
-- ARGV[1] the run's key   ARGV[2] head checkpoint id   ARGV[3] the home (F)   ARGV[4] nodes the head completed
--
-- Reply: {'OK'} | {'EXISTS'} | {'WRONGTYPE', key}

local expected = {'hash', 'zset'}
for i = 1, 2 do
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= expected[i] then return {'WRONGTYPE', KEYS[i]} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'EXISTS'}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], 'owner', '', 'exp', 0, 'token', 0, 'attempts', 0, 'head', ARGV[2], 'flow', ARGV[3],
  'done', ARGV[4])
redis.call('ZADD', KEYS[2], now_ms, ARGV[1])
return {'OK'}
